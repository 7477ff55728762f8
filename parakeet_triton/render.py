"""Render the Triton model repository for one deployment variant.

`model_repository/<model>/config.pbtxt.template` (and `<model>/1/model.py`) are the only copies of the
configuration; every variant (CPU, GPU, Jetson-style KIND_CPU instances computing on `cuda`) is a set of
:class:`RenderOptions` rendered into a fresh directory by :func:`render_repository`
(`parakeet-serve --render-only DIR` on the command line).

The checkpoint is set in exactly one place, ``RenderOptions.checkpoint``, and rendered into the parameters of
every composing model, so each Triton model loads its own stage from the same source.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import string
from pathlib import Path

from parakeet_core.attention import AttentionPolicy, DEFAULT_FULL_ATTENTION_MAX_SECONDS

from . import drain, protocol

DEFAULT_CHECKPOINT = "nvidia/parakeet-tdt-0.6b-v3"
DEVICES = ("auto", "cpu", "cuda")
INSTANCE_KINDS = ("auto", "KIND_CPU", "KIND_GPU")
COMPOSING_MODELS = (protocol.PREPROCESSOR_MODEL, protocol.ENCODER_MODEL, protocol.DECODER_MODEL)
ALL_MODELS = COMPOSING_MODELS + (protocol.ENSEMBLE_MODEL,)
TEMPLATE_NAME = "config.pbtxt.template"


@dataclasses.dataclass(frozen=True)
class RenderOptions:
    """Everything that differs between deployments. Validated on construction (ValueError naming the field)."""

    checkpoint: str = DEFAULT_CHECKPOINT
    """Local `.nemo` path or Hugging Face repo id. An existing local path is made absolute when rendered."""
    device: str = "auto"
    """Where each instance computes: `auto` (the instance's GPU for KIND_GPU instances, else CPU), `cpu`, `cuda`."""
    instance_kind: str = "auto"
    """Triton instance kind: `auto` (KIND_GPU for device cuda, KIND_CPU for cpu, KIND_AUTO for auto),
    `KIND_CPU` or `KIND_GPU`. KIND_CPU with device `cuda` is the Jetson-style setup."""
    instances: int = 1
    """Instances of each composing model (per GPU for KIND_GPU)."""
    max_batch_size: int = 16
    """Largest batch (in clips) of every model, the ensemble included."""
    max_queue_delay_us: int = 1000
    """Dynamic-batching queue delay of the encoder and decoder, in microseconds."""
    max_queue_size: int = 128
    """Requests each composing model holds waiting (0: unbounded). Past it a request is refused at once with
    UNAVAILABLE ("Exceeds maximum queue size"), which clients retry with backoff, instead of waiting past
    their timeout."""
    queue_timeout_s: float = 0.0
    """Longest wait in each composing model's queue before a request is refused with UNAVAILABLE (0: no limit).
    Execution time does not count."""
    max_audio_seconds: float = protocol.DEFAULT_MAX_AUDIO_SECONDS
    """Longest clip accepted (default 3 hours); longer clips get an error response."""
    attention: str = "auto"
    """Encoder attention: `auto` (full up to `full_attention_max_seconds`, local (256, 256) beyond), `full`, or a
    symmetric local context N (encoder frames of 80 ms each side)."""
    full_attention_max_seconds: float = DEFAULT_FULL_ATTENTION_MAX_SECONDS
    """Longest clip that `auto` gives full attention."""
    shm_growth_mb: int = 64
    """Growth step of each Python-backend stub's shared-memory region, MiB (the backend's default is 1 MiB,
    which a 3-hour request of ~690 MB would grow through hundreds of times)."""
    execution_env_path: str | None = None
    """Optional `EXECUTION_ENV_PATH` for the Python backend stub (a venv/conda directory or packed .tar.gz)."""
    cpu_threads: int | None = None
    """torch intra-op threads of each composing model instance. None: for CPU instances, the usable cores (CPU
    affinity and cgroup quota) divided among the 3 x `instances` stage processes that share them, at least 1;
    GPU instances keep torch's default."""

    def __post_init__(self) -> None:
        if not isinstance(self.checkpoint, str) or not self.checkpoint.strip():
            raise ValueError("checkpoint must be a non-empty local .nemo path or Hugging Face repo id")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}; got {self.device!r}")
        if self.instance_kind not in INSTANCE_KINDS:
            raise ValueError(f"instance_kind must be one of {', '.join(INSTANCE_KINDS)}; got {self.instance_kind!r}")
        if self.instance_kind == "KIND_GPU" and self.device == "cpu":
            raise ValueError("instance_kind KIND_GPU cannot compute on device cpu; use KIND_CPU (or device auto/cuda)")
        for name in ("instances", "max_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
        if self.cpu_threads is not None and (
            not isinstance(self.cpu_threads, int) or isinstance(self.cpu_threads, bool) or self.cpu_threads < 1
        ):
            raise ValueError(f"cpu_threads must be an integer >= 1 (or unset); got {self.cpu_threads!r}")
        if not isinstance(self.max_queue_size, int) or isinstance(self.max_queue_size, bool) or self.max_queue_size < 0:
            raise ValueError(f"max_queue_size must be an integer >= 0 (0: unbounded); got {self.max_queue_size!r}")
        if not (isinstance(self.queue_timeout_s, (int, float)) and 0 <= self.queue_timeout_s < 1e6):
            raise ValueError(f"queue_timeout_s must be >= 0 seconds (0: no limit); got {self.queue_timeout_s!r}")
        if not isinstance(self.max_queue_delay_us, int) or self.max_queue_delay_us < 0:
            raise ValueError(f"max_queue_delay_us must be an integer >= 0; got {self.max_queue_delay_us!r}")
        if not (isinstance(self.max_audio_seconds, (int, float)) and self.max_audio_seconds > 0):
            raise ValueError(f"max_audio_seconds must be > 0; got {self.max_audio_seconds!r}")
        self.attention_policy  # validates attention and full_attention_max_seconds (ValueError naming them)
        if not isinstance(self.shm_growth_mb, int) or isinstance(self.shm_growth_mb, bool) or self.shm_growth_mb < 1:
            raise ValueError(f"shm_growth_mb must be an integer >= 1; got {self.shm_growth_mb!r}")

    @property
    def attention_policy(self) -> AttentionPolicy:
        try:
            return AttentionPolicy.parse(str(self.attention), full_attention_max_seconds=self.full_attention_max_seconds)
        except ValueError as error:
            raise ValueError(f"attention / full_attention_max_seconds: {error}") from None

    @property
    def stage_cpu_threads(self) -> int | None:
        """The torch threads rendered for each composing model (see `cpu_threads`); None: torch's default."""
        if self.cpu_threads is not None:
            return self.cpu_threads
        if self.triton_instance_kind != "KIND_CPU" and self.device != "cpu":
            return None
        return max(1, usable_cpus() // (len(COMPOSING_MODELS) * self.instances))

    @property
    def queue_policy(self) -> str:
        """The `default_queue_policy` block of each composing model's dynamic_batching."""
        fields = [f"max_queue_size: {self.max_queue_size}"]
        if self.queue_timeout_s > 0:
            fields += ["timeout_action: REJECT",
                       f"default_timeout_microseconds: {round(self.queue_timeout_s * 1e6)}"]
        return "  default_queue_policy { " + " ".join(fields) + " }"

    @property
    def triton_instance_kind(self) -> str:
        """The `kind` written into each composing model's instance_group."""
        if self.instance_kind != "auto":
            return self.instance_kind
        return {"cuda": "KIND_GPU", "cpu": "KIND_CPU", "auto": "KIND_AUTO"}[self.device]

    @property
    def resolved_checkpoint(self) -> str:
        """The checkpoint as rendered: existing local paths absolute (Triton runs from another directory)."""
        value = os.path.expanduser(self.checkpoint.strip())
        return os.path.abspath(value) if os.path.exists(value) else self.checkpoint.strip()

    @property
    def preferred_batch_sizes(self) -> list[int]:
        """Powers of two from 2 up to max_batch_size, plus max_batch_size itself."""
        sizes = [size for size in (2**k for k in range(1, 16)) if size < self.max_batch_size]
        return sizes[-3:] + [self.max_batch_size] if self.max_batch_size > 1 else []


def usable_cpus() -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota (containers, pods)."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            count = min(count, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, count)


def template_dir() -> Path:
    """The `model_repository/` templates: shipped inside the package, or at the root of a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "model_repository", here.parent / "model_repository"):
        if (candidate / protocol.ENSEMBLE_MODEL / TEMPLATE_NAME).is_file():
            return candidate
    raise FileNotFoundError(
        f"model repository templates not found next to {here} (looked for model_repository/"
        f"{protocol.ENSEMBLE_MODEL}/{TEMPLATE_NAME}); is parakeet-triton installed with its package data?"
    )


def _pbtxt_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _parameters(entries: dict[str, str]) -> str:
    blocks = [
        f"  {{\n    key: {_pbtxt_string(key)}\n    value: {{ string_value: {_pbtxt_string(value)} }}\n  }}"
        for key, value in entries.items()
    ]
    return ",\n".join(blocks)


def model_parameters(options: RenderOptions, model: str) -> dict[str, str]:
    """The `parameters` of one composing model (read back by parakeet_triton.glue.StageSettings)."""
    params = {"checkpoint": options.resolved_checkpoint, "device": options.device}
    if model == protocol.PREPROCESSOR_MODEL:
        params["max_audio_seconds"] = repr(float(options.max_audio_seconds))
    if model == protocol.ENCODER_MODEL:
        params["attention"] = str(options.attention).strip().lower()
        params["full_attention_max_seconds"] = repr(float(options.full_attention_max_seconds))
    # GPU instances take their inputs where the previous stage left them (GPU tensors via DLPack); KIND_CPU
    # instances (Jetson-style) only ever see CPU tensors, as the Python backend there has no GPU tensors.
    params["FORCE_CPU_ONLY_INPUT_TENSORS"] = "yes" if options.triton_instance_kind == "KIND_CPU" else "no"
    threads = options.stage_cpu_threads
    if threads is not None:
        params["cpu_threads"] = str(threads)
    if options.execution_env_path:
        params["EXECUTION_ENV_PATH"] = options.execution_env_path
    return params


def render_config(options: RenderOptions, model: str, templates: Path | None = None) -> str:
    """The rendered config.pbtxt text of one model."""
    templates = templates or template_dir()
    template = string.Template((templates / model / TEMPLATE_NAME).read_text())
    preferred = options.preferred_batch_sizes
    values = {name: getattr(protocol, name) for name in dir(protocol) if name.isupper()}
    values.update(
        max_batch_size=str(options.max_batch_size),
        max_queue_delay_us=str(options.max_queue_delay_us),
        queue_policy=options.queue_policy,
        instances=str(options.instances),
        instance_kind=options.triton_instance_kind,
        preferred_batch_sizes=(f"  preferred_batch_size: [ {', '.join(map(str, preferred))} ]" if preferred else ""),
        parameters=_parameters(model_parameters(options, model)) if model in COMPOSING_MODELS else "",
    )
    body = "\n".join(line for line in template.substitute(values).splitlines() if not line.startswith("# Template:"))
    header = (f"# Rendered by parakeet_triton.render from model_repository/{model}/{TEMPLATE_NAME}:\n"
              "# change the template or the parakeet-serve options, not this file.\n")
    return header + body + "\n"


def render_repository(options: RenderOptions, out_dir: str | os.PathLike) -> Path:
    """Write the model repository for `options` into `out_dir` (created if needed) and return its path.

    Only the four model folders are written; files in them are replaced, anything else is left alone.
    """
    templates = template_dir()
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    # Left by an earlier server: its shutdown's marker (the new one admits requests) and its stages' counts.
    drain_marker = out / drain.MARKER_NAME
    if drain_marker.exists():
        drain_marker.unlink()
    shutil.rmtree(drain.counts_dir(out), ignore_errors=True)
    for model in ALL_MODELS:
        version_dir = out / model / "1"
        version_dir.mkdir(parents=True, exist_ok=True)
        (out / model / "config.pbtxt").write_text(render_config(options, model, templates))
        source = templates / model / "1" / "model.py"
        if source.is_file():
            shutil.copyfile(source, version_dir / "model.py")
    return out
