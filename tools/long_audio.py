"""Long test recordings built deterministically from the committed clips (no RNG, no NeMo, numpy only).

Speech of both languages at several gains, pauses of digital silence and of quiet noise, and bursts of loud noise,
repeated to the length asked for and quantised to 16-bit PCM, so the same samples come out on every machine and
numpy version. The fixture tool (in the NeMo environment) and the tests (without NeMo) both build them from here;
`sha256` lets a test check that it has the samples the references were made from.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000
AUDIO_DIR = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "audio"
LONG_CLIPS = {"long_8min": 480.0, "long_16min": 960.0}


def _read_pcm16(name: str) -> np.ndarray:
    import soundfile

    samples, rate = soundfile.read(str(AUDIO_DIR / f"{name}.wav"), dtype="int16")
    assert rate == SAMPLE_RATE and samples.ndim == 1
    return samples.astype(np.int64)


def _quiet_noise(count: int, seed: int, amplitude: int) -> np.ndarray:
    """Integer noise from a 64-bit linear congruential generator (Knuth's MMIX constants), uniform in +-amplitude."""
    state = np.uint64(seed * 2654435761 + 1)
    values = np.empty(count, dtype=np.int64)
    a, c = np.uint64(6364136223846793005), np.uint64(1442695040888963407)
    # Blocks of 4096 consecutive states from the LCG's jump-ahead: state_{n+k} = a^k state_n + c (a^k - 1)/(a - 1).
    with np.errstate(over="ignore"):
        powers = np.empty(4096, dtype=np.uint64)
        offsets = np.empty(4096, dtype=np.uint64)
        p, o = np.uint64(1), np.uint64(0)
        for k in range(4096):
            p, o = p * a, o * a + c
            powers[k], offsets[k] = p, o
        for start in range(0, count, 4096):
            block = state * powers + offsets
            n = min(4096, count - start)
            values[start : start + n] = (block[:n] >> np.uint64(40)).astype(np.int64)
            state = block[-1]
    return values % (2 * amplitude + 1) - amplitude


def _pattern() -> list[np.ndarray]:
    en, de, long, noise = (_read_pcm16(n) for n in ("speech_en", "speech_de", "long", "noise"))
    second = SAMPLE_RATE
    return [
        long,
        np.zeros(2 * second, dtype=np.int64),
        en * 1 // 2,
        _quiet_noise(3 * second, 1, 60),
        de,
        np.zeros(second // 2, dtype=np.int64),
        long * 4 // 5,
        noise,
        en,
        _quiet_noise(second, 2, 300),
        de * 3 // 5,
        np.zeros(4 * second, dtype=np.int64),
    ]


def long_clip(name: str) -> np.ndarray:
    """The named long clip (one of LONG_CLIPS, which have NeMo references) as float32 samples in [-1, 1)."""
    return speech_like(LONG_CLIPS[name])


def speech_like(seconds: float) -> np.ndarray:
    """`seconds` of the recipe's recording as float32 samples in [-1, 1), as soundfile reads 16-bit PCM."""
    target = int(seconds * SAMPLE_RATE)
    pattern = _pattern()
    pieces, total, turn = [], 0, 0
    while total < target:
        piece = pattern[turn % len(pattern)]
        if turn >= len(pattern):
            piece = _quiet_noise(len(piece), 100 + turn, 40) + piece  # each repeat differs a little
        pieces.append(piece)
        total += len(piece)
        turn += 1
    pcm = np.clip(np.concatenate(pieces)[:target], -32768, 32767).astype(np.int16)
    return pcm.astype(np.float32) / 32768.0


def sha256(samples: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(samples, dtype=np.float32).tobytes()).hexdigest()
