"""Glue between Triton's Python backend and parakeet_core, shared by the three `model.py` files.

Each `model_repository/<stage>/1/model.py` is a subclass of one of the `*Glue` classes below that only sets
``pb_utils`` (the backend's `triton_python_backend_utils` module; unit tests pass a small mock instead).

What the glue does, per `execute` call (one dynamic batch of requests):
1. parse each request into a small validated dataclass (:class:`Clips`, :class:`Frames`); a request that
   fails validation gets an error response naming the problem and takes no further part;
2. concatenate the valid requests' clips into one zero-padded batch with lengths and make ONE call into
   parakeet_core (exact: padding and batch-mates never change a clip's result);
3. split the result back into one response per request. If the batched call raises, each request is retried
   alone, so one failing request cannot take its batch-mates down with it.

Tensors come in and go out through DLPack: on GPU instances they stay on the GPU between stages. KIND_CPU
instances computing on `cuda` (Jetson-style) hand CPU tensors to the next stage.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.utils.dlpack

from parakeet_core.attention import DEFAULT_FULL_ATTENTION_MAX_SECONDS, AttentionPolicy

from . import protocol
from .drain import REFUSAL, AdmissionGate, StageCounter

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
            raise ValueError("parameter device is 'cpu' but this is a KIND_GPU instance; render with KIND_CPU")
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


@dataclasses.dataclass(frozen=True)
class StageSettings:
    """One instance's configuration, read from the `args` Triton passes to `initialize`."""

    model_name: str
    instance_name: str
    checkpoint: str
    device: str
    outputs_on_cpu: bool
    max_batch_size: int
    max_audio_seconds: float | None = None
    cpu_threads: int | None = None
    attention: str = "auto"
    full_attention_max_seconds: float = DEFAULT_FULL_ATTENTION_MAX_SECONDS

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> "StageSettings":
        config = json.loads(args["model_config"])
        name = config.get("name") or args.get("model_name", "?")
        params = {key: str(value.get("string_value", "")).strip() for key, value in config.get("parameters", {}).items()}
        checkpoint = params.get("checkpoint", "")
        if not checkpoint:
            raise ValueError(f"model {name!r}: parameter 'checkpoint' is missing or empty in config.pbtxt")
        requested = params.get("device", "auto") or "auto"
        if requested not in ("auto", "cpu", "cuda"):
            raise ValueError(f"model {name!r}: parameter 'device' must be auto, cpu or cuda; got {requested!r}")
        kind = str(args.get("model_instance_kind", "CPU")).upper()
        device_id = int(args.get("model_instance_device_id", 0) or 0)
        device, outputs_on_cpu = _device_for_instance(requested, kind, device_id)
        max_audio = params.get("max_audio_seconds")
        max_audio_seconds = None
        if max_audio:
            try:
                max_audio_seconds = float(max_audio)
            except ValueError:
                raise ValueError(f"model {name!r}: parameter 'max_audio_seconds' is not a number: {max_audio!r}")
            if not max_audio_seconds > 0:
                raise ValueError(f"model {name!r}: parameter 'max_audio_seconds' must be > 0; got {max_audio!r}")
        threads = params.get("cpu_threads")
        cpu_threads = None
        if threads:
            if not threads.isdigit() or int(threads) < 1:
                raise ValueError(f"model {name!r}: parameter 'cpu_threads' must be an integer >= 1; got {threads!r}")
            cpu_threads = int(threads)
        attention = params.get("attention") or "auto"
        full_max = params.get("full_attention_max_seconds") or repr(DEFAULT_FULL_ATTENTION_MAX_SECONDS)
        try:
            AttentionPolicy.parse(attention, full_attention_max_seconds=float(full_max))
        except ValueError as error:
            raise ValueError(f"model {name!r}: parameters 'attention' / 'full_attention_max_seconds': {error}") from None
        return cls(
            model_name=name,
            instance_name=str(args.get("model_instance_name", name)),
            checkpoint=checkpoint,
            device=device,
            outputs_on_cpu=outputs_on_cpu,
            max_batch_size=max(1, int(config.get("max_batch_size", 1) or 1)),
            max_audio_seconds=max_audio_seconds,
            cpu_threads=cpu_threads,
            attention=attention,
            full_attention_max_seconds=float(full_max),
        )


def load_model(checkpoint: str, *, device: str, stages: tuple[str, ...], attention: str = "auto",
               full_attention_max_seconds: float = DEFAULT_FULL_ATTENTION_MAX_SECONDS):
    """Load one stage of the checkpoint (parakeet_core); the single place the glue touches checkpoints."""
    import parakeet_core

    return parakeet_core.from_pretrained(checkpoint, device=device, stages=stages, attention=attention,
                                         full_attention_max_seconds=full_attention_max_seconds)


# ------------------------------------------------------------------------------------------ request types


@dataclasses.dataclass(frozen=True)
class Clips:
    """One request's audio: `samples` [B, T] float32, zero past each clip's `lengths` [B] (int64, CPU)."""

    samples: torch.Tensor
    lengths: torch.Tensor

    @property
    def device(self) -> torch.device:
        return self.samples.device

    @classmethod
    def parse(
        cls, wav: torch.Tensor | None, wav_lens: torch.Tensor | None, *, max_samples: int | None, min_samples: int = 1
    ) -> "Clips":
        from parakeet_core.audio import check_waveform

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


@dataclasses.dataclass(frozen=True)
class Frames:
    """One request's frame sequences between stages: `values` padded along `time_dim`, `lengths` [B] (CPU)."""

    values: torch.Tensor
    lengths: torch.Tensor

    @property
    def device(self) -> torch.device:
        return self.values.device

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


# ------------------------------------------------------------------------------------------- stage glue


class StageGlue:
    """Shared `initialize` / `execute` / `finalize` of a Triton Python model serving one parakeet_core stage."""

    pb_utils: Any = None  # the backend's triton_python_backend_utils module, set by model.py
    stage: str = ""
    inputs: tuple[str, ...] = ()

    # -- lifecycle

    def initialize(self, args: dict[str, Any]) -> None:
        self.settings = StageSettings.from_args(args)
        if self.settings.cpu_threads is not None:
            torch.set_num_threads(self.settings.cpu_threads)
        started = time.perf_counter()
        try:
            self.model = load_model(self.settings.checkpoint, device=self.settings.device, stages=(self.stage,),
                                    attention=self.settings.attention,
                                    full_attention_max_seconds=self.settings.full_attention_max_seconds)
        except Exception as error:
            raise RuntimeError(
                f"model {self.settings.model_name!r}: cannot load checkpoint {self.settings.checkpoint!r} "
                f"on {self.settings.device}: {type(error).__name__}: {error}"
            ) from error
        loaded = time.perf_counter()
        self.warmup()
        model_dir = args.get("model_repository")
        self.counter = (StageCounter(Path(model_dir).parent, self.settings.model_name, self.settings.instance_name)
                        if model_dir else None)
        self._log(
            "info",
            f"{self.settings.instance_name}: loaded stage {self.stage!r} of checkpoint {self.settings.checkpoint!r} "
            f"on {self.model.device} ({str(self.model.dtype).replace('torch.', '')}) with {torch.get_num_threads()} "
            f"CPU threads in {loaded - started:.1f} s, "
            f"warm-up {time.perf_counter() - loaded:.1f} s",
        )

    def execute(self, requests: Sequence[Any]) -> list[Any]:
        gate = getattr(self, "gate", None)
        if gate is None:
            return self._execute(requests)
        with gate.admitting() as admitted:
            if admitted:
                return self._execute(requests)
        if getattr(self, "counter", None) is not None:
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
        if valid and not getattr(self, "_reported_devices", False):
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
        if getattr(self, "counter", None) is not None:
            self.counter.record(len(requests) - refused, refused)
        return responses

    def finalize(self) -> None:
        if getattr(self, "gate", None) is not None:
            self.gate.close()
        self._log("info", f"{getattr(getattr(self, 'settings', None), 'instance_name', self.stage)}: unloaded")

    # -- per stage

    def parse(self, request: Any) -> Any:
        raise NotImplementedError

    def compute(self, items: Sequence[Any]) -> list[dict[str, Any]]:
        """Outputs (name -> torch tensor or numpy array) of each item, from one batched call."""
        raise NotImplementedError

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

    stage = "featurize"

    def initialize(self, args: dict[str, Any]) -> None:
        super().initialize(args)
        model_dir = args.get("model_repository")
        self.gate = AdmissionGate(Path(model_dir).parent) if model_dir else None

    def parse(self, request: Any) -> Clips:
        max_seconds = self.settings.max_audio_seconds
        max_samples = None if max_seconds is None else int(round(max_seconds * self.model.config.sample_rate))
        return Clips.parse(
            self._input(request, protocol.WAV),
            self._input(request, protocol.WAV_LENS),
            max_samples=max_samples,
            min_samples=self.model.min_samples,
        )

    def compute(self, items: Sequence[Clips]) -> list[dict[str, Any]]:
        samples = pad_concat([item.samples for item in items], time_dim=1, device=self.model.device, dtype=torch.float32)
        lengths = torch.cat([item.lengths for item in items])
        features, feature_lengths = self.model.featurize(samples, lengths.to(self.model.device))
        return split_trimmed(features, feature_lengths, [item.samples.shape[0] for item in items], time_dim=2,
                             names=(protocol.FEATURES, protocol.FEATURE_LENGTHS))


class EncoderGlue(StageGlue):
    """FEATURES [B, F, T'] + FEATURE_LENGTHS [B, 1] -> ENCODED [B, T'', D] (fp32) + ENCODED_LENGTHS [B, 1]."""

    stage = "encode"

    def parse(self, request: Any) -> Frames:
        names = (protocol.FEATURES, protocol.FEATURE_LENGTHS)
        return Frames.parse(self._input(request, names[0]), self._input(request, names[1]), names=names, time_dim=2)

    def compute(self, items: Sequence[Frames]) -> list[dict[str, Any]]:
        features = pad_concat([item.values for item in items], time_dim=2, device=self.model.device, dtype=torch.float32)
        lengths = torch.cat([item.lengths for item in items])
        encoded, encoded_lengths = self.model.encode(features, lengths.to(self.model.device))
        return split_trimmed(encoded, encoded_lengths, [item.values.shape[0] for item in items], time_dim=1,
                             names=(protocol.ENCODED, protocol.ENCODED_LENGTHS))


class DecoderGlue(StageGlue):
    """ENCODED [B, T'', D] + ENCODED_LENGTHS [B, 1] -> TRANSCRIPTS [B, 1] (UTF-8) + TIMESTAMPS [B, 1] (JSON)."""

    stage = "decode"

    def parse(self, request: Any) -> Frames:
        names = (protocol.ENCODED, protocol.ENCODED_LENGTHS)
        return Frames.parse(self._input(request, names[0]), self._input(request, names[1]), names=names, time_dim=1)

    def compute(self, items: Sequence[Frames]) -> list[dict[str, Any]]:
        encoded = pad_concat([item.values for item in items], time_dim=1, device=self.model.device, dtype=self.model.dtype)
        lengths = torch.cat([item.lengths for item in items])
        hypotheses = self.model.decode(encoded, lengths.to(self.model.device))
        transcripts = [self.model.to_transcript(hypothesis, timestamps=True) for hypothesis in hypotheses]
        outputs = []
        for rows in split_rows([item.values.shape[0] for item in items]):
            chunk = transcripts[rows]
            outputs.append(
                {
                    protocol.TRANSCRIPTS: np.array([t.text.encode("utf-8") for t in chunk], dtype=np.object_).reshape(-1, 1),
                    protocol.TIMESTAMPS: np.array([timestamps_json(t).encode("utf-8") for t in chunk], dtype=np.object_).reshape(-1, 1),
                }
            )
        return outputs

