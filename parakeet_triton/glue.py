"""Glue between Triton's Python backend and parakeet_core, shared by the `model.py` files of the model repository.

Each `model_repository/<stage>/1/model.py` is a subclass of one of the `*Glue` classes below that only sets
``pb_utils`` (the backend's `triton_python_backend_utils` module; unit tests pass a small mock instead).

What the glue does, per `execute` call (one dynamic batch of requests):
1. parse each request into a small validated dataclass (:class:`Clips`, :class:`Frames`); a request that
   fails validation gets an error response naming the problem and takes no further part;
2. concatenate the valid requests' clips into one zero-padded batch with lengths and make ONE call into
   parakeet_core (exact: padding and batch-mates never change a clip's result);
3. split the result back into one response per request. If the batched call raises, each request is retried
   alone, so one failing request cannot take its batch-mates down with it.

Steps 2 and 3 are shared: each stage only declares, as a :class:`Stage`, its inputs and their time axis, the
parakeet_core method it calls and how the result becomes its outputs. Its settings come from the model's
config.pbtxt parameters, rendered from the table in parakeet_triton.settings and read back by
:meth:`StageSettings.from_args`.

:class:`StreamingGlue` (the optional streaming model) is the exception to steps 2 and 3: it keeps each stream's
parakeet_core session between requests and advances the streams of one execute together (see its docstring).

Tensors come in and go out through DLPack: on GPU instances they stay on the GPU between stages. KIND_CPU
instances computing on `cuda` (Jetson-style) hand CPU tensors to the next stage.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.utils.dlpack

import parakeet_core
from parakeet_core.attention import DEFAULT_FULL_ATTENTION_MAX_SECONDS, AttentionPolicy
from parakeet_core.audio import check_waveform

from . import protocol
from .drain import REFUSAL, AdmissionGate, StageCounter
from .settings import DEFAULTS, PARAMETERS

WARMUP_SECONDS = 1.0


class ShuttingDown(RuntimeError):
    """The server is draining (parakeet_triton.drain): the request is refused with UNAVAILABLE, to be retried."""


class InvalidRequest(ValueError):
    """A request the model refuses. The message is returned in that request's response."""


# ----------------------------------------------------------------------------------------------- settings


def _device_for_instance(requested: str, instance_kind: str, device_id: int) -> tuple[str, bool]:
    """(torch device, whether outputs must be CPU tensors) for one instance.

    KIND_GPU instances compute on their own GPU and pass GPU tensors on. KIND_CPU instances compute on the CPU,
    or on `cuda` when the device parameter asks for it (the Jetson-style setup), and pass CPU tensors on.
    """
    if instance_kind == "GPU":
        if requested == "cpu":
            raise ValueError(f"parameter {protocol.DEVICE_PARAMETER!r} is 'cpu' but this is a KIND_GPU instance; "
                             "render with KIND_CPU")
        device = f"cuda:{device_id}"
        outputs_on_cpu = False
    else:
        device = "cuda" if requested == "cuda" else "cpu"
        outputs_on_cpu = True
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"device {device!r} requested but torch {torch.__version__} sees no CUDA device "
            "(torch.cuda.is_available() is False)"
        )
    return device, outputs_on_cpu


def read_parameters(parameters: Mapping[str, str], model: str) -> dict[str, Any]:
    """The settings rendered into a model's config `parameters` (key -> text), by setting name: parsed and
    checked as their flags are (parakeet_triton.settings), blank ones left out, those Triton itself reads
    skipped. ValueError naming the model and the parameter."""
    values = {}
    for key, setting in PARAMETERS.items():
        if not setting.parameter.read_by_glue:
            continue
        text = str(parameters.get(key, "")).strip()
        if not text:
            if setting.parameter.required:
                raise ValueError(f"model {model!r}: parameter {key!r} is missing or empty in config.pbtxt")
            continue
        try:
            values[setting.name] = setting.parse(text)
        except ValueError as error:
            raise ValueError(f"model {model!r}: parameter {key!r} {error}") from None
    return values


@dataclasses.dataclass(frozen=True)
class StageSettings:
    """One instance's configuration, read from the `args` Triton passes to `initialize`.

    `device` is the torch device this instance computes on, resolved from the `device` parameter and the
    instance's kind; `max_audio_seconds` is None (no limit) where it is not rendered (all but the preprocessor).
    """

    model_name: str
    instance_name: str
    checkpoint: str
    device: str
    outputs_on_cpu: bool
    max_batch_size: int
    max_audio_seconds: float | None = None
    cpu_threads: int | None = DEFAULTS["cpu_threads"]
    attention: str = DEFAULTS["attention"]
    full_attention_max_seconds: float = DEFAULTS["full_attention_max_seconds"]
    streaming_contexts: tuple[float, float, float] = DEFAULTS["streaming_contexts"]

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> "StageSettings":
        config = json.loads(args["model_config"])
        name = config.get("name") or args.get("model_name", "?")
        parameters = {key: value.get("string_value", "") for key, value in config.get("parameters", {}).items()}
        values = read_parameters(parameters, name)
        kind = str(args.get("model_instance_kind", "CPU")).upper()
        device_id = int(args.get("model_instance_device_id", 0) or 0)
        device, outputs_on_cpu = _device_for_instance(values.pop("device", DEFAULTS["device"]), kind, device_id)
        try:
            AttentionPolicy.parse(values.get("attention", cls.attention),
                                  full_attention_max_seconds=values.get("full_attention_max_seconds",
                                                                        cls.full_attention_max_seconds))
        except ValueError as error:
            keys = f"{protocol.ATTENTION_PARAMETER!r} / {protocol.FULL_ATTENTION_MAX_SECONDS_PARAMETER!r}"
            raise ValueError(f"model {name!r}: parameters {keys}: {error}") from None
        return cls(
            model_name=name,
            instance_name=str(args.get("model_instance_name", name)),
            device=device,
            outputs_on_cpu=outputs_on_cpu,
            max_batch_size=max(1, int(config.get("max_batch_size", 1) or 1)),
            **values,
        )


def load_model(checkpoint: str, *, device: str, stages: tuple[str, ...], attention: str = "auto",
               full_attention_max_seconds: float = DEFAULT_FULL_ATTENTION_MAX_SECONDS):
    """Load one stage of the checkpoint (parakeet_core); the single place the glue touches checkpoints."""
    return parakeet_core.from_pretrained(checkpoint, device=device, stages=stages, attention=attention,
                                         full_attention_max_seconds=full_attention_max_seconds)


# ------------------------------------------------------------------------------------------ request types


@dataclasses.dataclass(frozen=True)
class Sequences:
    """One request's sequences for a stage: `values` padded along their time axis, `lengths` [B] (int64, CPU)."""

    values: torch.Tensor
    lengths: torch.Tensor

    @property
    def device(self) -> torch.device:
        return self.values.device


@dataclasses.dataclass(frozen=True)
class Frames(Sequences):
    """Frames between stages (features, encoder output), [B, ...] with one time axis."""

    @classmethod
    def parse(cls, values: torch.Tensor | None, lengths: torch.Tensor | None, *, names: tuple[str, str], time_dim: int) -> "Frames":
        value_name, length_name = names
        if values is None or lengths is None:
            raise InvalidRequest(f"inputs {value_name} and {length_name} are required")
        if values.dim() != 3 or not values.is_floating_point():
            raise InvalidRequest(f"{value_name} must be a float tensor of rank 3; got {values.dtype} {list(values.shape)}")
        batch = values.shape[0]
        if lengths.numel() != batch or lengths.is_floating_point():
            raise InvalidRequest(f"{length_name} must hold one integer per clip ({batch}); got {list(lengths.shape)}")
        lengths = lengths.reshape(batch).to("cpu", torch.int64)
        frames = values.shape[time_dim]
        if batch < 1 or int(lengths.min()) < 0 or int(lengths.max()) > frames:
            raise InvalidRequest(f"{length_name} {lengths.tolist()} outside 0..{frames} (the frames in {value_name})")
        return cls(values, lengths)


@dataclasses.dataclass(frozen=True)
class Clips(Sequences):
    """One request's audio: `values` = samples [B, T] float32, zero past each clip's `lengths` [B] (int64, CPU)."""

    @property
    def samples(self) -> torch.Tensor:
        return self.values

    @classmethod
    def parse(
        cls, wav: torch.Tensor | None, wav_lens: torch.Tensor | None, *, max_samples: int | None, min_samples: int = 1
    ) -> "Clips":
        if wav is None:
            raise InvalidRequest(f"input {protocol.WAV} is missing")
        if wav.dtype != torch.float32:
            raise InvalidRequest(f"{protocol.WAV} must be FP32 samples in [-1, 1]; got {str(wav.dtype).replace('torch.', '')}")
        if wav.dim() != 2:
            raise InvalidRequest(f"{protocol.WAV} must have shape [batch, samples]; got {list(wav.shape)}")
        batch, total = wav.shape
        if batch < 1:
            raise InvalidRequest(f"{protocol.WAV} carries no clips (shape {list(wav.shape)})")
        if wav_lens is None:
            lengths = torch.full((batch,), total, dtype=torch.int64)
        else:
            if wav_lens.dtype not in (torch.int32, torch.int64):
                raise InvalidRequest(f"{protocol.WAV_LENS} must be INT32; got {str(wav_lens.dtype).replace('torch.', '')}")
            if wav_lens.numel() != batch or wav_lens.dim() not in (1, 2):
                raise InvalidRequest(
                    f"{protocol.WAV_LENS} must have shape [{batch}, 1] (one length per clip); got {list(wav_lens.shape)}"
                )
            lengths = wav_lens.reshape(batch).to("cpu", torch.int64)
        for index, length in enumerate(lengths.tolist()):
            where = f"clip {index} of {batch}: " if batch > 1 else ""
            if not 0 <= length <= total:
                raise InvalidRequest(
                    f"{where}{protocol.WAV_LENS} = {length} is outside 0..{total} (the samples sent in {protocol.WAV})"
                )
            try:
                check_waveform(wav[index, :length], max_samples=max_samples, min_samples=min_samples, name=protocol.WAV)
            except ValueError as error:
                raise InvalidRequest(f"{where}{error}") from None
        if wav_lens is not None and int(lengths.min()) < total:
            # Zero the padding so whatever a client put there (even NaN) cannot reach the model.
            valid = torch.arange(total, device=wav.device)[None, :] < lengths.to(wav.device)[:, None]
            wav = torch.where(valid, wav, torch.zeros((), dtype=wav.dtype, device=wav.device))
        return cls(wav, lengths)


def pad_concat(tensors: Sequence[torch.Tensor], *, time_dim: int, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Concatenate [B_i, ..., T_i, ...] tensors along the batch, zero-padding `time_dim` to the longest."""
    longest = max(t.shape[time_dim] for t in tensors)
    parts = []
    for t in tensors:
        t = t.to(device=device, dtype=dtype or t.dtype)
        missing = longest - t.shape[time_dim]
        if missing:
            pad_shape = list(t.shape)
            pad_shape[time_dim] = missing
            t = torch.cat([t, t.new_zeros(pad_shape)], dim=time_dim)
        parts.append(t)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def split_rows(counts: Sequence[int]) -> list[slice]:
    """Row slices of each request in a concatenated batch."""
    slices, start = [], 0
    for count in counts:
        slices.append(slice(start, start + count))
        start += count
    return slices


def split_trimmed(values: torch.Tensor, lengths: torch.Tensor, counts: Sequence[int], *, time_dim: int,
                  names: tuple[str, str]) -> list[dict[str, torch.Tensor]]:
    """Each request's rows of a batch output, cut to its own longest valid length (at least 1), as
    {values name: fp32 values, lengths name: int64 lengths [n, 1] on the CPU}.

    fp32 between stages: exact for bf16 values, and the same on every device and backend."""
    lengths = lengths.to("cpu", torch.int64)
    outputs = []
    for rows in split_rows(counts):
        steps = max(1, int(lengths[rows].max()))
        outputs.append({names[0]: values[rows].narrow(time_dim, 0, steps).float(), names[1]: lengths[rows].reshape(-1, 1)})
    return outputs


def run_isolated(items: Sequence[Any], compute: Callable[[Sequence[Any]], list[Any]], on_batch_error: Callable[[Exception], None] | None = None) -> list[Any]:
    """compute(items) as one batch; if that raises, compute each item alone. Returns results or exceptions."""
    if not items:
        return []
    try:
        return list(compute(items))
    except Exception as error:  # noqa: BLE001 - any failure is isolated to the requests that cause it
        if len(items) == 1:
            return [error]
        if on_batch_error is not None:
            on_batch_error(error)
    results = []
    for item in items:
        try:
            results.extend(compute([item]))
        except Exception as error:  # noqa: BLE001
            results.append(error)
    return results


def timestamps_json(transcript) -> str:
    """TIMESTAMPS payload: {"words": [...], "segments": [...]}, each {"text", "start", "end"} in seconds."""
    return json.dumps(transcript.timestamps_dict(), ensure_ascii=False)


def _utf8_column(texts: Sequence[str]) -> np.ndarray:
    return np.array([text.encode("utf-8") for text in texts], dtype=np.object_).reshape(-1, 1)


# ------------------------------------------------------------------------------------------------- stages


@dataclasses.dataclass(frozen=True)
class FrameOutputs:
    """Outputs of a stage whose result is (values, lengths): each request's rows as the tensors `names`, cut along
    `time_dim` to its longest valid length (:func:`split_trimmed`)."""

    names: tuple[str, str]
    time_dim: int

    def __call__(self, model: Any, result: tuple[torch.Tensor, torch.Tensor], counts: Sequence[int]) -> list[dict[str, Any]]:
        values, lengths = result
        return split_trimmed(values, lengths, counts, time_dim=self.time_dim, names=self.names)


def transcript_outputs(model: Any, hypotheses: Sequence[Any], counts: Sequence[int]) -> list[dict[str, Any]]:
    """Outputs of the decoder: each request's TRANSCRIPTS (UTF-8 text) and TIMESTAMPS (UTF-8 JSON), [n, 1]."""
    transcripts = [model.to_transcript(hypothesis, timestamps=True) for hypothesis in hypotheses]
    outputs = []
    for rows in split_rows(counts):
        chunk = transcripts[rows]
        outputs.append({protocol.TRANSCRIPTS: _utf8_column([t.text for t in chunk]),
                        protocol.TIMESTAMPS: _utf8_column([timestamps_json(t) for t in chunk])})
    return outputs


@dataclasses.dataclass(frozen=True)
class Stage:
    """What one composing model computes.

    `name` is the parakeet_core stage it loads and the ParakeetTDT method it calls, as ``method(values, lengths)``
    on the requests' `inputs` (values, lengths) zero-padded along `time_dim` into one batch, the values cast to
    `dtype` (None: the model's compute dtype); `outputs(model, result, clips per request)` turns the result into
    each request's output tensors. The `admits` stage is the ensemble's entry, which refuses new requests while
    the server drains (parakeet_triton.drain).
    """

    name: str
    inputs: tuple[str, str]
    time_dim: int
    outputs: Callable[[Any, Any, Sequence[int]], list[dict[str, Any]]]
    dtype: torch.dtype | None = torch.float32
    admits: bool = False


# ------------------------------------------------------------------------------------------- stage glue


class StageGlue:
    """Shared `initialize` / `execute` / `finalize` of a Triton Python model serving one parakeet_core stage."""

    pb_utils: Any = None  # the backend's triton_python_backend_utils module, set by model.py
    stage: Stage  # set by each subclass
    loads: tuple[str, ...] = ()  # the parakeet_core stages to load; () = the stage's own

    # -- lifecycle

    def initialize(self, args: dict[str, Any]) -> None:
        self.gate: AdmissionGate | None = None
        self.counter: StageCounter | None = None
        self._reported_devices = False
        self.settings = StageSettings.from_args(args)
        if self.settings.cpu_threads is not None:
            torch.set_num_threads(self.settings.cpu_threads)
        started = time.perf_counter()
        try:
            self.model = load_model(self.settings.checkpoint, device=self.settings.device,
                                    stages=self.loads or (self.stage.name,),
                                    attention=self.settings.attention,
                                    full_attention_max_seconds=self.settings.full_attention_max_seconds)
        except Exception as error:
            raise RuntimeError(
                f"model {self.settings.model_name!r}: cannot load checkpoint {self.settings.checkpoint!r} "
                f"on {self.settings.device}: {type(error).__name__}: {error}"
            ) from error
        sample_rate = self.model.config.sample_rate
        if sample_rate != protocol.SAMPLE_RATE:
            raise ValueError(
                f"model {self.settings.model_name!r}: checkpoint {self.settings.checkpoint!r} expects {sample_rate} Hz "
                f"audio, but this server takes {protocol.SAMPLE_RATE} Hz ({protocol.WAV}, "
                "parakeet_triton.protocol.SAMPLE_RATE); serve a checkpoint trained at that rate"
            )
        loaded = time.perf_counter()
        self.warmup()
        model_dir = args.get("model_repository")
        if model_dir:
            repository = Path(model_dir).parent
            self.counter = StageCounter(repository, self.settings.model_name, self.settings.instance_name)
            if self.stage.admits:
                self.gate = AdmissionGate(repository)
        self._log(
            "info",
            f"{self.settings.instance_name}: loaded stage {self.stage.name!r} of checkpoint {self.settings.checkpoint!r} "
            f"on {self.model.device} ({str(self.model.dtype).replace('torch.', '')}) with {torch.get_num_threads()} "
            f"CPU threads in {loaded - started:.1f} s, "
            f"warm-up {time.perf_counter() - loaded:.1f} s",
        )

    def execute(self, requests: Sequence[Any]) -> list[Any]:
        if self.gate is None:
            return self._execute(requests)
        with self.gate.admitting() as admitted:
            if admitted:
                return self._execute(requests)
        if self.counter is not None:
            self.counter.record(0, len(requests))
        return [self._error_response(ShuttingDown(REFUSAL)) for _ in requests]

    def _execute(self, requests: Sequence[Any]) -> list[Any]:
        parsed: list[Any] = []
        for request in requests:
            try:
                parsed.append(self.parse(request))
            except Exception as error:  # noqa: BLE001 - becomes that request's error response
                parsed.append(error)
        valid = [item for item in parsed if not isinstance(item, Exception)]
        if valid and not self._reported_devices:
            self._reported_devices = True
            self._log(
                "info",
                f"{self.settings.instance_name}: first batch: inputs on {valid[0].device}, computing on {self.model.device}, "
                f"outputs {'copied to the CPU' if self.settings.outputs_on_cpu else 'left where computed'}",
            )
        with torch.inference_mode():
            results = iter(run_isolated(valid, self.compute, self._on_batch_error))
        responses = []
        refused = 0
        for item in parsed:
            result = item if isinstance(item, Exception) else next(results)
            if isinstance(result, Exception):
                refused += 1
                responses.append(self._error_response(result))
            else:
                responses.append(self.pb_utils.InferenceResponse(output_tensors=[self._to_pb(name, value) for name, value in result.items()]))
        if self.counter is not None:
            self.counter.record(len(requests) - refused, refused)
        return responses

    def finalize(self) -> None:
        if self.gate is not None:
            self.gate.close()
        self._log("info", f"{self.settings.instance_name}: unloaded")

    # -- per stage

    def parse(self, request: Any) -> Any:
        """One request's inputs as a validated :class:`Frames` (the preprocessor: :class:`Clips`)."""
        values, lengths = self.stage.inputs
        return Frames.parse(self._input(request, values), self._input(request, lengths), names=self.stage.inputs,
                            time_dim=self.stage.time_dim)

    def compute(self, items: Sequence[Any]) -> list[dict[str, Any]]:
        """Outputs (name -> torch tensor or numpy array) of each item, from one batched call of the stage."""
        values = pad_concat([item.values for item in items], time_dim=self.stage.time_dim, device=self.model.device,
                            dtype=self.stage.dtype or self.model.dtype)
        lengths = torch.cat([item.lengths for item in items]).to(self.model.device)
        result = getattr(self.model, self.stage.name)(values, lengths)
        return self.stage.outputs(self.model, result, [item.values.shape[0] for item in items])

    def warmup(self) -> None:
        """A dummy forward (parakeet_core's warm-up of this stage) so allocation and, on GPU, CUDA-graph capture
        happen before the model reports ready: batch 1, plus max_batch_size on GPU."""
        on_gpu = str(self.model.device).startswith("cuda")
        self.model.warmup(batch_sizes=sorted({1, self.settings.max_batch_size}) if on_gpu else (1,), seconds=WARMUP_SECONDS)

    # -- helpers

    def _input(self, request: Any, name: str) -> torch.Tensor | None:
        tensor = self.pb_utils.get_input_tensor_by_name(request, name)
        if tensor is None:
            return None
        return torch.utils.dlpack.from_dlpack(tensor.to_dlpack())

    def _to_pb(self, name: str, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            value = value.detach().contiguous()
            if value.device.type != "cpu" and not self.settings.outputs_on_cpu:
                return self.pb_utils.Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(value))
            value = value.cpu().numpy()
        return self.pb_utils.Tensor(name, value)

    def _error_response(self, error: Exception) -> Any:
        error_class = self.pb_utils.TritonError
        if isinstance(error, ShuttingDown):
            message = f"{self.settings.model_name}: {error}"
            code = getattr(error_class, "UNAVAILABLE", None)
        elif isinstance(error, InvalidRequest):
            message = f"{self.settings.model_name}: {error}"
            code = getattr(error_class, "INVALID_ARG", None)
        else:
            message = f"{self.settings.model_name}: {type(error).__name__}: {error}"
            code = getattr(error_class, "INTERNAL", None)
        triton_error = error_class(message) if code is None else error_class(message, code)
        return self.pb_utils.InferenceResponse(output_tensors=[], error=triton_error)

    def _on_batch_error(self, error: Exception) -> None:
        self._log("warn", f"{self.settings.instance_name}: batched call failed ({type(error).__name__}: {error}); retrying each request alone")

    def _log(self, level: str, message: str) -> None:
        logger = getattr(self.pb_utils, "Logger", None)
        if logger is not None:
            getattr(logger, f"log_{level}")(message)


class PreprocessorGlue(StageGlue):
    """WAV [B, T] + optional WAV_LENS [B, 1] -> FEATURES [B, F, T'] + FEATURE_LENGTHS [B, 1]."""

    stage = Stage("featurize", (protocol.WAV, protocol.WAV_LENS), time_dim=1,
                  outputs=FrameOutputs((protocol.FEATURES, protocol.FEATURE_LENGTHS), time_dim=2), admits=True)

    def parse(self, request: Any) -> Clips:
        max_seconds = self.settings.max_audio_seconds
        max_samples = None if max_seconds is None else int(round(max_seconds * protocol.SAMPLE_RATE))
        wav, wav_lens = self.stage.inputs
        return Clips.parse(self._input(request, wav), self._input(request, wav_lens), max_samples=max_samples,
                           min_samples=self.model.min_samples)


class EncoderGlue(StageGlue):
    """FEATURES [B, F, T'] + FEATURE_LENGTHS [B, 1] -> ENCODED [B, T'', D] (fp32) + ENCODED_LENGTHS [B, 1]."""

    stage = Stage("encode", (protocol.FEATURES, protocol.FEATURE_LENGTHS), time_dim=2,
                  outputs=FrameOutputs((protocol.ENCODED, protocol.ENCODED_LENGTHS), time_dim=1))


class DecoderGlue(StageGlue):
    """ENCODED [B, T'', D] + ENCODED_LENGTHS [B, 1] -> TRANSCRIPTS [B, 1] (UTF-8) + TIMESTAMPS [B, 1] (JSON)."""

    stage = Stage("decode", (protocol.ENCODED, protocol.ENCODED_LENGTHS), time_dim=1, outputs=transcript_outputs,
                  dtype=None)


# ------------------------------------------------------------------------------------------------ streaming


@dataclasses.dataclass(frozen=True)
class SequenceControl:
    """Which stream a request belongs to and where in it, as Triton's sequence batcher tells: `key` is the request's
    sequence id (a number, or a string for string ids), `start` / `end` its sequence_start / sequence_end."""

    key: int | str
    start: bool
    end: bool

    @classmethod
    def parse(cls, key: Any, start: torch.Tensor | None, end: torch.Tensor | None) -> "SequenceControl":
        if key is None or key == 0 or key == "":
            raise InvalidRequest("the request has no sequence id: send each piece of a stream with sequence_id, "
                                 "sequence_start on the first piece and sequence_end on the last")
        return cls(key, _flag(start), _flag(end))


def _flag(tensor: torch.Tensor | None) -> bool:
    return tensor is not None and tensor.numel() > 0 and bool(tensor.reshape(-1)[0])


@dataclasses.dataclass(frozen=True)
class StreamPiece:
    """One request's audio for a stream: 1-D float32 samples at 16 kHz, possibly none."""

    samples: np.ndarray

    @classmethod
    def parse(cls, wav: torch.Tensor | None, wav_lens: torch.Tensor | None, *, max_samples: int | None) -> "StreamPiece":
        if wav is None:
            raise InvalidRequest(f"input {protocol.WAV} is missing")
        if wav.dtype != torch.float32:
            raise InvalidRequest(f"{protocol.WAV} must be FP32 samples in [-1, 1]; got {str(wav.dtype).replace('torch.', '')}")
        if wav.dim() != 2 or wav.shape[0] != 1:
            raise InvalidRequest(f"{protocol.WAV} must have shape [1, samples] (one piece of one stream); got {list(wav.shape)}")
        total = wav.shape[1]
        length = total
        if wav_lens is not None:
            if wav_lens.dtype not in (torch.int32, torch.int64) or wav_lens.numel() != 1:
                raise InvalidRequest(f"{protocol.WAV_LENS} must be INT32 of shape [1, 1]; got "
                                     f"{str(wav_lens.dtype).replace('torch.', '')} {list(wav_lens.shape)}")
            length = int(wav_lens.reshape(-1)[0])
            if not 0 <= length <= total:
                raise InvalidRequest(f"{protocol.WAV_LENS} = {length} is outside 0..{total} (the samples sent in "
                                     f"{protocol.WAV})")
        samples = wav[0, :length].to("cpu")
        if length:
            try:
                check_waveform(samples, max_samples=max_samples, name=protocol.WAV)
            except ValueError as error:
                raise InvalidRequest(str(error)) from None
        return cls(samples.numpy())


@dataclasses.dataclass
class OpenStream:
    """A stream this instance holds: its parakeet_core session and when its last request came (time.monotonic)."""

    session: parakeet_core.StreamingSession
    last_seen: float


def final_timestamps_json(transcript) -> str:
    """TIMESTAMPS of a stream's last response: words and segments (as the ensemble's) plus the token ids, frames
    and durations."""
    document = transcript.timestamps_dict()
    document.update(token_ids=transcript.token_ids, token_frames=transcript.token_frames,
                    token_durations=transcript.token_durations)
    return json.dumps(document, ensure_ascii=False)


class StreamingGlue(StageGlue):
    """The streaming model: pieces of live streams -> the text so far; the final transcript on the last piece.

    Each request is one piece: WAV [1, T] (T >= 0) + optional WAV_LENS [1, 1], with Triton's sequence id and
    START / END flags. A START request opens a session (`ParakeetTDT.stream` with the rendered contexts; it replaces
    one of the same id), the END request finishes it and frees it. The Oldest strategy of the sequence batcher hands
    over the requests of several streams at once: they advance together (`parakeet_core.feed_many`, one encoder
    batch per round of chunks, each result what it would be alone), the ending ones finish together
    (`finish_many`). Outputs, one element per request: TRANSCRIPTS (text so far; the final text on END) and
    TIMESTAMPS ("" before END, then :func:`final_timestamps_json`).

    Triton does not tell a Python model about sequences it dropped for being idle, so the instance keeps the time of
    each stream's last request and frees those idle longer than the sequence batcher's
    `max_sequence_idle_microseconds` at its next execute. A request for an id it does not hold, without START, is
    refused naming the reasons. A bad piece (NaN, wrong shape) is refused alone and its stream goes on unchanged;
    a failure inside the model drops the streams of that batch with the error.
    """

    stage = Stage("stream", (protocol.WAV, protocol.WAV_LENS), time_dim=1, outputs=lambda *_: [], admits=True)
    loads = parakeet_core.STAGES

    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        idle_us = (config.get("sequence_batching") or {}).get("max_sequence_idle_microseconds")
        self.idle_timeout_s = int(idle_us) / 1e6 if idle_us else DEFAULTS["streaming_idle_timeout_s"]
        self.streams: dict[int | str, OpenStream] = {}
        super().initialize(args)
        context = self._new_session().context
        left, chunk, right = context.seconds
        self._log("info", f"{self.settings.instance_name}: streaming contexts {left:g}-{chunk:g}-{right:g} s "
                          f"(left-chunk-right), streams dropped after {self.idle_timeout_s:g} s without a request")

    def finalize(self) -> None:
        self.streams.clear()
        super().finalize()

    def warmup(self) -> None:
        """One short stream (its first step and a last one), so that allocation happens before the model is ready."""
        session = self._new_session()
        session.feed(np.zeros(session.context.chunk + session.context.right + 1, dtype=np.float32))
        session.finish()

    def _new_session(self) -> parakeet_core.StreamingSession:
        left, chunk, right = self.settings.streaming_contexts
        return self.model.stream(left_seconds=left, chunk_seconds=chunk, right_seconds=right)

    def control(self, request: Any) -> SequenceControl:
        """The request's place in its stream: its sequence id (`correlation_id()`) and the START / END inputs."""
        return SequenceControl.parse(request.correlation_id(), self._input(request, protocol.SEQUENCE_START),
                                     self._input(request, protocol.SEQUENCE_END))

    def parse(self, request: Any) -> StreamPiece:
        max_seconds = self.settings.max_audio_seconds
        max_samples = None if max_seconds is None else int(round(max_seconds * protocol.SAMPLE_RATE))
        return StreamPiece.parse(self._input(request, protocol.WAV), self._input(request, protocol.WAV_LENS),
                                 max_samples=max_samples)

    def _execute(self, requests: Sequence[Any]) -> list[Any]:
        now = time.monotonic()
        results: list[Any] = [None] * len(requests)
        work: list[tuple[int, SequenceControl, OpenStream, StreamPiece]] = []
        seen: set[int | str] = set()
        for index, request in enumerate(requests):
            control = None
            try:
                control = self.control(request)
                seen.add(control.key)
                stream = self._stream_for(control, now)
                work.append((index, control, stream, self.parse(request)))
            except Exception as error:  # noqa: BLE001 - becomes that request's error response
                results[index] = error
                if control is not None and control.end:
                    self.streams.pop(control.key, None)
        self._drop_idle(now, keep=seen)
        while work:  # the sequence batcher sends one request per stream at a time; a repeated id waits a round
            round_keys: set[int | str] = set()
            batch, work_left = [], []
            for item in work:
                (work_left if item[1].key in round_keys else batch).append(item)
                round_keys.add(item[1].key)
            self._advance(batch, results)
            work = work_left
        responses = []
        refused = 0
        for result in results:
            if isinstance(result, Exception):
                refused += 1
                responses.append(self._error_response(result))
            else:
                responses.append(self.pb_utils.InferenceResponse(
                    output_tensors=[self.pb_utils.Tensor(name, value) for name, value in result.items()]))
        if self.counter is not None:
            self.counter.record(len(requests) - refused, refused)
        return responses

    def _stream_for(self, control: SequenceControl, now: float) -> OpenStream:
        if control.start:
            if control.key in self.streams:
                self._log("info", f"{self.settings.instance_name}: sequence {control.key!r} started again; "
                                  "its earlier stream is dropped")
            stream = self.streams[control.key] = OpenStream(self._new_session(), now)
            return stream
        stream = self.streams.get(control.key)
        if stream is None:
            raise InvalidRequest(
                f"sequence {control.key!r} is not open here: it was never started (send its first piece with "
                f"sequence_start), it has ended (sequence_end), it was dropped after {self.idle_timeout_s:g} s "
                "without a request, or an earlier error closed it; start it again with sequence_start")
        stream.last_seen = now
        return stream

    def _drop_idle(self, now: float, keep: set[int | str]) -> None:
        idle = [key for key, stream in self.streams.items()
                if key not in keep and now - stream.last_seen > self.idle_timeout_s]
        for key in idle:
            del self.streams[key]
        if idle:
            self._log("info", f"{self.settings.instance_name}: dropped {len(idle)} idle stream(s) "
                              f"({', '.join(map(repr, idle[:10]))}): no request for {self.idle_timeout_s:g} s")

    def _advance(self, batch: list[tuple[int, SequenceControl, OpenStream, StreamPiece]], results: list[Any]) -> None:
        """Feed one piece to each stream of `batch` (distinct streams) in one batched step; finish the ending ones."""
        try:
            with torch.inference_mode():
                updates = parakeet_core.feed_many([stream.session for _, _, stream, _ in batch],
                                                  [piece.samples for _, _, _, piece in batch])
        except Exception as error:  # noqa: BLE001 - pieces were checked: this is the model failing
            self._fail(batch, error, results)
            return
        for (index, _, _, _), update in zip(batch, updates):
            results[index] = {protocol.TRANSCRIPTS: _utf8_vector([update.text]), protocol.TIMESTAMPS: _utf8_vector([""])}
        ending = [item for item in batch if item[1].end]
        if not ending:
            return
        try:
            with torch.inference_mode():
                transcripts = parakeet_core.finish_many([stream.session for _, _, stream, _ in ending])
        except Exception as error:  # noqa: BLE001
            self._fail(ending, error, results)
            return
        for (index, control, _, _), transcript in zip(ending, transcripts):
            self.streams.pop(control.key, None)
            results[index] = {protocol.TRANSCRIPTS: _utf8_vector([transcript.text]),
                              protocol.TIMESTAMPS: _utf8_vector([final_timestamps_json(transcript)])}

    def _fail(self, batch: list[tuple[int, SequenceControl, OpenStream, StreamPiece]], error: Exception,
              results: list[Any]) -> None:
        self._log("warn", f"{self.settings.instance_name}: a streaming step failed ({type(error).__name__}: {error}); "
                          f"closing its {len(batch)} stream(s)")
        for index, control, _, _ in batch:
            self.streams.pop(control.key, None)
            results[index] = error


def _utf8_vector(texts: Sequence[str]) -> np.ndarray:
    return np.array([text.encode("utf-8") for text in texts], dtype=np.object_)
