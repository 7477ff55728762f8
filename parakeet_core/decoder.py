"""TDT greedy decoding: prediction network, joint network, and the batched label loop (CPU loop or CUDA graph).

The loop follows NeMo's greedy TDT decoding rule for rule, per clip:
- the joint scores the current frame against the prediction network's output; the token is the argmax over
  the vocabulary plus blank, the duration the argmax over the duration logits, taken separately;
- a blank advances time by its duration, forced to at least 1; the prediction network does not move;
- a token is emitted at the current frame with its duration, the prediction network consumes it, and time
  advances by the duration (possibly 0);
- once `max_symbols` tokens have been emitted on one frame and time has not moved, time advances by 1.

All clips of a batch advance together, one micro-step (a blank or a token per active clip) at a time. The step
is written with fixed shapes and in-place updates only, so the same function runs eagerly on the CPU and is
captured into a CUDA graph on the GPU, where the host checks for completion only every `steps_per_replay` steps.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import torch
from torch import nn

from .config import DecoderConfig
from .types import Hypothesis


_thread_setting_lock = threading.Lock()
_single_thread_users = 0
_saved_thread_count = 1


@contextlib.contextmanager
def _one_intra_op_thread():
    """Run the CPU label loop on one intra-op thread, restoring the process-wide setting after the last user.

    The loop is hundreds of tiny operations; a second intra-op thread only adds hand-off latency (milliseconds
    per operation when another process holds the other core). The setting is process-wide, so concurrent
    decodes share one save/restore.
    """
    global _single_thread_users, _saved_thread_count
    with _thread_setting_lock:
        if _single_thread_users == 0:
            _saved_thread_count = torch.get_num_threads()
            torch.set_num_threads(1)
        _single_thread_users += 1
    try:
        yield
    finally:
        with _thread_setting_lock:
            _single_thread_users -= 1
            if _single_thread_users == 0:
                torch.set_num_threads(_saved_thread_count)


class PredictionNetwork(nn.Module):
    """Token embedding (the blank id is the zero padding row) followed by a stacked LSTM."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.embed = nn.Embedding(config.vocab_size + 1, config.pred_hidden, padding_idx=config.blank_id)
        self.dec_rnn = nn.Module()
        self.dec_rnn.lstm = nn.LSTM(config.pred_hidden, config.pred_hidden, num_layers=config.pred_rnn_layers)

    def forward(self, tokens: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
        """One step for a batch of tokens [B] from state (h, c), each [layers, B, hidden]."""
        return self._cell_steps(self.embed(tokens), state)

    def _cell_steps(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
        # Plain matrix products rather than nn.LSTM's fused kernels: for one step of a small batch, oneDNN's RNN
        # costs about 18 ms per layer on the CPU (it repacks the weights on every call) where two products take
        # well under 1 ms; cuDNN's RNN is avoided too, so any dtype works and the step is safe in a CUDA graph.
        lstm = self.dec_rnn.lstm
        hidden, cell = state
        new_hidden, new_cell = [], []
        for layer in range(lstm.num_layers):
            gates = (
                nn.functional.linear(x, getattr(lstm, f"weight_ih_l{layer}"), getattr(lstm, f"bias_ih_l{layer}"))
                + nn.functional.linear(hidden[layer], getattr(lstm, f"weight_hh_l{layer}"), getattr(lstm, f"bias_hh_l{layer}"))
            )
            input_gate, forget_gate, candidate, output_gate = gates.chunk(4, dim=-1)
            c = torch.sigmoid(forget_gate) * cell[layer] + torch.sigmoid(input_gate) * torch.tanh(candidate)
            x = torch.sigmoid(output_gate) * torch.tanh(c)
            new_hidden.append(x)
            new_cell.append(c)
        return x, (torch.stack(new_hidden), torch.stack(new_cell))


class JointNetwork(nn.Module):
    """Projects encoder and prediction outputs to a shared space; ReLU; logits over vocab + blank + durations."""

    def __init__(self, encoder_dim: int, config: DecoderConfig):
        super().__init__()
        self.enc = nn.Linear(encoder_dim, config.joint_hidden)
        self.pred = nn.Linear(config.pred_hidden, config.joint_hidden)
        self.joint_net = nn.Sequential(
            nn.ReLU(), nn.Identity(), nn.Linear(config.joint_hidden, config.vocab_size + 1 + len(config.durations))
        )

    def logits(self, encoder_projected: torch.Tensor, prediction_projected: torch.Tensor) -> torch.Tensor:
        return self.joint_net(encoder_projected + prediction_projected)


@dataclass
class LoopState:
    """Every tensor the label loop reads or writes, preallocated with fixed shapes."""

    encoder_projected: torch.Tensor  # [B, T, H]
    lengths: torch.Tensor  # [B]
    time: torch.Tensor  # [B]
    active: torch.Tensor  # [B] bool
    prediction_projected: torch.Tensor  # [B, H]
    hidden: torch.Tensor  # [L, B, P]
    cell: torch.Tensor  # [L, B, P]
    last_emit_frame: torch.Tensor  # [B]
    emits_on_frame: torch.Tensor  # [B]
    tokens: torch.Tensor  # [B, capacity + 1]
    frames: torch.Tensor  # [B, capacity + 1]
    durations: torch.Tensor  # [B, capacity + 1]
    emitted: torch.Tensor  # [B]

    @classmethod
    def allocate(cls, batch: int, steps: int, joint_hidden: int, layers: int, pred_hidden: int,
                 capacity: int, dtype: torch.dtype, device: torch.device) -> "LoopState":
        def longs(*shape):
            return torch.zeros(shape, dtype=torch.long, device=device)

        return cls(
            encoder_projected=torch.zeros(batch, steps, joint_hidden, dtype=dtype, device=device),
            lengths=longs(batch),
            time=longs(batch),
            active=torch.zeros(batch, dtype=torch.bool, device=device),
            prediction_projected=torch.zeros(batch, joint_hidden, dtype=dtype, device=device),
            hidden=torch.zeros(layers, batch, pred_hidden, dtype=dtype, device=device),
            cell=torch.zeros(layers, batch, pred_hidden, dtype=dtype, device=device),
            last_emit_frame=longs(batch),
            emits_on_frame=longs(batch),
            tokens=longs(batch, capacity + 1),
            frames=longs(batch, capacity + 1),
            durations=longs(batch, capacity + 1),
            emitted=longs(batch),
        )

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    @property
    def capacity(self) -> int:
        return self.tokens.shape[1] - 1


class TDTGreedyDecoder(nn.Module):
    """Prediction + joint networks and the greedy TDT label loop over a padded batch of encoder frames."""

    def __init__(self, encoder_dim: int, config: DecoderConfig, steps_per_replay: int = 8):
        super().__init__()
        self.config = config
        self.prediction = PredictionNetwork(config)
        self.joint = JointNetwork(encoder_dim, config)
        self.register_buffer("duration_values", torch.tensor(config.durations, dtype=torch.long), persistent=False)
        self.steps_per_replay = steps_per_replay
        self.use_cuda_graph = True
        self._graphs: dict[int, _GraphedLoop] = {}
        self._lock = threading.Lock()

    def load_checkpoint(self, decoder_state: dict, joint_state: dict) -> None:
        """Load NeMo's `decoder.prediction.*` and `joint.*` weights (strict)."""
        self.prediction.load_state_dict({k.removeprefix("prediction."): v for k, v in decoder_state.items()})
        self.joint.load_state_dict(joint_state)

    @torch.no_grad()
    def start_state(self, batch: int, dtype: torch.dtype, device: torch.device):
        """Prediction output and LSTM state after the start symbol (the blank), for `batch` clips."""
        layers, hidden = self.config.pred_rnn_layers, self.config.pred_hidden
        zeros = torch.zeros(layers, batch, hidden, dtype=dtype, device=device)
        start = torch.full((batch,), self.config.blank_id, dtype=torch.long, device=device)
        output, (h, c) = self.prediction(start, (zeros, zeros.clone()))
        return self.joint.pred(output), h, c

    def _reset(self, state: LoopState, encoder_output: torch.Tensor, lengths: torch.Tensor) -> None:
        batch, steps, _ = encoder_output.shape
        state.encoder_projected.zero_()
        state.encoder_projected[:batch, :steps].copy_(self.joint.enc(encoder_output))
        state.lengths.zero_()
        state.lengths[:batch].copy_(lengths)
        state.time.zero_()
        torch.less(state.time, state.lengths, out=state.active)
        start_output, start_hidden, start_cell = self.start_state(state.batch, state.hidden.dtype, state.hidden.device)
        state.prediction_projected.copy_(start_output)
        state.hidden.copy_(start_hidden)
        state.cell.copy_(start_cell)
        state.last_emit_frame.fill_(-1)
        state.emits_on_frame.zero_()
        state.emitted.zero_()

    def step(self, s: LoopState) -> None:
        """One micro-step for every active clip: a blank (time advances) or a token (emitted, predictor advances)."""
        cfg = self.config
        vocab_and_blank = cfg.vocab_size + 1
        rows = torch.arange(s.batch, device=s.time.device)
        frame = torch.minimum(s.time, (s.lengths - 1).clamp(min=0))
        logits = self.joint.logits(s.encoder_projected[rows, frame], s.prediction_projected)
        token = logits[:, :vocab_and_blank].argmax(dim=-1)
        duration = self.duration_values[logits[:, vocab_and_blank:].argmax(dim=-1)]
        blank = token == cfg.blank_id
        duration = torch.where(blank & (duration == 0), torch.ones_like(duration), duration)
        emit = s.active & ~blank

        slot = s.emitted.clamp(max=s.capacity).unsqueeze(1)
        s.tokens.scatter_(1, slot, token.unsqueeze(1))
        s.frames.scatter_(1, slot, s.time.unsqueeze(1))
        s.durations.scatter_(1, slot, duration.unsqueeze(1))
        s.emitted.add_(emit.long())
        same_frame = s.last_emit_frame == s.time
        s.emits_on_frame.copy_(torch.where(emit, torch.where(same_frame, s.emits_on_frame + 1, 1), s.emits_on_frame))
        s.last_emit_frame.copy_(torch.where(emit, s.time, s.last_emit_frame))

        # On the CPU a host check is free, so blank-only steps skip the prediction network; a CUDA graph
        # cannot branch, so there every step runs it and keeps the result only where a token was emitted.
        if s.time.is_cuda or bool(emit.any()):
            output, (hidden, cell) = self.prediction(token, (s.hidden, s.cell))
            s.prediction_projected.copy_(torch.where(emit[:, None], self.joint.pred(output), s.prediction_projected))
            s.hidden.copy_(torch.where(emit[None, :, None], hidden, s.hidden))
            s.cell.copy_(torch.where(emit[None, :, None], cell, s.cell))

        s.time.add_(torch.where(s.active, duration, 0))
        stuck = emit & (s.emits_on_frame >= cfg.max_symbols) & (s.last_emit_frame == s.time)
        s.time.add_(stuck.long())
        torch.less(s.time, s.lengths, out=s.active)

    def _hypotheses(self, state: LoopState, batch: int) -> list[Hypothesis]:
        counts = state.emitted[:batch].tolist()
        tokens = state.tokens[:batch].tolist()
        frames = state.frames[:batch].tolist()
        durations = state.durations[:batch].tolist()
        return [Hypothesis(tokens[i][:n], frames[i][:n], durations[i][:n]) for i, n in enumerate(counts)]

    @torch.no_grad()
    def forward(self, encoder_output: torch.Tensor, lengths: torch.Tensor) -> list[Hypothesis]:
        """Greedy TDT hypotheses for encoder frames [B, T, D] with valid lengths [B]."""
        batch, steps, _ = encoder_output.shape
        if batch == 0:
            return []
        lengths = lengths.to(device=encoder_output.device, dtype=torch.long)
        encoder_output = encoder_output.to(self.joint.enc.weight.dtype)
        if encoder_output.device.type == "cuda" and self.use_cuda_graph:
            return self._decode_graphed(encoder_output, lengths)
        state = LoopState.allocate(
            batch, steps, self.config.joint_hidden, self.config.pred_rnn_layers, self.config.pred_hidden,
            max(1, steps * self.config.max_symbols), encoder_output.dtype, encoder_output.device,
        )
        self._reset(state, encoder_output, lengths)
        with _one_intra_op_thread():
            while bool(state.active.any()):
                self.step(state)
        return self._hypotheses(state, batch)

    def _decode_graphed(self, encoder_output: torch.Tensor, lengths: torch.Tensor) -> list[Hypothesis]:
        batch, steps, _ = encoder_output.shape
        bucket = 1 << (batch - 1).bit_length()
        with self._lock:
            graphed = self._graphs.get(bucket)
            if graphed is None or graphed.state.encoder_projected.shape[1] < steps:
                capacity_steps = max(steps, graphed.state.encoder_projected.shape[1] * 2 if graphed else 0, 64)
                graphed = _GraphedLoop(self, bucket, capacity_steps, encoder_output.dtype, encoder_output.device)
                self._graphs[bucket] = graphed
            self._reset(graphed.state, encoder_output, lengths)
            limit = steps * (self.config.max_symbols + 1)
            replays = 0
            while bool(graphed.state.active.any()):
                graphed.replay()
                replays += 1
                if replays * self.steps_per_replay > limit + self.steps_per_replay:
                    raise RuntimeError("TDT decoding did not terminate within its step bound")
            return self._hypotheses(graphed.state, batch)


class _GraphedLoop:
    """A CUDA graph of `steps_per_replay` label-loop steps over static buffers for one batch-size bucket."""

    def __init__(self, decoder: TDTGreedyDecoder, batch: int, steps: int, dtype: torch.dtype, device: torch.device):
        cfg = decoder.config
        self.state = LoopState.allocate(batch, steps, cfg.joint_hidden, cfg.pred_rnn_layers, cfg.pred_hidden,
                                        steps * cfg.max_symbols, dtype, device)
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                decoder.step(self.state)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=side):
            for _ in range(decoder.steps_per_replay):
                decoder.step(self.state)

    def replay(self) -> None:
        self.graph.replay()
