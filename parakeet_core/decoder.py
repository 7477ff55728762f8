"""TDT greedy decoding: prediction network, joint network, and the batched label loop (CPU loop or CUDA graph).

The loop follows NeMo's greedy TDT decoding rule for rule, per clip:
- the joint scores the current frame against the prediction network's output; the token is the argmax over
  the vocabulary plus blank, the duration the argmax over the duration logits, taken separately;
- a blank advances time by its duration, forced to at least 1; the prediction network does not move;
- a token is emitted at the current frame with its duration, the prediction network consumes it, and time
  advances by the duration (possibly 0);
- once `max_symbols` tokens have been emitted on one frame and time has not moved, time advances by 1.

All clips of a batch advance together, one micro-step (a blank or a token per active clip) at a time. On the GPU
the step is written with fixed shapes and in-place updates only and is captured into a CUDA graph; the host checks
for completion only every `steps_per_replay` steps. On the CPU the loop is driven from Python: each micro-step
scores only the clips still decoding and runs the prediction network only for the clips that emitted a token.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from torch import nn

from . import kernels
from .config import DecoderConfig
from .types import Hypothesis


def _lstm_cell(gates: torch.Tensor, cell: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """nn.LSTM's cell update from the summed gate pre-activations (order i, f, g, o): new (hidden, cell)."""
    input_gate, forget_gate, candidate, output_gate = gates.chunk(4, dim=-1)
    cell = torch.sigmoid(forget_gate) * cell + torch.sigmoid(input_gate) * torch.tanh(candidate)
    return torch.sigmoid(output_gate) * torch.tanh(cell), cell


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
                kernels.linear(x, getattr(lstm, f"weight_ih_l{layer}"), getattr(lstm, f"bias_ih_l{layer}"))
                + kernels.linear(hidden[layer], getattr(lstm, f"weight_hh_l{layer}"), getattr(lstm, f"bias_hh_l{layer}"))
            )
            x, c = _lstm_cell(gates, cell[layer])
            new_hidden.append(x)
            new_cell.append(c)
        return x, (torch.stack(new_hidden), torch.stack(new_cell))


class JointNetwork(nn.Module):
    """Projects encoder and prediction outputs to a shared space; ReLU; logits over vocab + blank + durations."""

    def __init__(self, encoder_dim: int, config: DecoderConfig):
        super().__init__()
        self.enc = kernels.Linear(encoder_dim, config.joint_hidden)
        self.pred = kernels.Linear(config.pred_hidden, config.joint_hidden)
        self.joint_net = nn.Sequential(
            nn.ReLU(), nn.Identity(), kernels.Linear(config.joint_hidden, config.vocab_size + 1 + len(config.durations))
        )

    def logits(self, encoder_projected: torch.Tensor, prediction_projected: torch.Tensor) -> torch.Tensor:
        return self.joint_net(encoder_projected + prediction_projected)


class _HostLoopWeights:
    """The decoder's weights arranged for the host-driven CPU label loop.

    Every product goes through `kernels.fixed_linear` (packed once for oneDNN in fp32), and the first LSTM
    layer's input product, which depends on the token alone, is precomputed for every token: a token step then
    streams three of the LSTM's four weight matrices instead of four. With oneDNN's packed weights each output row
    is computed independently of the other rows, so the table rows equal the per-step products exactly (tested).
    """

    def __init__(self, decoder: "TDTGreedyDecoder"):
        lstm = decoder.prediction.dec_rnn.lstm
        joint = decoder.joint
        output = joint.joint_net[-1]
        self.layers = lstm.num_layers
        self.encoder_projection = kernels.fixed_linear(joint.enc.weight, joint.enc.bias)
        self.prediction_projection = kernels.fixed_linear(joint.pred.weight, joint.pred.bias)
        self.output = kernels.fixed_linear(output.weight, output.bias)
        self.input_products = [
            kernels.fixed_linear(getattr(lstm, f"weight_ih_l{layer}"), getattr(lstm, f"bias_ih_l{layer}"))
            for layer in range(self.layers)
        ]
        self.hidden_products = [
            kernels.fixed_linear(getattr(lstm, f"weight_hh_l{layer}"), getattr(lstm, f"bias_hh_l{layer}"))
            for layer in range(self.layers)
        ]
        with torch.no_grad():
            self.first_layer_input = self.input_products[0](decoder.prediction.embed.weight)  # [vocab + 1, 4P]
        self.blank_id = decoder.config.blank_id
        self.hidden_size = lstm.hidden_size
        self.joint_hidden = joint.pred.out_features

    def start(self, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """LSTM hidden and cell [L, B, P] and projected prediction [B, H] after the start symbol (the blank)."""
        dtype, device = self.first_layer_input.dtype, self.first_layer_input.device
        hidden = torch.zeros(self.layers, batch, self.hidden_size, dtype=dtype, device=device)
        cell = torch.zeros_like(hidden)
        projected = torch.zeros(batch, self.joint_hidden, dtype=dtype, device=device)
        rows = torch.arange(batch, device=device)
        self.advance(torch.full((batch,), self.blank_id, dtype=torch.long, device=device), rows, hidden, cell, projected)
        return hidden, cell, projected

    def advance(self, tokens: torch.Tensor, rows: torch.Tensor, hidden: torch.Tensor, cell: torch.Tensor,
                projected: torch.Tensor) -> None:
        """Feed `tokens` to the prediction network for the clips `rows`, updating their state in place."""
        x = self.first_layer_input[tokens]
        for layer in range(self.layers):
            layer_input = x if layer == 0 else self.input_products[layer](x)
            x, c = _lstm_cell(layer_input + self.hidden_products[layer](hidden[layer, rows]), cell[layer, rows])
            hidden[layer, rows] = x
            cell[layer, rows] = c
        projected[rows] = self.prediction_projection(x)


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
        self._host_weights: _HostLoopWeights | None = None
        self._host_weights_key: tuple = ()
        self._lock = threading.Lock()

    def _weights_key(self) -> tuple:
        """Changes whenever a parameter is replaced or modified in place (the host loop's weights are derived)."""
        try:
            return tuple((p.data_ptr(), p._version) for p in self.parameters())
        except RuntimeError:  # parameters created under inference_mode carry no version counter
            return tuple(p.data_ptr() for p in self.parameters())

    def _apply(self, fn, *args, **kwargs):
        # Moving or casting the module invalidates everything derived from its weights.
        self._graphs, self._host_weights = {}, None
        return super()._apply(fn, *args, **kwargs)

    def load_checkpoint(self, decoder_state: dict, joint_state: dict) -> None:
        """Load NeMo's `decoder.prediction.*` and `joint.*` weights (strict)."""
        self.prediction.load_state_dict({k.removeprefix("prediction."): v for k, v in decoder_state.items()})
        self.joint.load_state_dict(joint_state)
        self._graphs, self._host_weights = {}, None

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

        # A CUDA graph cannot branch: there every step runs the prediction network and keeps its result only
        # where a token was emitted. Run eagerly elsewhere, blank-only steps skip it.
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
        if encoder_output.device.type == "cpu":
            return self._decode_on_host(encoder_output, lengths)
        return self._decode_fixed_shape(encoder_output, lengths)

    def _decode_fixed_shape(self, encoder_output: torch.Tensor, lengths: torch.Tensor) -> list[Hypothesis]:
        """The graph-capturable `step` run eagerly until every clip is done (any device)."""
        batch, steps, _ = encoder_output.shape
        state = LoopState.allocate(
            batch, steps, self.config.joint_hidden, self.config.pred_rnn_layers, self.config.pred_hidden,
            max(1, steps * self.config.max_symbols), encoder_output.dtype, encoder_output.device,
        )
        self._reset(state, encoder_output, lengths)
        while bool(state.active.any()):
            self.step(state)
        return self._hypotheses(state, batch)

    def _decode_on_host(self, encoder_output: torch.Tensor, lengths: torch.Tensor) -> list[Hypothesis]:
        """The label loop driven from Python, for the CPU, where reading results on the host costs nothing.

        Same rule as `step`, but each micro-step computes the joint only for the clips still decoding and the
        prediction network only for the clips that emitted a token, instead of fixed-shape work for all.
        """
        cfg = self.config
        key = self._weights_key()
        with self._lock:
            if self._host_weights is None or self._host_weights_key != key:
                self._host_weights, self._host_weights_key = _HostLoopWeights(self), key
            weights = self._host_weights
        vocab_and_blank = cfg.vocab_size + 1
        batch = encoder_output.shape[0]
        encoder_projected = weights.encoder_projection(encoder_output)
        hidden, cell, prediction_projected = weights.start(batch)
        limits = lengths.tolist()
        time = [0] * batch
        last_emit_frame = [-1] * batch
        emits_on_frame = [0] * batch
        hypotheses = [Hypothesis([], [], []) for _ in range(batch)]
        active = [clip for clip in range(batch) if limits[clip] > 0]
        while active:
            rows = torch.tensor(active)
            frames = torch.tensor([time[clip] for clip in active])
            joint_input = encoder_projected[rows, frames] + prediction_projected[rows]
            logits = weights.output(torch.relu(joint_input))
            tokens = logits[:, :vocab_and_blank].argmax(dim=-1).tolist()
            durations = logits[:, vocab_and_blank:].argmax(dim=-1).tolist()
            emitted = []
            for position, clip in enumerate(active):
                token, duration = tokens[position], cfg.durations[durations[position]]
                if token == cfg.blank_id:
                    time[clip] += max(duration, 1)
                    continue
                hypothesis = hypotheses[clip]
                hypothesis.token_ids.append(token)
                hypothesis.token_frames.append(time[clip])
                hypothesis.token_durations.append(duration)
                emits_on_frame[clip] = emits_on_frame[clip] + 1 if last_emit_frame[clip] == time[clip] else 1
                last_emit_frame[clip] = time[clip]
                time[clip] += duration
                if emits_on_frame[clip] >= cfg.max_symbols and time[clip] == last_emit_frame[clip]:
                    time[clip] += 1
                emitted.append(position)
            if emitted:
                weights.advance(torch.tensor([tokens[p] for p in emitted]), rows[emitted], hidden, cell,
                                prediction_projected)
            active = [clip for clip in active if time[clip] < limits[clip]]
        return hypotheses

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
