"""Render the Triton model repository for one deployment variant.

`model_repository/<model>/config.pbtxt.template` (and `<model>/1/model.py`) are the only copies of the
configuration; every variant (CPU, GPU, Jetson-style KIND_CPU instances computing on `cuda`) is a set of
:class:`RenderOptions` rendered into a fresh directory by :func:`render_repository`
(`parakeet-serve --render-only DIR` on the command line).

The checkpoint is set in exactly one place, ``RenderOptions.checkpoint``, and rendered into the parameters of
every composing model, so each Triton model loads its own stage from the same source. With ``streaming`` on, the
streaming model (`model_repository/parakeet_streaming`, one Python model holding the whole model and each stream's
state) and its aliases (ensembles over it, `model_repository/parakeet_streaming_alias`) are rendered too.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import string
from pathlib import Path
from typing import Any

from parakeet_core.attention import AttentionPolicy

from . import drain, protocol
from .settings import DEFAULT_MODEL_ALIASES, REPOSITORY_SETTINGS

COMPOSING_MODELS = protocol.COMPOSING_MODELS
ALL_MODELS = COMPOSING_MODELS + (protocol.ENSEMBLE_MODEL,)
TEMPLATE_NAME = "config.pbtxt.template"
__all__ = ["ALL_MODELS", "COMPOSING_MODELS", "DEFAULT_MODEL_ALIASES", "RenderOptions", "TEMPLATE_NAME",
           "ensemble_parameters", "model_parameters", "render_config", "render_repository", "template_dir",
           "template_model", "usable_cpus"]

_RenderSettings = dataclasses.make_dataclass(
    "_RenderSettings",
    [(setting.name, Any, dataclasses.field(default=setting.default)) for setting in REPOSITORY_SETTINGS],
    frozen=True,
)


@dataclasses.dataclass(frozen=True)
class RenderOptions(_RenderSettings):
    """Everything that differs between deployments: one field per setting of
    :data:`parakeet_triton.settings.REPOSITORY_SETTINGS` (name, default and meaning there).

    Validated on construction, each field by its setting's checks, then the combinations (ValueError naming the
    field). `model_aliases` may be given as any sequence of names; it is kept as a tuple.
    """

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_aliases", tuple(self.model_aliases))
        object.__setattr__(self, "streaming_model_aliases", tuple(self.streaming_model_aliases))
        if isinstance(self.streaming_contexts, list):
            object.__setattr__(self, "streaming_contexts", tuple(self.streaming_contexts))
        for setting in REPOSITORY_SETTINGS:
            setting.validate(getattr(self, setting.name))
        named = [("model_name", self.model_name)] + [("model_aliases", a) for a in self.model_aliases]
        if self.streaming:
            named += [("streaming_model_name", self.streaming_model_name)]
            named += [("streaming_model_aliases", a) for a in self.streaming_model_aliases]
        seen: set[str] = set()
        for field, name in named:
            if name in COMPOSING_MODELS:
                raise ValueError(f"{field}: {name!r} is the name of a composing model; choose another")
            if name in seen:
                raise ValueError(f"{field}: {name!r} is given twice")
            seen.add(name)
        if self.instance_kind == "KIND_GPU" and self.device == "cpu":
            raise ValueError("instance_kind KIND_GPU cannot compute on device cpu; use KIND_CPU (or device auto/cuda)")
        self.attention_policy  # validates attention and full_attention_max_seconds together

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
        processes = len(COMPOSING_MODELS) + (1 if self.streaming else 0)
        return max(1, usable_cpus() // (processes * self.instances))

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
    def force_cpu_only_input_tensors(self) -> str:
        """"yes" for KIND_CPU instances, which the Python backend (Jetson's too) hands CPU tensors only; "no" lets
        GPU instances take their inputs where the previous stage left them (GPU tensors via DLPack)."""
        return "yes" if self.triton_instance_kind == "KIND_CPU" else "no"

    @property
    def resolved_checkpoint(self) -> str:
        """The checkpoint as rendered: existing local paths absolute (Triton runs from another directory)."""
        value = os.path.expanduser(self.checkpoint.strip())
        return os.path.abspath(value) if os.path.exists(value) else self.checkpoint.strip()

    @property
    def public_models(self) -> tuple[str, ...]:
        """The ensemble's names: `model_name`, then the aliases."""
        return (self.model_name,) + self.model_aliases

    @property
    def streaming_models(self) -> tuple[str, ...]:
        """The streaming model's names (`streaming_model_name`, then its aliases); none unless `streaming`."""
        return (self.streaming_model_name,) + self.streaming_model_aliases if self.streaming else ()

    @property
    def served_models(self) -> tuple[str, ...]:
        """Every model folder of the rendered repository."""
        return COMPOSING_MODELS + self.public_models + self.streaming_models

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
    """The `parameters` of one model (`protocol.ENSEMBLE_MODEL` for the public model): each setting whose
    `parameter` names this model, unless unset (read back by parakeet_triton.glue.StageSettings)."""
    params = {}
    for setting in REPOSITORY_SETTINGS:
        parameter = setting.parameter
        if parameter is None or model not in parameter.models:
            continue
        value = getattr(options, parameter.source or setting.name)
        if value is not None and value != "":
            params[parameter.key] = parameter.text(value)
    return params


def ensemble_parameters(options: RenderOptions) -> dict[str, str]:
    """The public model's `parameters`: the limits a client needs, so that it asks only the model it calls."""
    return model_parameters(options, protocol.ENSEMBLE_MODEL)


def template_model(options: RenderOptions, model: str) -> str:
    """The template folder a served model is rendered from."""
    if model in options.public_models:
        return protocol.ENSEMBLE_MODEL
    if options.streaming and model == options.streaming_model_name:
        return protocol.STREAMING_MODEL
    if options.streaming and model in options.streaming_model_aliases:
        return protocol.STREAMING_ALIAS_TEMPLATE
    return model


def render_config(options: RenderOptions, model: str, templates: Path | None = None) -> str:
    """The rendered config.pbtxt text of one model (a composing model's name, one of `public_models`, or, with
    `streaming`, one of `streaming_models`)."""
    templates = templates or template_dir()
    public = model in options.public_models
    source_model = template_model(options, model)
    template = string.Template((templates / source_model / TEMPLATE_NAME).read_text())
    preferred = options.preferred_batch_sizes
    values = {name: getattr(protocol, name) for name in dir(protocol) if name.isupper()}
    values.update(
        max_batch_size=str(options.max_batch_size),
        max_queue_delay_us=str(options.max_queue_delay_us),
        queue_policy=options.queue_policy,
        instances=str(options.instances),
        instance_kind=options.triton_instance_kind,
        preferred_batch_sizes=(f"  preferred_batch_size: [ {', '.join(map(str, preferred))} ]" if preferred else ""),
        parameters=_parameters(ensemble_parameters(options) if public else model_parameters(options, source_model)),
        model_name=model,
        streaming_model_name=options.streaming_model_name,
        streaming_idle_us=str(round(options.streaming_idle_timeout_s * 1e6)),
        streaming_max_streams=str(options.streaming_max_streams),
        streaming_max_queue_delay_us=str(options.streaming_max_queue_delay_us),
    )
    body = "\n".join(line for line in template.substitute(values).splitlines() if not line.startswith("# Template:"))
    header = (f"# Rendered by parakeet_triton.render from model_repository/{source_model}/{TEMPLATE_NAME}:\n"
              "# change the template or the parakeet-serve options, not this file.\n")
    return header + body + "\n"


def render_repository(options: RenderOptions, out_dir: str | os.PathLike) -> Path:
    """Write the model repository for `options` into `out_dir` (created if needed) and return its path.

    Only the model folders are written (the composing models, the public model and its aliases, the streaming
    model and its aliases when on); files in them are replaced, anything else is left alone.
    """
    templates = template_dir()
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    # Left by an earlier server: its shutdown's marker (the new one admits requests) and its stages' counts.
    drain_marker = out / drain.MARKER_NAME
    if drain_marker.exists():
        drain_marker.unlink()
    shutil.rmtree(drain.counts_dir(out), ignore_errors=True)
    for model in options.served_models:
        version_dir = out / model / "1"
        version_dir.mkdir(parents=True, exist_ok=True)
        (out / model / "config.pbtxt").write_text(render_config(options, model, templates))
        source = templates / template_model(options, model) / "1" / "model.py"
        if source.is_file():
            shutil.copyfile(source, version_dir / "model.py")
    return out
