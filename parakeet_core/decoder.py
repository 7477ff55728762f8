"""TDT decoder networks: the prediction network (embedding + stacked LSTM) and the joint network, and
`TDTGreedyDecoder`, which holds them and runs greedy decoding with one of the label loops of `decoding.py`
(the CPU's host-driven loop, the fixed-shape loop, or that loop captured into CUDA graphs).

Streaming decodes a clip's frames chunk by chunk: `decode_from` starts from a `DecoderState` (prediction-network
state and output, time offset past the previous frames) and returns the state where it stopped, in every loop.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch import nn

from . import kernels
from .config import DecoderConfig
from .decoding import LOOPS, DecoderState, GraphedLoop, stacked_lstm_step
from .types import Hypothesis

__all__ = ["DecoderState", "JointNetwork", "PredictionNetwork", "TDTGreedyDecoder"]


class PredictionNetwork(nn.Module):
    """Token embedding (the blank id is the zero padding row) followed by a stacked LSTM."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        rows = config.vocab_size + 1
        self.embed = nn.Embedding(rows, config.pred_hidden, padding_idx=config.blank_id,
                                  _weight=torch.empty(rows, config.pred_hidden))
        # nn.Embedding's initialisation, skipped on the meta device (its normal_ there imports torch._dynamo, 3 s).
        if not self.embed.weight.is_meta:
            self.embed.reset_parameters()
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

        def product(kind: str, layer: int, value: torch.Tensor) -> torch.Tensor:
            return kernels.linear(value, getattr(lstm, f"weight_{kind}_l{layer}"), getattr(lstm, f"bias_{kind}_l{layer}"))

        hidden, cell = state
        output, new_hidden, new_cell = stacked_lstm_step(
            product("ih", 0, x), hidden, cell, lambda layer, value: product("ih", layer, value),
            lambda layer, value: product("hh", layer, value))
        return output, (torch.stack(new_hidden), torch.stack(new_cell))


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


class TDTGreedyDecoder(nn.Module):
    """Prediction + joint networks and greedy TDT decoding of a padded batch of encoder frames.

    `loop` picks the label loop per call (`decoding.LOOPS`): "auto" (the default) is "cuda_graph" on CUDA, "host"
    on the CPU and "fixed_shape" elsewhere; every loop gives the same hypotheses for the same inputs in fp32."""

    def __init__(self, encoder_dim: int, config: DecoderConfig, steps_per_replay: int = 8):
        super().__init__()
        self.config = config
        self.prediction = PredictionNetwork(config)
        self.joint = JointNetwork(encoder_dim, config)
        # On the CPU even when the module is built on the meta device: it is not in the checkpoint.
        self.register_buffer("duration_values", torch.tensor(config.durations, dtype=torch.long, device="cpu"),
                             persistent=False)
        self.steps_per_replay = steps_per_replay
        self._loops: dict[str, Any] = {}
        self._lock = threading.Lock()

    def weights_key(self) -> tuple:
        """Changes whenever a parameter is replaced or modified in place (the host loop's weights are derived)."""
        try:
            return tuple((p.data_ptr(), p._version) for p in self.parameters())
        except RuntimeError:  # parameters created under inference_mode carry no version counter
            return tuple(p.data_ptr() for p in self.parameters())

    def _apply(self, fn, *args, **kwargs):
        # Moving or casting the module invalidates everything the loops derived from its weights.
        self._loops = {}
        return super()._apply(fn, *args, **kwargs)

    def label_loop(self, loop: str, device: torch.device):
        """The label loop `loop` ("auto" or a name in `decoding.LOOPS`) for inputs on `device`, made once."""
        if loop == "auto":
            loop = "cuda_graph" if device.type == "cuda" else "host" if device.type == "cpu" else "fixed_shape"
        if loop not in LOOPS:
            raise ValueError(f"loop must be auto or one of {', '.join(LOOPS)}; got {loop!r}")
        if (loop == "cuda_graph") != (device.type == "cuda") and loop != "fixed_shape":
            raise ValueError(f"the {loop!r} loop cannot run on {device.type}")
        with self._lock:
            if loop not in self._loops:
                self._loops[loop] = (GraphedLoop(self, self.steps_per_replay) if loop == "cuda_graph"
                                     else LOOPS[loop](self))
            return self._loops[loop]

    @torch.no_grad()
    def start_state(self, batch: int, dtype: torch.dtype, device: torch.device):
        """Prediction output and LSTM state after the start symbol (the blank), for `batch` clips."""
        layers, hidden = self.config.pred_rnn_layers, self.config.pred_hidden
        zeros = torch.zeros(layers, batch, hidden, dtype=dtype, device=device)
        start = torch.full((batch,), self.config.blank_id, dtype=torch.long, device=device)
        output, (h, c) = self.prediction(start, (zeros, zeros.clone()))
        return self.joint.pred(output), h, c

    @torch.no_grad()
    def initial_state(self, batch: int, device: torch.device | str | None = None, *, loop: str = "auto") -> DecoderState:
        """The state before the first frame of `batch` clips: the start symbol (the blank) fed, time 0, computed
        as `loop` on `device` (default: the decoder's) starts a clip without a state."""
        device = torch.device(device) if device is not None else self.joint.enc.weight.device
        return self.label_loop(loop, device).initial_state(batch, device)

    @torch.no_grad()
    def forward(self, encoder_output: torch.Tensor, lengths: torch.Tensor, *, loop: str = "auto") -> list[Hypothesis]:
        """Greedy TDT hypotheses for encoder frames [B, T, D] with valid lengths [B]."""
        return self.decode_from(encoder_output, lengths, loop=loop)[0]

    @torch.no_grad()
    def decode_from(self, encoder_output: torch.Tensor, lengths: torch.Tensor, state: DecoderState | None = None,
                    *, loop: str = "auto") -> tuple[list[Hypothesis], DecoderState]:
        """Greedy TDT hypotheses for the next encoder frames [B, T, D] (valid lengths [B]) of clips whose decoding
        stopped at `state` (None: the start of each clip), and the state where this call stops.

        Token frames are counted from the first of these frames. Without a state the hypotheses equal `forward`'s.
        """
        batch = encoder_output.shape[0]
        if state is not None and state.batch != batch:
            raise ValueError(f"decoder state of {state.batch} clips for a batch of {batch}")
        if batch == 0:
            return [], state if state is not None else self.initial_state(0, encoder_output.device, loop=loop)
        lengths = lengths.to(device=encoder_output.device, dtype=torch.long)
        encoder_output = encoder_output.to(self.joint.enc.weight.dtype)
        return self.label_loop(loop, encoder_output.device).run(encoder_output, lengths, state)
