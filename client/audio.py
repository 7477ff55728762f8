"""Turning whatever the caller has (a path, an array, an array with its rate) into mono float32 at 16 kHz.

The one audio reader of the project: the client, the OpenAI gateway and parakeet_core (`transcribe()`, `python -m
parakeet_core`) all decode through `decode_audio`, so a file gives the same samples everywhere. It needs numpy,
soundfile and soxr only (neither torch nor tritonclient).

- Files are read with `soundfile` first (WAV, FLAC, OGG/Vorbis, and MP3 with libsndfile >= 1.1); anything else
  (m4a/AAC, opus in some containers, video) goes through `ffmpeg` when it is on PATH, which decodes the first audio
  stream at its own rate and channels.
- Arrays: float as they are; integer PCM scaled to [-1, 1) (unsigned PCM centred first); `(frames, channels)`.
- Channels are averaged to mono, then the rate is converted with `soxr` (HQ), for files and arrays alike.
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

from .errors import AudioDecodeError, NoAudioStreamError
from .protocol import SAMPLE_RATE

AudioInput = Union[str, os.PathLike, np.ndarray, Tuple[np.ndarray, int]]
"""A path to a media file, a float or integer-PCM array already at 16 kHz, or `(array, sample_rate)`."""

MEDIA_SUFFIXES = frozenset({
    ".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".m4a", ".aac", ".wma", ".aif", ".aiff", ".au",
    ".caf", ".webm", ".mka", ".mp4", ".m4v", ".mov", ".mkv", ".avi", ".3gp", ".amr", ".ac3", ".spx",
})
"""File name endings the CLIs (`parakeet-client`, `python -m parakeet_core`) pick up when given a directory."""

FFMPEG_HINT = "install ffmpeg (and put it on PATH) to read more formats such as m4a, mp3, ogg/opus and video"
FFMPEG_NO_AUDIO_STREAM = ("matches no streams", "does not contain any stream")
"""What ffmpeg prints when the input opens but has no audio stream to map."""
FFMPEG_NOT_MEDIA = "Invalid data found when processing input"
"""What ffmpeg prints when it recognises no container format in the input."""


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
    """Read or convert one item into an AudioClip (16 kHz mono float32); see `decode_audio`."""
    if name is None and isinstance(item, (str, os.PathLike)):
        name = str(item)
    return AudioClip(decode_audio(item), name=name or "audio")


def decode_audio(item: AudioInput, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """One item as 1-D float32 samples at `sample_rate`: a path is decoded (soundfile, else ffmpeg), an array is
    taken at `sample_rate`, `(array, rate)` at `rate`; channels are averaged and the rate converted with soxr.

    Raises AudioDecodeError (NoAudioStreamError for a file without audio) for a file that cannot be read or holds
    no samples, TypeError or ValueError for an unusable array. Samples are not checked for NaN or infinity here.
    """
    if isinstance(item, (str, os.PathLike)):
        samples, source_rate = read_audio_file(item)
        if samples.size == 0:
            raise AudioDecodeError(f"{item}: the file holds no audio samples")
    elif isinstance(item, tuple):
        if len(item) != 2:
            raise TypeError(f"expected (array, sample_rate), got a tuple of {len(item)} items")
        samples, source_rate = _as_float_array(item[0]), _as_sample_rate(item[1])
    elif isinstance(item, np.ndarray):
        samples, source_rate = _as_float_array(item), sample_rate
    else:
        raise TypeError(f"expected a path, a numpy array or (array, sample_rate), got {type(item).__name__}")
    return to_mono(samples, source_rate, sample_rate)


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
        raise decode_failure(path, soundfile_reason, str(error)) from None


def decode_failure(path: str | os.PathLike, soundfile_reason: str, ffmpeg_output: str) -> AudioDecodeError:
    """The error for a file neither soundfile nor ffmpeg decoded: NoAudioStreamError (`no audio stream in FILE`)
    when ffmpeg opened it and found no audio, else both decoders' reasons."""
    if any(marker in ffmpeg_output for marker in FFMPEG_NO_AUDIO_STREAM):
        return NoAudioStreamError(f"no audio stream in {path}")
    lines = ffmpeg_output.strip().splitlines()
    ffmpeg_reason = _shorten(lines[-1]) if lines else "failed"
    not_media = FFMPEG_NOT_MEDIA in ffmpeg_output
    what = ": not audio or video that soundfile or ffmpeg recognise, or damaged" if not_media else ""
    return AudioDecodeError(f"{path}: cannot read this file{what} (soundfile: {soundfile_reason}; "
                            f"ffmpeg: {ffmpeg_reason})")


def to_mono(samples: np.ndarray, source_rate: int, target_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Average the channels of `(frames,)` or `(frames, channels)` float audio and resample it with soxr (HQ)."""
    if samples.ndim == 2:
        samples = samples.mean(axis=1, dtype=np.float32)
    elif samples.ndim != 1:
        raise ValueError(f"audio must be (frames,) or (frames, channels), got shape {samples.shape}")
    if source_rate != target_rate and samples.size:
        samples = soxr.resample(samples, source_rate, target_rate, quality="HQ")
    return np.ascontiguousarray(samples, dtype=np.float32)


def to_mono_16k(samples: np.ndarray, sample_rate: int) -> np.ndarray:
    """`to_mono` at the server's rate (16 kHz)."""
    return to_mono(samples, sample_rate, SAMPLE_RATE)


def _as_float_array(samples: object) -> np.ndarray:
    """Float arrays as they are, integer PCM scaled to [-1, 1) (unsigned PCM is offset by half its range first);
    (channels, frames) is refused."""
    array = np.asarray(samples)
    if array.ndim == 2 and array.shape[0] < array.shape[1]:
        raise ValueError(f"audio of shape {array.shape} looks like (channels, frames); "
                         "pass mono 1-D samples or (frames, channels)")
    if np.issubdtype(array.dtype, np.integer):
        full_scale = 2.0 ** (np.iinfo(array.dtype).bits - 1)
        offset = full_scale if np.issubdtype(array.dtype, np.unsignedinteger) else 0.0
        return ((array.astype(np.float64) - offset) / full_scale).astype(np.float32)
    if not np.issubdtype(array.dtype, np.floating):
        raise TypeError(f"audio samples must be float or integer PCM, got dtype {array.dtype}")
    return array.astype(np.float32, copy=False)


def _as_sample_rate(rate: object) -> int:
    """A positive whole number of samples per second (an int, or a float such as 44100.0)."""
    if not isinstance(rate, bool) and isinstance(rate, (int, np.integer, float, np.floating)) \
            and float(rate).is_integer() and rate > 0:
        return int(rate)
    raise ValueError(f"sample_rate must be a positive integer, got {rate!r}")


def _decode_with_ffmpeg(ffmpeg: str, path: Path) -> tuple[np.ndarray, int]:
    command = [ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error", "-i", str(path),
               "-map", "0:a:0", "-vn", "-c:a", "pcm_f32le", "-f", "wav", "pipe:1"]
    completed = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False)
    if completed.returncode != 0 or not completed.stdout:
        output = completed.stderr.decode("utf-8", "replace").strip()
        raise AudioDecodeError(output or f"exit code {completed.returncode}")
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

