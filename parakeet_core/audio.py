"""Audio input: reading files (soundfile, else ffmpeg), mono downmix, resampling (soxr), and validation."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Union

import numpy as np
import soundfile
import torch

from .errors import InvalidAudioError

AudioItem = Union[str, os.PathLike, np.ndarray, torch.Tensor, tuple]


# Largest sample magnitude accepted: full scale of 32-bit integer PCM. Float audio belongs in [-1, 1]; integer
# sample values sent as floats still work (normalisation removes the scale), but beyond this nothing is audio and
# the power spectrum heads for float32 overflow.
MAX_SAMPLE_MAGNITUDE = 2.0**31


def check_waveform(samples, *, max_samples: int | None = None, min_samples: int = 1, name: str = "audio") -> None:
    """Raise InvalidAudioError naming the problem unless `samples` is a usable 1-D float32 waveform."""
    if isinstance(samples, torch.Tensor):
        dtype_ok = samples.dtype == torch.float32
        dtype = str(samples.dtype).removeprefix("torch.")
        finite = bool(torch.isfinite(samples).all()) if samples.numel() else True
    elif isinstance(samples, np.ndarray):
        dtype_ok = samples.dtype == np.float32
        dtype = str(samples.dtype)
        finite = bool(np.isfinite(samples).all()) if samples.size and dtype_ok else True
    else:
        raise InvalidAudioError(f"{name}: expected a float32 array or tensor, got {type(samples).__name__}")
    if not dtype_ok:
        raise InvalidAudioError(f"{name}: samples must be float32, got {dtype}")
    if samples.ndim != 1:
        raise InvalidAudioError(f"{name}: expected one mono channel (1-D samples), got shape {tuple(samples.shape)}")
    count = samples.shape[0]
    if count == 0:
        raise InvalidAudioError(f"{name}: empty audio (0 samples)")
    if count < min_samples:
        raise InvalidAudioError(f"{name}: too short: {count} samples, at least {min_samples} are needed")
    if max_samples is not None and count > max_samples:
        raise InvalidAudioError(f"{name}: too long: {count} samples, the limit is {max_samples}")
    if not finite:
        raise InvalidAudioError(f"{name}: samples contain NaN or infinity")
    peak = float(samples.abs().max()) if isinstance(samples, torch.Tensor) else float(np.abs(samples).max())
    if peak > MAX_SAMPLE_MAGNITUDE:
        raise InvalidAudioError(f"{name}: sample magnitude {peak:.3g} is not audio (expected floats in [-1, 1]; "
                                f"at most {MAX_SAMPLE_MAGNITUDE:.3g}, 32-bit PCM full scale)")


def resample(samples: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """High-quality resampling with soxr; a no-op at the target rate."""
    if source_rate == target_rate:
        return samples
    if source_rate <= 0:
        raise InvalidAudioError(f"sample rate must be positive, got {source_rate}")
    import soxr

    return soxr.resample(samples, source_rate, target_rate, quality="HQ").astype(np.float32, copy=False)


def _to_mono(samples: np.ndarray) -> np.ndarray:
    return samples if samples.ndim == 1 else samples.mean(axis=1, dtype=np.float32)


def _read_with_ffmpeg(path: Path, rate: int) -> np.ndarray:
    command = ["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-f", "f32le", "-ac", "1", "-ar", str(rate), "-"]
    result = subprocess.run(command, capture_output=True, check=False)
    if result.returncode != 0:
        reason = result.stderr.decode(errors="replace").strip().splitlines()
        raise InvalidAudioError(f"{path}: ffmpeg cannot decode it: {reason[-1] if reason else 'unknown error'}")
    return np.frombuffer(result.stdout, dtype=np.float32).copy()


def load_audio(path: str | os.PathLike, rate: int) -> np.ndarray:
    """Read an audio (or video) file as mono float32 at `rate`: soundfile first, ffmpeg for other formats."""
    path = Path(path)
    if not path.is_file():
        raise InvalidAudioError(f"{path}: no such file")
    try:
        samples, source_rate = soundfile.read(path, dtype="float32", always_2d=False)
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as exc:
        if shutil.which("ffmpeg") is None:
            raise InvalidAudioError(
                f"{path}: soundfile cannot read it ({exc}) and ffmpeg is not on PATH to try other formats"
            ) from exc
        return _read_with_ffmpeg(path, rate)
    return resample(_to_mono(np.asarray(samples, dtype=np.float32)), source_rate, rate)


def as_waveform(item: AudioItem, rate: int) -> np.ndarray:
    """Any supported audio item (path, 1-D array/tensor at `rate`, or (array, sample_rate)) as float32 at `rate`."""
    if isinstance(item, (str, os.PathLike)):
        return load_audio(item, rate)
    source_rate = rate
    if isinstance(item, tuple):
        if len(item) != 2:
            raise InvalidAudioError("an (array, sample_rate) pair must have two elements")
        item, source_rate = item
        source_rate = int(source_rate)
    if isinstance(item, torch.Tensor):
        item = item.detach().cpu().numpy()
    if not isinstance(item, np.ndarray):
        raise InvalidAudioError(f"unsupported audio item of type {type(item).__name__}")
    if not np.issubdtype(item.dtype, np.floating):
        raise InvalidAudioError(f"audio samples must be floating point in [-1, 1], got {item.dtype}")
    samples = item.astype(np.float32, copy=False)
    if samples.ndim == 2 and samples.shape[1] <= 8:
        samples = _to_mono(samples)
    if samples.ndim != 1:
        raise InvalidAudioError(f"expected 1-D mono samples (or [frames, channels]), got shape {samples.shape}")
    return resample(samples, source_rate, rate)
