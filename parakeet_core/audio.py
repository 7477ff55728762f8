"""Audio input: items to mono float32 waveforms (parakeet_client.audio's decoder) and their validation."""

from __future__ import annotations

import os
from typing import Union

import numpy as np
import torch
from parakeet_client.audio import decode_audio
from parakeet_client.errors import AudioDecodeError

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


def load_audio(path: str | os.PathLike, rate: int) -> np.ndarray:
    """Read an audio (or video) file as mono float32 at `rate`: soundfile first, ffmpeg for other formats, soxr
    resampling; the same decoder as parakeet_client's. InvalidAudioError names the file when it cannot be read."""
    try:
        return decode_audio(os.fspath(path), rate)
    except AudioDecodeError as error:
        raise InvalidAudioError(str(error)) from error


def as_waveform(item: AudioItem, rate: int) -> np.ndarray:
    """Any supported audio item as float32 at `rate`: a path, a 1-D (or `[frames, channels]`) array or tensor at
    `rate`, or `(array or tensor, sample_rate)`. Integer PCM is scaled to [-1, 1); other rates are resampled."""
    if isinstance(item, (str, os.PathLike)):
        return load_audio(item, rate)
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], torch.Tensor):
        item = (_tensor_to_numpy(item[0]), item[1])
    elif isinstance(item, torch.Tensor):
        item = _tensor_to_numpy(item)
    try:
        return decode_audio(item, rate)
    except (TypeError, ValueError) as error:
        raise InvalidAudioError(str(error)) from error


def _tensor_to_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy()
