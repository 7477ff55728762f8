"""Log-mel front end, computing what NeMo's AudioToMelSpectrogramPreprocessor computes in eval mode.

Order of operations: pre-emphasis, zeroing past each clip's end, centred STFT with constant (zero) padding,
magnitude to the configured power, mel projection, log with an additive guard, per-feature normalisation over
each clip's valid frames (unbiased std), and zeroing of the frames past each clip's valid length
(`samples // hop`). No dither: this is inference.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from .config import PreprocessorConfig
from .errors import CheckpointError

_NORMALIZE_EPS = 1e-5
# STFT frames (10 ms each) computed at a time on long inputs: 4,000 frames keep the spectrum near 8 MB per clip.
_FRAMES_PER_CHUNK = 4000


def _hz_to_mel_slaney(hz: np.ndarray) -> np.ndarray:
    f_sp = 200.0 / 3
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = math.log(6.4) / 27.0
    hz = np.asarray(hz, dtype=np.float64)
    return np.where(hz >= min_log_hz, min_log_mel + np.log(np.maximum(hz, 1e-10) / min_log_hz) / logstep, hz / f_sp)


def _mel_to_hz_slaney(mel: np.ndarray) -> np.ndarray:
    f_sp = 200.0 / 3
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = math.log(6.4) / 27.0
    return np.where(mel >= min_log_mel, min_log_hz * np.exp(logstep * (mel - min_log_mel)), f_sp * mel)


def slaney_mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> torch.Tensor:
    """Triangular mel filters on the Slaney scale with Slaney area normalisation, shape [n_mels, n_fft//2+1]."""
    fft_freqs = np.linspace(0.0, sample_rate / 2.0, 1 + n_fft // 2)
    mel_points = _mel_to_hz_slaney(np.linspace(_hz_to_mel_slaney(fmin), _hz_to_mel_slaney(fmax), n_mels + 2))
    widths = np.diff(mel_points)
    ramps = mel_points[:, None] - fft_freqs[None, :]
    rising = -ramps[:-2] / widths[:-1, None]
    falling = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights *= (2.0 / (mel_points[2:] - mel_points[:-2]))[:, None]
    return torch.from_numpy(weights.astype(np.float32))


class MelPreprocessor(nn.Module):
    """Waveforms [B, T] at the model's rate to normalised log-mel features [B, F, frames]."""

    def __init__(self, config: PreprocessorConfig):
        super().__init__()
        if config.normalize not in ("per_feature", "NA"):
            raise CheckpointError(f"preprocessor.normalize={config.normalize!r} is not supported (per_feature, NA)")
        self.config = config
        window = torch.hann_window(config.window_size, periodic=False)
        fmax = config.highfreq if config.highfreq is not None else config.sample_rate / 2
        filterbank = slaney_mel_filterbank(config.sample_rate, config.n_fft, config.features, config.lowfreq, fmax)
        self.register_buffer("window", window, persistent=True)
        self.register_buffer("fb", filterbank.unsqueeze(0), persistent=True)

    def load_checkpoint_buffers(self, state: dict[str, torch.Tensor]) -> None:
        """Use the checkpoint's stored window and filterbank (`preprocessor.featurizer.*`) when present."""
        for name in ("window", "fb"):
            if name in state:
                expected = getattr(self, name).shape
                value = state[name].float()
                if value.shape != expected:
                    raise CheckpointError(
                        f"preprocessor.featurizer.{name} has shape {tuple(value.shape)}, the config implies {tuple(expected)}"
                    )
                getattr(self, name).copy_(value)

    def output_lengths(self, sample_lengths: torch.Tensor) -> torch.Tensor:
        """Valid feature frames for each clip length in samples."""
        pad = (self.config.n_fft // 2) * 2
        return torch.div(sample_lengths + pad - self.config.n_fft, self.config.window_stride, rounding_mode="floor").long()

    @torch.no_grad()
    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        x = waveforms.to(torch.float32, copy=True)
        lengths = lengths.to(device=x.device, dtype=torch.long)
        feature_lengths = self.output_lengths(lengths)
        if cfg.preemph:
            x[:, 1:] -= cfg.preemph * x[:, :-1]
        sample_index = torch.arange(x.shape[1], device=x.device)
        x.masked_fill_(sample_index[None, :] >= lengths[:, None], 0.0)
        features = self._log_mel(x)
        frame_index = torch.arange(features.shape[2], device=x.device)
        valid = frame_index[None, :] < feature_lengths[:, None]
        if cfg.normalize == "per_feature":
            features = self._normalize_per_feature(features, valid, feature_lengths)
        features = features.masked_fill(~valid[:, None, :], cfg.pad_value)
        if cfg.pad_to > 0:
            remainder = features.shape[2] % cfg.pad_to
            if remainder:
                features = nn.functional.pad(features, (0, cfg.pad_to - remainder), value=cfg.pad_value)
        return features, feature_lengths

    def _log_mel(self, x: torch.Tensor) -> torch.Tensor:
        """Centred STFT (zero padding) -> magnitude ** mag_power -> mel -> log, in chunks of frames on long inputs.

        Frames are independent, so a chunk computed from its own span of the padded signal gives the same values;
        chunking keeps the complex spectrum (257 bins per frame) from ever being held for a whole long file.
        """
        cfg = self.config
        half = cfg.n_fft // 2
        frames = x.shape[1] // cfg.window_stride + 1
        if frames <= _FRAMES_PER_CHUNK:
            return self._log_mel_frames(x, center=True)
        padded = torch.nn.functional.pad(x, (half, half))
        pieces = []
        for first in range(0, frames, _FRAMES_PER_CHUNK):
            last = min(frames, first + _FRAMES_PER_CHUNK)
            span = padded[:, first * cfg.window_stride : (last - 1) * cfg.window_stride + cfg.n_fft]
            pieces.append(self._log_mel_frames(span, center=False))
        return torch.cat(pieces, dim=2)

    def _log_mel_frames(self, x: torch.Tensor, *, center: bool) -> torch.Tensor:
        cfg = self.config
        spectrum = torch.stft(
            x,
            n_fft=cfg.n_fft,
            hop_length=cfg.window_stride,
            win_length=cfg.window_size,
            window=self.window.float(),
            center=center,
            pad_mode="constant",
            return_complex=True,
        )
        magnitude = torch.sqrt(torch.view_as_real(spectrum).pow(2).sum(-1))
        del spectrum
        if cfg.mag_power != 1.0:
            magnitude = magnitude.pow(cfg.mag_power)
        mel = torch.matmul(self.fb.float(), magnitude)
        return torch.log(mel + cfg.log_zero_guard)

    @staticmethod
    def _normalize_per_feature(features: torch.Tensor, valid: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        # Each clip's statistics are reduced over exactly the frames it has when processed alone (its valid
        # frames plus the one trailing frame the centred STFT adds), so the floating-point summation order,
        # and therefore the result, does not depend on how much padding the batch adds. This matters for
        # near-constant input such as digital silence, where the rounding residue is divided by std + 1e-5.
        normalized = torch.empty_like(features)
        for row in range(features.shape[0]):
            frames = min(int(lengths[row]) + 1, features.shape[2])
            clip = features[row : row + 1, :, :frames]
            mask = valid[row : row + 1, None, :frames]
            count = mask.sum(dim=2)
            mean = torch.where(mask, clip, 0.0).sum(dim=2) / count
            centred = torch.where(mask, clip - mean[:, :, None], 0.0)
            std = torch.sqrt(centred.pow(2).sum(dim=2) / (count - 1.0))
            std = std.masked_fill(std.isnan(), 0.0) + _NORMALIZE_EPS
            normalized[row] = ((features[row : row + 1] - mean[:, :, None]) / std[:, :, None])[0]
        return normalized
