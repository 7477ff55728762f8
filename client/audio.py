"""Turning whatever the caller has (a path, an array, an array with its rate) into 16 kHz mono float32.

Files are read with `soundfile` first (WAV, FLAC, OGG/Vorbis, and MP3 with libsndfile >= 1.1); anything else
(m4a/AAC, opus in some containers, video) goes through `ffmpeg` when it is on PATH. Channels are averaged to
mono and the rate is converted with `soxr`.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Tuple, Union

import numpy as np
import soundfile
import soxr

from parakeet_triton.protocol import SAMPLE_RATE

from .errors import AudioDecodeError

AudioInput = Union[str, os.PathLike, np.ndarray, Tuple[np.ndarray, int]]
"""A path to a media file, a float array already at 16 kHz, or `(array, sample_rate)`."""

MEDIA_SUFFIXES = frozenset({
    ".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".m4a", ".aac", ".wma", ".aif", ".aiff", ".au",
    ".caf", ".webm", ".mka", ".mp4", ".m4v", ".mov", ".mkv", ".avi", ".3gp", ".amr", ".ac3", ".spx",
})
"""File name endings the CLI picks up when it is given a directory."""

FFMPEG_HINT = "install ffmpeg (and put it on PATH) to read more formats such as m4a, mp3, ogg/opus and video"


@dataclass(frozen=True)
class AudioClip:
    """One request's audio: mono float32 samples at the server's rate (16 kHz), and a name for messages."""

    samples: np.ndarray
    name: str = "audio"

    def __post_init__(self) -> None:
        samples = self.samples
        if not isinstance(samples, np.ndarray):
            raise TypeError(f"{self.name}: samples must be a numpy array, got {type(samples).__name__}")
        if samples.ndim != 1:
            raise ValueError(f"{self.name}: samples must be 1-D (mono), got shape {samples.shape}")
        if samples.dtype != np.float32:
            raise ValueError(f"{self.name}: samples must be float32, got {samples.dtype}")
        if samples.size == 0:
            raise ValueError(f"{self.name}: the clip holds no samples")
        if not np.isfinite(samples).all():
            raise ValueError(f"{self.name}: samples contain NaN or infinity")

    @property
    def seconds(self) -> float:
        return self.samples.size / SAMPLE_RATE


def load_clip(item: AudioInput, name: str | None = None) -> AudioClip:
    """Read or convert one item into an AudioClip (16 kHz mono float32)."""
    if isinstance(item, (str, os.PathLike)):
        samples, sample_rate = read_audio_file(item)
        name = name or str(item)
        if samples.size == 0:
            raise AudioDecodeError(f"{name}: the file holds no audio samples")
    elif isinstance(item, tuple):
        if len(item) != 2:
            raise TypeError(f"expected (array, sample_rate), got a tuple of {len(item)} items")
        samples, sample_rate = item
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
            raise ValueError(f"sample_rate must be a positive integer, got {sample_rate!r}")
        samples = _as_float_array(samples)
    elif isinstance(item, np.ndarray):
        samples, sample_rate = _as_float_array(item), SAMPLE_RATE
    else:
        raise TypeError(f"expected a path, a numpy array or (array, sample_rate), got {type(item).__name__}")
    return AudioClip(to_mono_16k(samples, int(sample_rate)), name=name or "audio")


def read_audio_file(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Decode a file to float32 `(frames,)` or `(frames, channels)` and its sample rate.

    Raises AudioDecodeError (with soundfile's and ffmpeg's reasons) when no decoder can read it.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioDecodeError(f"{path}: no such file")
    try:
        samples, sample_rate = soundfile.read(str(path), dtype="float32", always_2d=False)
        return samples, int(sample_rate)
    except Exception as error:  # libsndfile raises LibsndfileError / RuntimeError / TypeError by format
        soundfile_reason = _first_line(error)
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise AudioDecodeError(f"{path}: cannot read this file (soundfile: {soundfile_reason}); {FFMPEG_HINT}")
    try:
        return _decode_with_ffmpeg(ffmpeg, path)
    except AudioDecodeError as error:
        raise AudioDecodeError(f"{path}: cannot read this file (soundfile: {soundfile_reason}; ffmpeg: {error})") \
            from None


def to_mono_16k(samples: np.ndarray, sample_rate: int) -> np.ndarray:
    """Average the channels of `(frames,)` or `(frames, channels)` float audio and resample it to 16 kHz."""
    if samples.ndim == 2:
        samples = samples.mean(axis=1, dtype=np.float32)
    elif samples.ndim != 1:
        raise ValueError(f"audio must be (frames,) or (frames, channels), got shape {samples.shape}")
    if sample_rate != SAMPLE_RATE and samples.size:
        samples = soxr.resample(samples, sample_rate, SAMPLE_RATE, quality="HQ")
    return np.ascontiguousarray(samples, dtype=np.float32)


def _as_float_array(samples: object) -> np.ndarray:
    """Accept float arrays as they are and integer PCM scaled to [-1, 1); (channels, frames) is refused."""
    array = np.asarray(samples)
    if array.ndim == 2 and array.shape[0] < array.shape[1]:
        raise ValueError(f"audio of shape {array.shape} looks like (channels, frames); "
                         "pass mono 1-D samples or (frames, channels)")
    if np.issubdtype(array.dtype, np.integer):
        return (array.astype(np.float32) / float(-np.iinfo(array.dtype).min)).astype(np.float32)
    if not np.issubdtype(array.dtype, np.floating):
        raise TypeError(f"audio samples must be float or integer PCM, got dtype {array.dtype}")
    return array.astype(np.float32, copy=False)


def _decode_with_ffmpeg(ffmpeg: str, path: Path) -> tuple[np.ndarray, int]:
    command = [ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error", "-i", str(path),
               "-map", "0:a:0", "-vn", "-c:a", "pcm_f32le", "-f", "wav", "pipe:1"]
    completed = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False)
    if completed.returncode != 0 or not completed.stdout:
        reason = completed.stderr.decode("utf-8", "replace").strip().splitlines()
        raise AudioDecodeError(_shorten(reason[-1] if reason else f"exit code {completed.returncode}"))
    try:
        samples, sample_rate = soundfile.read(io.BytesIO(completed.stdout), dtype="float32", always_2d=False)
    except Exception as error:
        raise AudioDecodeError(f"unreadable output: {_first_line(error)}") from None
    return samples, int(sample_rate)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return _shorten(text[0] if text else type(error).__name__)


def _shorten(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."

