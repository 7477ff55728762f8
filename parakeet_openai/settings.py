"""The gateway's settings, each declared once: command-line flag, environment variable, default and help."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Any, Callable

from parakeet_triton.protocol import ENSEMBLE_MODEL

DEFAULT_MODEL_ID = "parakeet-tdt-0.6b-v3"
API_KEY_ENV = "PARAKEET_API_KEY"


@dataclasses.dataclass(frozen=True)
class Setting:
    """One setting: `--name` on the command line, `env` in the environment (the flag wins)."""

    name: str
    type: Callable[[str], Any]
    default: Any
    env: str
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


SETTINGS = (
    Setting("triton_url", str, "127.0.0.1:8001", "PARAKEET_TRITON_URL", "Triton's gRPC endpoint, HOST:PORT"),
    Setting("triton_model", str, ENSEMBLE_MODEL, "PARAKEET_TRITON_MODEL", "the ensemble to call in Triton"),
    Setting("host", str, "127.0.0.1", "PARAKEET_OPENAI_HOST", "address to listen on (0.0.0.0 in containers)"),
    Setting("port", int, 9000, "PARAKEET_OPENAI_PORT", "port to listen on"),
    Setting("model_id", str, DEFAULT_MODEL_ID, "PARAKEET_OPENAI_MODEL_ID",
            "the model id served under /v1/models, and accepted in the `model` field"),
    Setting("model_aliases", _names, ("whisper-1",), "PARAKEET_OPENAI_MODEL_ALIASES",
            "comma-separated further `model` values accepted as the served model (apps that hard-code one)"),
    Setting("max_upload_mb", float, 512.0, "PARAKEET_OPENAI_MAX_UPLOAD_MB",
            "largest upload (the whole multipart body) in MiB; larger ones get 413"),
    Setting("max_concurrency", int, 16, "PARAKEET_OPENAI_MAX_CONCURRENCY",
            "transcriptions in flight at once; past it requests get 429 with Retry-After"),
    Setting("request_timeout_s", float, 3600.0, "PARAKEET_OPENAI_REQUEST_TIMEOUT_S",
            "longest wait for Triton's answer to one upload, seconds"),
    Setting("api_key_file", Path, None, "PARAKEET_API_KEY_FILE",
            f"file holding the API key clients must send as `Authorization: Bearer KEY` (or set {API_KEY_ENV}); "
            "without either, no key is asked for"),
    Setting("log_level", str, "info", "PARAKEET_OPENAI_LOG_LEVEL", "uvicorn's log level"),
)
_DEFAULTS = {setting.name: setting.default for setting in SETTINGS}


@dataclasses.dataclass(frozen=True)
class GatewayConfig:
    """Validated settings of one gateway process; `api_key` None means no authentication."""

    triton_url: str = _DEFAULTS["triton_url"]
    triton_model: str = _DEFAULTS["triton_model"]
    host: str = _DEFAULTS["host"]
    port: int = _DEFAULTS["port"]
    model_id: str = _DEFAULTS["model_id"]
    model_aliases: tuple[str, ...] = _DEFAULTS["model_aliases"]
    max_upload_mb: float = _DEFAULTS["max_upload_mb"]
    max_concurrency: int = _DEFAULTS["max_concurrency"]
    request_timeout_s: float = _DEFAULTS["request_timeout_s"]
    api_key: str | None = dataclasses.field(default=None, repr=False)
    log_level: str = _DEFAULTS["log_level"]

    def __post_init__(self) -> None:
        if not self.triton_url or ":" not in self.triton_url:
            raise ValueError(f"triton_url must be HOST:PORT, got {self.triton_url!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be within 0..65535, got {self.port}")
        if not self.model_id.strip():
            raise ValueError("model_id must not be empty")
        if not self.max_upload_mb > 0:
            raise ValueError(f"max_upload_mb must be > 0, got {self.max_upload_mb}")
        if self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        if not self.request_timeout_s > 0:
            raise ValueError(f"request_timeout_s must be > 0, got {self.request_timeout_s}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("the API key is empty")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * (1 << 20))

    @property
    def model_names(self) -> tuple[str, ...]:
        return (self.model_id, *self.model_aliases)


def build_parser(prog: str = "parakeet-openai") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="OpenAI-compatible speech-to-text API (/v1/audio/transcriptions) in front of the Triton "
                    "ensemble. Every flag can also be set by its environment variable; the flag wins.")
    for setting in SETTINGS:
        raw = os.environ.get(setting.env)
        default = setting.type(raw) if raw not in (None, "") else setting.default
        shown = ",".join(default) if isinstance(default, tuple) else default
        parser.add_argument(setting.flag, dest=setting.name, type=setting.type, default=default,
                            help=f"{setting.help} (env {setting.env}; default: {shown})")
    return parser


def read_api_key(api_key_file: Path | None) -> str | None:
    """The key from `api_key_file`, else from PARAKEET_API_KEY, else None; surrounding whitespace removed."""
    if api_key_file is not None:
        try:
            key = api_key_file.read_text().strip()
        except OSError as error:
            raise ValueError(f"api key file {api_key_file}: {error.strerror or error}") from None
        if not key:
            raise ValueError(f"api key file {api_key_file} is empty")
        return key
    key = os.environ.get(API_KEY_ENV, "").strip()
    return key or None


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    values = {s.name: getattr(args, s.name) for s in SETTINGS if s.name != "api_key_file"}
    return GatewayConfig(**values, api_key=read_api_key(args.api_key_file))
