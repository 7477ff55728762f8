"""Pure-PyTorch NVIDIA Parakeet TDT inference, identical to NeMo's, batched, without NeMo at run time."""

from .attention import AttentionPolicy
from .audio import check_waveform, load_audio
from .checkpoint import DEFAULT_CHECKPOINT, read_nemo, resolve_checkpoint
from .config import ModelConfig
from .errors import CheckpointError, InvalidAudioError, ParakeetError, UnsupportedConfigError
from .model import STAGES, ParakeetTDT, from_pretrained
from .streaming import StreamingContext, StreamingSession, StreamingUpdate, feed_many, finish_many
from .types import Hypothesis, TimedText, Transcript

__all__ = [
    "DEFAULT_CHECKPOINT", "STAGES", "AttentionPolicy", "CheckpointError", "Hypothesis", "InvalidAudioError",
    "ModelConfig", "ParakeetError", "ParakeetTDT", "TimedText", "Transcript", "UnsupportedConfigError",
    "check_waveform", "from_pretrained", "load_audio", "read_nemo", "resolve_checkpoint",
    "StreamingContext", "StreamingSession", "StreamingUpdate", "feed_many", "finish_many",
]
