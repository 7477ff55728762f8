"""Greedy TDT label loops: one statement of NeMo's frame-advance rule, three ways to run it over a batch.

The rule (`advance`), per clip and micro-step, after the joint has scored the current frame against the prediction
network's output (token: argmax over vocabulary + blank; duration: argmax over the duration logits, separately):
- a blank advances time by its duration, forced to at least 1; the prediction network does not move;
- a token is emitted at the current frame with its duration, the prediction network consumes it, and time
  advances by the duration (possibly 0);
- once `max_symbols` tokens have been emitted on one frame and time has not moved, time advances by 1.

The loops (`LOOPS`, chosen per call by `TDTGreedyDecoder.decode_from(loop=...)`; "auto" picks by device):
- `HostLoop` ("host", the CPU's): driven from Python; each micro-step scores only the clips still decoding and
  runs the prediction network only for the clips that emitted, with weights packed once for oneDNN;
- `FixedShapeLoop` ("fixed_shape", any device): fixed shapes and in-place updates only, every clip every step;
- `GraphedLoop` ("cuda_graph", CUDA): the fixed-shape step captured into a CUDA graph, replayed
  `steps_per_replay` steps at a time, the host checking for completion between replays.

Each starts a clip from the start symbol (the blank fed to a zero state) or from a `DecoderState` where an earlier
call stopped (streaming), and returns the state where it stops.
"""

from __future__ import annotations

import operator
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from . import kernels
from .types import Hypothesis

if TYPE_CHECKING:
    from .decoder import TDTGreedyDecoder


class _ScalarOps:
    where = staticmethod(lambda condition, a, b: a if condition else b)
    logical_not = staticmethod(operator.not_)


class _TensorOps:
    where = staticmethod(torch.where)
    logical_not = staticmethod(torch.logical_not)


def advance(ops: Any, time, blank, duration, emits_on_frame, last_emit_frame, max_symbols: int, active=True):
    """NeMo's TDT frame-advance rule for one micro-step, on Python scalars (`_ScalarOps`) or on tensors of a batch
    (`_TensorOps`, where `active` masks the clips already done). Returns (time, duration, emitted, emits_on_frame,
    last_emit_frame) after the step; `duration` is the one recorded with an emitted token."""
    duration = ops.where(blank & (duration == 0), 1, duration)
    emitted = active & ops.logical_not(blank)
    emits_on_frame = ops.where(emitted, ops.where(last_emit_frame == time, emits_on_frame + 1, 1), emits_on_frame)
    last_emit_frame = ops.where(emitted, time, last_emit_frame)
    time = time + ops.where(active, duration, 0)
    stuck = emitted & (emits_on_frame >= max_symbols) & (last_emit_frame == time)
    return time + stuck, duration, emitted, emits_on_frame, last_emit_frame


def lstm_cell(gates: torch.Tensor, cell: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """nn.LSTM's cell update from the summed gate pre-activations (order i, f, g, o): new (hidden, cell)."""
    input_gate, forget_gate, candidate, output_gate = gates.chunk(4, dim=-1)
    cell = torch.sigmoid(forget_gate) * cell + torch.sigmoid(input_gate) * torch.tanh(candidate)
    return torch.sigmoid(output_gate) * torch.tanh(cell), cell


def stacked_lstm_step(first_layer_input: torch.Tensor, hidden: Sequence[torch.Tensor], cell: Sequence[torch.Tensor],
                      input_product: Callable[[int, torch.Tensor], torch.Tensor],
                      hidden_product: Callable[[int, torch.Tensor], torch.Tensor]):
    """One step of a stacked LSTM whose first layer's input product is given (`first_layer_input`), the other
    products coming from `input_product(layer, x)` / `hidden_product(layer, h)`: (output, [hidden], [cell])."""
    x, new_hidden, new_cell = first_layer_input, [], []
    for layer in range(len(hidden)):
        layer_input = x if layer == 0 else input_product(layer, x)
        x, c = lstm_cell(layer_input + hidden_product(layer, hidden[layer]), cell[layer])
        new_hidden.append(x)
        new_cell.append(c)
    return x, new_hidden, new_cell


@dataclass
class DecoderState:
    """Where greedy decoding of a batch of clips stopped, so that it can continue on their next encoder frames.

    Streaming decodes a clip chunk by chunk (NeMo's `BatchedLabelLoopingState`): the prediction network's LSTM
    state and its (joint-projected) output after the last emitted token carry over, and so does the time index, as
    `time_offset`: the frame, counted from the start of the next frames, at which decoding resumes (0, or more when
    the last duration jumped past the end of the decoded frames; NeMo's `time_jumps`). The count of symbols emitted
    on one frame does not carry over: a frame belongs to one call. Tensors are on the decoder's device and dtype.
    """

    hidden: torch.Tensor  # [L, B, P]
    cell: torch.Tensor  # [L, B, P]
    prediction: torch.Tensor  # [B, H]
    time_offset: torch.Tensor  # [B] long

    @property
    def batch(self) -> int:
        return self.prediction.shape[0]

    def select(self, rows: Sequence[int]) -> "DecoderState":
        """The state of the clips `rows`, in that order."""
        index = torch.as_tensor(list(rows), dtype=torch.long, device=self.prediction.device)
        return DecoderState(self.hidden[:, index], self.cell[:, index], self.prediction[index],
                            self.time_offset[index.to(self.time_offset.device)])

    @staticmethod
    def cat(states: Sequence["DecoderState"]) -> "DecoderState":
        """One batch of the clips of `states`, in order."""
        return DecoderState(torch.cat([s.hidden for s in states], dim=1), torch.cat([s.cell for s in states], dim=1),
                            torch.cat([s.prediction for s in states]), torch.cat([s.time_offset for s in states]))


# ------------------------------------------------------------------------------------------------- host loop


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
        self.feed(torch.full((batch,), self.blank_id, dtype=torch.long, device=device), rows, hidden, cell, projected)
        return hidden, cell, projected

    def feed(self, tokens: torch.Tensor, rows: torch.Tensor, hidden: torch.Tensor, cell: torch.Tensor,
             projected: torch.Tensor) -> None:
        """Feed `tokens` to the prediction network for the clips `rows`, updating their state in place."""
        output, new_hidden, new_cell = stacked_lstm_step(
            self.first_layer_input[tokens], hidden[:, rows], cell[:, rows],
            lambda layer, x: self.input_products[layer](x), lambda layer, h: self.hidden_products[layer](h))
        hidden[:, rows] = torch.stack(new_hidden)
        cell[:, rows] = torch.stack(new_cell)
        projected[rows] = self.prediction_projection(output)


class HostLoop:
    """The label loop driven from Python, for the CPU, where reading results on the host costs nothing."""

    def __init__(self, decoder: "TDTGreedyDecoder"):
        self.decoder = decoder
        self._weights: _HostLoopWeights | None = None
        self._weights_key: tuple = ()
        self._lock = threading.Lock()

    def weights(self) -> _HostLoopWeights:
        """The packed weights, rebuilt whenever a parameter of the decoder changed."""
        key = self.decoder.weights_key()
        with self._lock:
            if self._weights is None or self._weights_key != key:
                self._weights, self._weights_key = _HostLoopWeights(self.decoder), key
            return self._weights

    def initial_state(self, batch: int, device: torch.device | None = None) -> DecoderState:
        """The start symbol fed to a zero state, with this loop's products (the CPU's; `device` is the CPU)."""
        hidden, cell, prediction = self.weights().start(batch)
        return DecoderState(hidden, cell, prediction, torch.zeros(batch, dtype=torch.long))

    def run(self, encoder_output: torch.Tensor, lengths: torch.Tensor,
            start: DecoderState | None) -> tuple[list[Hypothesis], DecoderState]:
        cfg = self.decoder.config
        weights = self.weights()
        vocab_and_blank = cfg.vocab_size + 1
        batch = encoder_output.shape[0]
        encoder_projected = weights.encoder_projection(encoder_output)
        start = start if start is not None else self.initial_state(batch)
        hidden, cell, prediction_projected = start.hidden.clone(), start.cell.clone(), start.prediction.clone()
        time = start.time_offset.tolist()
        limits = lengths.tolist()
        last_emit_frame = [-1] * batch
        emits_on_frame = [0] * batch
        hypotheses = [Hypothesis([], [], []) for _ in range(batch)]
        active = [clip for clip in range(batch) if time[clip] < limits[clip]]
        while active:
            rows = torch.tensor(active)
            frames = torch.tensor([time[clip] for clip in active])
            logits = weights.output(torch.relu(encoder_projected[rows, frames] + prediction_projected[rows]))
            tokens = logits[:, :vocab_and_blank].argmax(dim=-1).tolist()
            durations = logits[:, vocab_and_blank:].argmax(dim=-1).tolist()
            emitted = []
            for position, clip in enumerate(active):
                token = tokens[position]
                frame = time[clip]
                time[clip], duration, emit, emits_on_frame[clip], last_emit_frame[clip] = advance(
                    _ScalarOps, frame, token == cfg.blank_id, cfg.durations[durations[position]],
                    emits_on_frame[clip], last_emit_frame[clip], cfg.max_symbols)
                if emit:
                    hypotheses[clip].token_ids.append(token)
                    hypotheses[clip].token_frames.append(frame)
                    hypotheses[clip].token_durations.append(duration)
                    emitted.append(position)
            if emitted:
                weights.feed(torch.tensor([tokens[p] for p in emitted]), rows[emitted], hidden, cell,
                             prediction_projected)
            active = [clip for clip in active if time[clip] < limits[clip]]
        time_offset = torch.tensor([t - n for t, n in zip(time, limits)], dtype=torch.long)
        return hypotheses, DecoderState(hidden, cell, prediction_projected, time_offset)


# ------------------------------------------------------------------------------------- fixed-shape loops


@dataclass
class LoopState:
    """Every tensor the fixed-shape label loop reads or writes, preallocated with fixed shapes."""

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
    def allocate(cls, decoder: "TDTGreedyDecoder", batch: int, steps: int, capacity: int, dtype: torch.dtype,
                 device: torch.device) -> "LoopState":
        cfg = decoder.config

        def longs(*shape):
            return torch.zeros(shape, dtype=torch.long, device=device)

        return cls(
            encoder_projected=torch.zeros(batch, steps, cfg.joint_hidden, dtype=dtype, device=device),
            lengths=longs(batch),
            time=longs(batch),
            active=torch.zeros(batch, dtype=torch.bool, device=device),
            prediction_projected=torch.zeros(batch, cfg.joint_hidden, dtype=dtype, device=device),
            hidden=torch.zeros(cfg.pred_rnn_layers, batch, cfg.pred_hidden, dtype=dtype, device=device),
            cell=torch.zeros(cfg.pred_rnn_layers, batch, cfg.pred_hidden, dtype=dtype, device=device),
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

    def hypotheses(self, batch: int) -> list[Hypothesis]:
        counts = self.emitted[:batch].tolist()
        tokens = self.tokens[:batch].tolist()
        frames = self.frames[:batch].tolist()
        durations = self.durations[:batch].tolist()
        return [Hypothesis(tokens[i][:n], frames[i][:n], durations[i][:n]) for i, n in enumerate(counts)]

    def final_state(self, batch: int) -> DecoderState:
        return DecoderState(self.hidden[:, :batch].clone(), self.cell[:, :batch].clone(),
                            self.prediction_projected[:batch].clone(), self.time[:batch] - self.lengths[:batch])


class FixedShapeLoop:
    """The graph-capturable step (fixed shapes, in-place updates of `LoopState`), run eagerly until every clip is
    done: any device."""

    def __init__(self, decoder: "TDTGreedyDecoder"):
        self.decoder = decoder

    def initial_state(self, batch: int, device: torch.device | None = None) -> DecoderState:
        """The start symbol fed to a zero state through the prediction network, on `device`."""
        device = device if device is not None else self.decoder.joint.enc.weight.device
        prediction, hidden, cell = self.decoder.start_state(batch, self.decoder.joint.enc.weight.dtype, device)
        return DecoderState(hidden, cell, prediction, torch.zeros(batch, dtype=torch.long, device=device))

    def reset(self, state: LoopState, encoder_output: torch.Tensor, lengths: torch.Tensor,
              start: DecoderState | None) -> None:
        batch, steps, _ = encoder_output.shape
        state.encoder_projected.zero_()
        state.encoder_projected[:batch, :steps].copy_(self.decoder.joint.enc(encoder_output))
        state.lengths.zero_()
        state.lengths[:batch].copy_(lengths)
        state.time.zero_()
        padding = self.initial_state(state.batch, state.hidden.device)
        state.prediction_projected.copy_(padding.prediction)
        state.hidden.copy_(padding.hidden)
        state.cell.copy_(padding.cell)
        state.last_emit_frame.fill_(-1)
        state.emits_on_frame.zero_()
        state.emitted.zero_()
        if start is not None:
            state.prediction_projected[:batch].copy_(start.prediction)
            state.hidden[:, :batch].copy_(start.hidden)
            state.cell[:, :batch].copy_(start.cell)
            state.time[:batch].copy_(start.time_offset)
        torch.less(state.time, state.lengths, out=state.active)

    def step(self, s: LoopState) -> None:
        """One micro-step for every active clip: a blank (time advances) or a token (emitted, predictor advances)."""
        decoder, cfg = self.decoder, self.decoder.config
        vocab_and_blank = cfg.vocab_size + 1
        rows = torch.arange(s.batch, device=s.time.device)
        frame = torch.minimum(s.time, (s.lengths - 1).clamp(min=0))
        logits = decoder.joint.logits(s.encoder_projected[rows, frame], s.prediction_projected)
        token = logits[:, :vocab_and_blank].argmax(dim=-1)
        duration = decoder.duration_values[logits[:, vocab_and_blank:].argmax(dim=-1)]
        time, duration, emit, emits_on_frame, last_emit_frame = advance(
            _TensorOps, s.time, token == cfg.blank_id, duration, s.emits_on_frame, s.last_emit_frame,
            cfg.max_symbols, s.active)

        slot = s.emitted.clamp(max=s.capacity).unsqueeze(1)
        s.tokens.scatter_(1, slot, token.unsqueeze(1))
        s.frames.scatter_(1, slot, s.time.unsqueeze(1))
        s.durations.scatter_(1, slot, duration.unsqueeze(1))
        s.emitted.add_(emit.long())
        s.emits_on_frame.copy_(emits_on_frame)
        s.last_emit_frame.copy_(last_emit_frame)

        # A CUDA graph cannot branch: there every step runs the prediction network and keeps its result only
        # where a token was emitted. Run eagerly elsewhere, blank-only steps skip it.
        if s.time.is_cuda or bool(emit.any()):
            output, (hidden, cell) = decoder.prediction(token, (s.hidden, s.cell))
            s.prediction_projected.copy_(torch.where(emit[:, None], decoder.joint.pred(output), s.prediction_projected))
            s.hidden.copy_(torch.where(emit[None, :, None], hidden, s.hidden))
            s.cell.copy_(torch.where(emit[None, :, None], cell, s.cell))

        s.time.copy_(time)
        torch.less(s.time, s.lengths, out=s.active)

    def run(self, encoder_output: torch.Tensor, lengths: torch.Tensor,
            start: DecoderState | None) -> tuple[list[Hypothesis], DecoderState]:
        batch, steps, _ = encoder_output.shape
        state = LoopState.allocate(self.decoder, batch, steps, max(1, steps * self.decoder.config.max_symbols),
                                   encoder_output.dtype, encoder_output.device)
        self.reset(state, encoder_output, lengths, start)
        while bool(state.active.any()):
            self.step(state)
        return state.hypotheses(batch), state.final_state(batch)


class _CapturedSteps:
    """A CUDA graph of `steps_per_replay` fixed-shape steps over static buffers for one batch-size bucket."""

    def __init__(self, loop: FixedShapeLoop, batch: int, steps: int, steps_per_replay: int, dtype: torch.dtype,
                 device: torch.device):
        self.state = LoopState.allocate(loop.decoder, batch, steps, steps * loop.decoder.config.max_symbols,
                                        dtype, device)
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                loop.step(self.state)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=side):
            for _ in range(steps_per_replay):
                loop.step(self.state)

    def replay(self) -> None:
        self.graph.replay()


class GraphedLoop(FixedShapeLoop):
    """The fixed-shape step captured into CUDA graphs (one per power-of-two batch bucket, grown with the longest
    input seen), replayed until every clip is done."""

    def __init__(self, decoder: "TDTGreedyDecoder", steps_per_replay: int = 8):
        super().__init__(decoder)
        self.steps_per_replay = steps_per_replay
        self._graphs: dict[int, _CapturedSteps] = {}
        self._lock = threading.Lock()

    def run(self, encoder_output: torch.Tensor, lengths: torch.Tensor,
            start: DecoderState | None) -> tuple[list[Hypothesis], DecoderState]:
        batch, steps, _ = encoder_output.shape
        bucket = 1 << (batch - 1).bit_length()
        with self._lock:
            graphed = self._graphs.get(bucket)
            if graphed is None or graphed.state.encoder_projected.shape[1] < steps:
                capacity_steps = max(steps, graphed.state.encoder_projected.shape[1] * 2 if graphed else 0, 64)
                graphed = _CapturedSteps(self, bucket, capacity_steps, self.steps_per_replay, encoder_output.dtype,
                                         encoder_output.device)
                self._graphs[bucket] = graphed
            self.reset(graphed.state, encoder_output, lengths, start)
            limit = steps * (self.decoder.config.max_symbols + 1)
            replays = 0
            while bool(graphed.state.active.any()):
                graphed.replay()
                replays += 1
                if replays * self.steps_per_replay > limit + self.steps_per_replay:
                    raise RuntimeError("TDT decoding did not terminate within its step bound")
            return graphed.state.hypotheses(batch), graphed.state.final_state(batch)


LOOPS = {"host": HostLoop, "fixed_shape": FixedShapeLoop, "cuda_graph": GraphedLoop}
"""The label loops by name; `TDTGreedyDecoder` also accepts "auto" (cuda_graph on CUDA, host on the CPU)."""
