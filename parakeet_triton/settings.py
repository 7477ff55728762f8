"""Every setting of `parakeet-serve`, each declared once: name, type, default, environment variable, help, checks,
and, for the model-repository settings, the config parameter and models it is rendered into.

Derived from this table:

- the `parakeet-serve` command line (:func:`add_arguments`; every flag also from its `PARAKEET_<NAME>` variable,
  the flag wins);
- the fields, defaults and per-field validation of :class:`parakeet_triton.render.RenderOptions`
  (:data:`REPOSITORY_SETTINGS`);
- the `parameters` rendered into each model's config.pbtxt (:func:`parakeet_triton.render.model_parameters`);
- their reading back, with the same parsing and checks, in :meth:`parakeet_triton.glue.StageSettings.from_args`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Iterable, Mapping

from parakeet_core.attention import DEFAULT_FULL_ATTENTION_MAX_SECONDS
from parakeet_core.checkpoint import DEFAULT_CHECKPOINT
from parakeet_core.streaming import DEFAULT_STREAMING_SECONDS

from . import protocol
from .server import ALLOCATORS, DEFAULT_ALLOCATOR

DEVICES = ("auto", "cpu", "cuda")
INSTANCE_KINDS = ("auto", "KIND_CPU", "KIND_GPU")
DEFAULT_MODEL_ALIASES = ("transducer",)
DEFAULT_STREAMING_ALIASES = ("streaming_wenet",)
"""Further names of the public model: `transducer` is the model name that Triton-ASR-Client and k2-fsa/sherpa's
Triton client ask for by default, so they work with no flags."""
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_MODEL_NAME_RULE = "letters, digits, '_', '.', '-'; starting with a letter or digit"


@dataclasses.dataclass(frozen=True)
class Check:
    """A condition on a setting's value, and the `requirement` that error messages state ("an integer >= 1")."""

    requirement: str
    accepts: Callable[[Any], bool]


@dataclasses.dataclass(frozen=True)
class Parameter:
    """Where a model-repository setting goes: the config.pbtxt parameter `key` of each model in `models`.

    The value rendered is the RenderOptions attribute `source` (default: the setting itself) as `text`; an unset
    value (None or empty) is left out. `read_by_glue` False marks a parameter that Triton's Python backend reads
    itself, not parakeet_triton.glue; `required` ones must be present for an instance to start.
    """

    key: str
    models: tuple[str, ...]
    source: str | None = None
    text: Callable[[Any], str] = str
    read_by_glue: bool = True
    required: bool = False


@dataclasses.dataclass(frozen=True)
class Setting:
    """One setting: `--name` on the command line, `env` in the environment (the flag wins; None: flag only).

    `type` parses the text of a flag, a variable or a rendered parameter; `choices` and `check` say which values
    are valid; `parameter` says where a model-repository setting is rendered. `shown_default` describes a default
    that its value (often None) does not; `const` is the value of the flag given alone.
    """

    name: str
    type: Callable[[str], Any]
    default: Any
    env: str | None
    help: str
    choices: tuple[str, ...] = ()
    check: Check | None = None
    parameter: Parameter | None = None
    metavar: str | None = None
    const: Any = None
    shown_default: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def requirement(self) -> str:
        """What a valid value is, as error messages say it ("an integer >= 1", "one of auto, cpu, cuda")."""
        if self.check is not None:
            return self.check.requirement
        if self.choices:
            return "one of " + ", ".join(self.choices)
        return _TYPE_NOUNS.get(getattr(self.type, "__name__", ""), "text")

    def accepts(self, value: Any) -> bool:
        """Whether `value` is valid for this setting (None is, for a setting that is unset by default)."""
        if value is None and self.default is None:
            return True
        if self.choices and value not in self.choices:
            return False
        return self.check is None or self.check.accepts(value)

    def validate(self, value: Any) -> None:
        """ValueError naming the setting ("instances must be an integer >= 1; got 0") if `value` is invalid."""
        if not self.accepts(value):
            unset = " (or unset)" if self.default is None else ""
            raise ValueError(f"{self.name} must be {self.requirement}{unset}; got {value!r}")

    def parse(self, text: str) -> Any:
        """The value of `text` (a flag's, a variable's or a parameter's); ValueError("must be ...; got ...")."""
        try:
            value = self.type(text)
            valid = self.accepts(value)
        except (TypeError, ValueError):
            valid = False
        if not valid:
            raise ValueError(f"must be {self.requirement}; got {text!r}")
        return value

    @property
    def default_text(self) -> str:
        """The default as --help states it."""
        if self.shown_default is not None:
            return self.shown_default
        if isinstance(self.default, tuple):
            return ",".join(self.default) or "''"
        return "unset" if self.default is None else str(self.default)


_TYPE_NOUNS = {"int": "an integer", "float": "a number", "names": "comma-separated names",
               "switch": "on or off (also true/false, yes/no, 1/0)"}


def optional(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """`parse` for a setting that may be unset: blank text means None."""

    def parse_optional(text: str) -> Any:
        return parse(text) if text.strip() else None

    parse_optional.__name__ = parse.__name__
    return parse_optional


def names(text: str) -> tuple[str, ...]:
    """Comma-separated names; '' is none."""
    return tuple(name.strip() for name in text.split(",") if name.strip())


_SWITCH_WORDS = {"on": True, "true": True, "yes": True, "1": True, "off": False, "false": False, "no": False, "0": False}


def switch(text: str) -> bool:
    """on/off, true/false, yes/no or 1/0 (any case)."""
    try:
        return _SWITCH_WORDS[text.strip().lower()]
    except KeyError:
        raise ValueError(f"not on or off: {text!r}") from None


def contexts(text: str) -> tuple[float, float, float]:
    """"LEFT,CHUNK,RIGHT" seconds, e.g. "10,2,2"."""
    parts = text.split(",")
    if len(parts) != 3:
        raise ValueError(f"expected LEFT,CHUNK,RIGHT seconds, got {text!r}")
    return tuple(float(part) for part in parts)


def contexts_text(value: tuple[float, float, float]) -> str:
    """Contexts as rendered into the parameter and shown by --help ("10,2,2")."""
    return ",".join(f"{seconds:g}" for seconds in value)


def _are_contexts(value: Any) -> bool:
    return (isinstance(value, tuple) and len(value) == 3 and all(_is_number(v) and math.isfinite(v) for v in value)
            and min(value) >= 0 and value[1] > 0)


def _is_integer(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def integer_at_least(minimum: int, note: str = "") -> Check:
    return Check(f"an integer >= {minimum}" + (f" ({note})" if note else ""), lambda value: _is_integer(value, minimum))


def is_model_name(value: Any) -> bool:
    return isinstance(value, str) and _MODEL_NAME.fullmatch(value) is not None


def decimal(value: Any) -> str:
    """A number as rendered into a parameter: Python's float repr ("10800.0")."""
    return repr(float(value))


_COMPOSING = protocol.COMPOSING_MODELS
_LOADING = _COMPOSING + (protocol.STREAMING_MODEL,)
"""The models that load the checkpoint (the streaming model only when --streaming is on)."""

def model_name_setting(name: str, default: str, help: str) -> Setting:
    """A setting naming a model (`--<name>`, PARAKEET_<NAME>)."""
    return Setting(name, str, default, f"PARAKEET_{name.upper()}", help, metavar="NAME",
                   check=Check(f"a model name ({_MODEL_NAME_RULE})", is_model_name))


def model_aliases_setting(name: str, default: tuple[str, ...], help: str) -> Setting:
    """A setting listing further names of a model, comma-separated."""
    return Setting(name, names, default, f"PARAKEET_{name.upper()}", help, metavar="NAMES",
                   check=Check(f"model names ({_MODEL_NAME_RULE})",
                               lambda value: isinstance(value, tuple) and all(map(is_model_name, value))))


REPOSITORY_SETTINGS: tuple[Setting, ...] = (
    Setting("checkpoint", str, DEFAULT_CHECKPOINT, "PARAKEET_CHECKPOINT",
            "local .nemo file or Hugging Face repo id; an existing local path is made absolute when rendered",
            metavar="PATH|HF_ID",
            check=Check("a non-empty local .nemo path or Hugging Face repo id",
                        lambda value: isinstance(value, str) and bool(value.strip())),
            parameter=Parameter(protocol.CHECKPOINT_PARAMETER, _LOADING, source="resolved_checkpoint",
                                required=True)),
    model_name_setting("model_name", protocol.ENSEMBLE_MODEL, "name of the public (ensemble) model that clients call"),
    model_aliases_setting("model_aliases", DEFAULT_MODEL_ALIASES,
                          "comma-separated further names of the same model, for clients with a fixed model name: "
                          "'transducer' is Triton-ASR-Client's and k2-fsa/sherpa's default; '' for none. Each alias "
                          "is one more ensemble config over the same composing models, so it costs no memory"),
    Setting("device", str, "auto", "PARAKEET_DEVICE",
            "where the models compute; auto = each instance's GPU for KIND_GPU instances, else CPU",
            choices=DEVICES, parameter=Parameter(protocol.DEVICE_PARAMETER, _LOADING)),
    Setting("instance_kind", str, "auto", "PARAKEET_INSTANCE_KIND",
            "Triton instance kind; auto = KIND_GPU for --device cuda, KIND_CPU for cpu, KIND_AUTO for auto. "
            "Jetson-style: --instance-kind KIND_CPU --device cuda",
            choices=INSTANCE_KINDS,
            parameter=Parameter(protocol.FORCE_CPU_ONLY_INPUT_TENSORS_PARAMETER, _LOADING,
                                source="force_cpu_only_input_tensors", read_by_glue=False)),
    Setting("instances", int, 1, "PARAKEET_INSTANCES",
            "instances of each composing model (per GPU for KIND_GPU)",
            metavar="N", check=integer_at_least(1)),
    Setting("max_batch_size", int, 16, "PARAKEET_MAX_BATCH_SIZE",
            "largest batch in clips, per request and per dynamic batch, of every model",
            metavar="N", check=integer_at_least(1)),
    Setting("max_queue_delay_us", int, 1000, "PARAKEET_MAX_QUEUE_DELAY_US",
            "dynamic-batching queue delay of the encoder and decoder, microseconds",
            metavar="US", check=integer_at_least(0)),
    Setting("max_queue_size", int, 128, "PARAKEET_MAX_QUEUE_SIZE",
            "requests each composing model holds waiting; past it requests are refused at once with UNAVAILABLE, "
            "which clients retry with backoff (0: unbounded)",
            metavar="N", check=integer_at_least(0, "0: unbounded")),
    Setting("queue_timeout_s", float, 0.0, "PARAKEET_QUEUE_TIMEOUT_S",
            "longest wait in a composing model's queue before a request is refused with UNAVAILABLE; execution "
            "time does not count (0: no limit)",
            metavar="S",
            check=Check(">= 0 seconds (0: no limit)", lambda value: _is_number(value) and 0 <= value < 1e6)),
    Setting("max_audio_seconds", float, protocol.DEFAULT_MAX_AUDIO_SECONDS, "PARAKEET_MAX_AUDIO_SECONDS",
            "longest clip accepted, in seconds (the default is 3 h); longer clips get an error response. The "
            "streaming model applies it to each piece of a stream",
            metavar="S", check=Check("a number > 0", lambda value: _is_number(value) and value > 0),
            parameter=Parameter(protocol.MAX_AUDIO_SECONDS_PARAMETER,
                                (protocol.PREPROCESSOR_MODEL, protocol.ENSEMBLE_MODEL, protocol.STREAMING_MODEL),
                                text=decimal)),
    Setting("attention", str, "auto", "PARAKEET_ATTENTION",
            "encoder attention: auto (full up to --full-attention-max-seconds, local 256 frames each side beyond), "
            "full, or N = local attention to N encoder frames (80 ms each) on each side",
            metavar="auto|full|N",
            parameter=Parameter(protocol.ATTENTION_PARAMETER, (protocol.ENCODER_MODEL,),
                                text=lambda value: str(value).strip().lower())),
    Setting("full_attention_max_seconds", float, DEFAULT_FULL_ATTENTION_MAX_SECONDS,
            "PARAKEET_FULL_ATTENTION_MAX_SECONDS",
            "longest clip that --attention auto gives full attention",
            metavar="S",
            check=Check("a finite number >= 0",
                        lambda value: _is_number(value) and math.isfinite(value) and value >= 0),
            parameter=Parameter(protocol.FULL_ATTENTION_MAX_SECONDS_PARAMETER, (protocol.ENCODER_MODEL,),
                                text=decimal)),
    Setting("shm_growth_mb", int, 64, "PARAKEET_SHM_GROWTH_MB",
            "growth step of each Python-backend stub's /dev/shm region in MiB (the backend's own default, 1 MiB, "
            "would grow through hundreds of steps for one 3-hour request)",
            metavar="MB", check=integer_at_least(1)),
    Setting("execution_env_path", optional(str), None, "PARAKEET_EXECUTION_ENV_PATH",
            "EXECUTION_ENV_PATH for the Python backend stub (venv/conda directory or packed .tar.gz); not needed "
            "when the stub's `python3` on PATH has parakeet-triton installed",
            metavar="DIR",
            parameter=Parameter(protocol.EXECUTION_ENV_PATH_PARAMETER, _LOADING, read_by_glue=False)),
    Setting("cpu_threads", optional(int), None, "PARAKEET_CPU_THREADS",
            "torch intra-op threads per model instance",
            metavar="N", check=integer_at_least(1),
            parameter=Parameter(protocol.CPU_THREADS_PARAMETER, _LOADING, source="stage_cpu_threads"),
            shown_default="for CPU instances, the usable cores divided among the 3 x --instances stage processes "
            "(4 x with --streaming), at least 1; GPU instances: torch's"),
    Setting("streaming", switch, False, "PARAKEET_STREAMING",
            "also serve the streaming model (--streaming-model-name): live audio sent piece by piece with Triton's "
            "sequence parameters, partial transcripts back (docs/streaming.md). It loads one more copy of the "
            "model per instance (flag alone: on)",
            metavar="on|off", const=True, shown_default="off"),
    model_name_setting("streaming_model_name", protocol.STREAMING_MODEL, "name of the streaming model (with --streaming)"),
    model_aliases_setting("streaming_model_aliases", DEFAULT_STREAMING_ALIASES,
                          "comma-separated further names of the streaming model (with --streaming): "
                          "'streaming_wenet' is the name Triton-ASR-Client's --streaming mode can ask for; '' for "
                          "none. Each alias is an ensemble over the same model, so it costs no memory"),
    Setting("streaming_contexts", contexts, DEFAULT_STREAMING_SECONDS, "PARAKEET_STREAMING_CONTEXTS",
            "left context, chunk and right context of the streaming model in seconds, rounded down to whole "
            "encoder frames (80 ms); a token is final chunk + right seconds after its audio at the latest, plus "
            "compute. 10,10,5 suits long files",
            metavar="L,C,R",
            check=Check("three numbers of seconds LEFT,CHUNK,RIGHT, >= 0, the chunk > 0", _are_contexts),
            parameter=Parameter(protocol.STREAMING_CONTEXTS_PARAMETER, (protocol.STREAMING_MODEL,),
                                text=contexts_text),
            shown_default=contexts_text(DEFAULT_STREAMING_SECONDS)),
    Setting("streaming_idle_timeout_s", float, 60.0, "PARAKEET_STREAMING_IDLE_TIMEOUT_S",
            "a stream with no request for this long is dropped (its state freed); a later request of it without "
            "sequence_start is refused",
            metavar="S", check=Check("a number of seconds > 0 (at most a day)",
                                     lambda value: _is_number(value) and 0 < value <= 86400)),
    Setting("streaming_max_streams", int, 64, "PARAKEET_STREAMING_MAX_STREAMS",
            "streams each streaming instance holds at once (the sequence batcher's max_candidate_sequences); "
            "the requests of further streams wait until one ends or is dropped",
            metavar="N", check=integer_at_least(1)),
    Setting("streaming_max_queue_delay_us", int, 2000, "PARAKEET_STREAMING_MAX_QUEUE_DELAY_US",
            "how long the streaming model's sequence batcher waits for more streams' requests to batch together, "
            "microseconds",
            metavar="US", check=integer_at_least(0)),
)
"""The settings rendered into the model repository: the fields of parakeet_triton.render.RenderOptions."""

SERVER_SETTINGS: tuple[Setting, ...] = (
    Setting("render_only", optional(str), None, None,
            "write the rendered model repository into DIR and exit (for containers / Kubernetes)",
            metavar="DIR"),
    Setting("host", str, "127.0.0.1", "PARAKEET_HOST",
            "address for HTTP, gRPC and metrics (0.0.0.0 in containers)",
            metavar="ADDR"),
    Setting("http_port", int, 8000, "PARAKEET_HTTP_PORT",
            "HTTP port (parakeet-serve's validating front; Triton's HTTP listens on a private Unix socket behind it)",
            metavar="PORT"),
    Setting("grpc_port", int, 8001, "PARAKEET_GRPC_PORT", "Triton's gRPC port", metavar="PORT"),
    Setting("metrics_port", int, 8002, "PARAKEET_METRICS_PORT", "Triton's Prometheus metrics port", metavar="PORT"),
    Setting("log_verbose", int, 0, "PARAKEET_LOG_VERBOSE", "tritonserver --log-verbose level (flag alone: 1)",
            metavar="N", const=1),
    Setting("log_file", optional(str), None, "PARAKEET_LOG_FILE",
            "write tritonserver's log to PATH (overwritten at each start); the terminal then shows parakeet-serve's "
            "own lines and tritonserver's real errors only",
            metavar="PATH", shown_default="all on the terminal"),
    Setting("tritonserver", optional(str), None, "PARAKEET_TRITONSERVER", "tritonserver binary",
            metavar="PATH", shown_default="the one on PATH, else the nvidia-pytriton wheel's"),
    Setting("ready_timeout", float, 1800.0, "PARAKEET_READY_TIMEOUT",
            "seconds to wait for the server to load and become ready",
            metavar="S"),
    Setting("admin_key", optional(str), None, "PARAKEET_ADMIN_KEY",
            "operator key for Triton's admin APIs (shared-memory registration, logging, trace, model repository): "
            f"callers send it as the '{protocol.ADMIN_KEY_HEADER}' HTTP header or the "
            f"'{protocol.GRPC_ADMIN_KEY_HEADER}' gRPC metadata",
            metavar="KEY", shown_default="a random key per start, i.e. closed to everyone"),
    Setting("max_request_mb", optional(int), None, "PARAKEET_MAX_REQUEST_MB",
            "largest HTTP request body in MiB, refused with 413 before it is read. gRPC is bounded by "
            "--max-audio-seconds",
            metavar="MB", shown_default="one clip of --max-audio-seconds as FP32 binary data + 64"),
    Setting("malloc", optional(str), None, "PARAKEET_MALLOC",
            "allocator preloaded into tritonserver and the stage processes (LD_PRELOAD); tcmalloc keeps the "
            "server's memory flat under mixed request lengths (docs/load-test.md, Soak)",
            choices=tuple(sorted(ALLOCATORS)), shown_default=f"{DEFAULT_ALLOCATOR} when installed, else the system's"),
    Setting("openai_port", optional(int), None, "PARAKEET_OPENAI_PORT",
            "also run the OpenAI-compatible API (parakeet-openai) on this port of --host, stopped with the server; "
            "its other settings come from its PARAKEET_OPENAI_* variables (docs/openai.md)",
            metavar="PORT", shown_default="off"),
    Setting("exit_timeout_secs", int, 8, "PARAKEET_EXIT_TIMEOUT_SECS",
            "on SIGTERM/SIGINT, seconds the requests in flight get to finish while new ones are refused with "
            "UNAVAILABLE, before tritonserver is stopped",
            metavar="S"),
)
"""The launcher's own settings (command line and environment only)."""

SETTINGS = REPOSITORY_SETTINGS + SERVER_SETTINGS
BY_NAME: Mapping[str, Setting] = {setting.name: setting for setting in SETTINGS}
DEFAULTS: Mapping[str, Any] = {setting.name: setting.default for setting in SETTINGS}
PARAMETERS: Mapping[str, Setting] = {setting.parameter.key: setting for setting in SETTINGS if setting.parameter}
"""The settings rendered into config parameters, by parameter key."""


def environment_value(setting: Setting, environ: Mapping[str, str]) -> Any:
    """The setting's value from its variable in `environ`, else its default; ValueError naming the variable."""
    text = environ.get(setting.env) if setting.env else None
    if text is None:
        return setting.default
    try:
        return setting.parse(text)
    except ValueError as error:
        raise ValueError(f"{setting.env} {error}") from None


def add_arguments(group: Any, settings: Iterable[Setting], environ: Mapping[str, str]) -> None:
    """One option per setting, its default taken from `environ` (ValueError for a variable that does not parse)."""
    for setting in settings:
        default = environment_value(setting, environ)
        help_text = f"{setting.help} (env {setting.env}; default: {setting.default_text})" if setting.env else setting.help
        group.add_argument(setting.flag, dest=setting.name, type=setting.type, default=default,
                           choices=setting.choices or None, metavar=setting.metavar,
                           nargs="?" if setting.const is not None else None, const=setting.const,
                           help=help_text.replace("%", "%%"))
