"""The same clips through parakeet_core in this process, as the baseline for the serving overhead."""

from __future__ import annotations

import statistics
import time
from typing import Sequence

import numpy as np

from parakeet_triton.protocol import SAMPLE_RATE

from .inputs import Clip
from .report import InProcessResult


def measure(model: object, clips_label: str, clips: Sequence[Clip], batch_size: int, *, min_calls: int = 3,
            max_calls: int = 50, budget_s: float = 30.0) -> InProcessResult:
    """Time `model.transcribe` on `batch_size` clips per call (cycling through `clips`) after one warm-up call.

    Stops after `max_calls`, or once `budget_s` has passed and at least `min_calls` were made.
    """
    if not clips:
        raise ValueError("need at least one clip")
    batches = [[clips[(start + i) % len(clips)].samples for i in range(batch_size)] for start in range(len(clips))]
    model.transcribe(batches[0], batch_size=batch_size)  # warm-up: allocator, first-call work
    latencies: list[float] = []
    started = time.perf_counter()
    while len(latencies) < max_calls:
        batch = batches[len(latencies) % len(batches)]
        call_started = time.perf_counter()
        model.transcribe(batch, batch_size=batch_size)
        latencies.append(time.perf_counter() - call_started)
        if len(latencies) >= min_calls and time.perf_counter() - started >= budget_s:
            break
    wall = time.perf_counter() - started
    audio_per_call = statistics.fmean(sum(c.size for c in batch) for batch in batches) / batch_size
    p50, p95, p99 = np.percentile(np.array(latencies) * 1000, [50, 95, 99])
    return InProcessResult(clips=clips_label, clip_seconds=audio_per_call / SAMPLE_RATE, batch_size=batch_size,
                           calls=len(latencies), wall_seconds=wall, p50_ms=float(p50), p95_ms=float(p95),
                           p99_ms=float(p99))
