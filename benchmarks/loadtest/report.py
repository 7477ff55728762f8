"""Result records of a load test, the Markdown table and the throughput-against-latency plot."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence


@dataclass(frozen=True)
class ServedResult:
    """One concurrency level against the server, for one clip set (perf_analyzer + Triton statistics)."""

    clips: str
    clip_seconds: float
    concurrency: int
    requests_per_second: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_encoder_batch: float | None

    def __post_init__(self) -> None:
        if self.clip_seconds <= 0 or self.concurrency < 1 or self.requests_per_second < 0:
            raise ValueError(f"invalid served result {self}")

    @property
    def rtfx(self) -> float:
        """Audio seconds transcribed per wall-clock second."""
        return self.requests_per_second * self.clip_seconds


@dataclass(frozen=True)
class InProcessResult:
    """The same clips through parakeet_core in this process: `batch_size` clips per `transcribe` call."""

    clips: str
    clip_seconds: float
    batch_size: int
    calls: int
    wall_seconds: float
    p50_ms: float
    p95_ms: float
    p99_ms: float

    def __post_init__(self) -> None:
        if self.clip_seconds <= 0 or self.batch_size < 1 or self.calls < 1 or self.wall_seconds <= 0:
            raise ValueError(f"invalid in-process result {self}")

    @property
    def requests_per_second(self) -> float:
        return self.calls * self.batch_size / self.wall_seconds

    @property
    def rtfx(self) -> float:
        return self.requests_per_second * self.clip_seconds

    @property
    def label(self) -> str:
        return "in-process, single stream" if self.batch_size == 1 else f"in-process, batch {self.batch_size}"


def markdown_tables(served: Sequence[ServedResult], in_process: Sequence[InProcessResult]) -> str:
    """One table per clip set: every concurrency level, then the in-process rows, and the serving ratios."""
    sections = []
    for clips in dict.fromkeys([r.clips for r in served] + [r.clips for r in in_process]):
        rows = [r for r in served if r.clips == clips]
        local = [r for r in in_process if r.clips == clips]
        seconds = (rows or local)[0].clip_seconds
        lines = [
            f"**{clips}** ({seconds:g} s clips)",
            "",
            "| concurrency | requests/s | RTFx | p50 ms | p95 ms | p99 ms | mean encoder batch |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            batch = "n/a" if r.mean_encoder_batch is None else f"{r.mean_encoder_batch:.2f}"
            lines.append(f"| {r.concurrency} | {r.requests_per_second:.2f} | {r.rtfx:.1f} | {r.p50_ms:.0f} | "
                         f"{r.p95_ms:.0f} | {r.p99_ms:.0f} | {batch} |")
        for r in local:
            lines.append(f"| {r.label} | {r.requests_per_second:.2f} | {r.rtfx:.1f} | {r.p50_ms:.0f} | "
                         f"{r.p95_ms:.0f} | {r.p99_ms:.0f} | {r.batch_size} |")
        lines += ["", *serving_ratios(rows, local)]
        sections.append("\n".join(lines).rstrip() + "\n")
    return "\n".join(sections)


def serving_ratios(served: Sequence[ServedResult], in_process: Sequence[InProcessResult]) -> list[str]:
    """Sentences comparing Triton with in-process: concurrency 1 against single stream, best against best."""
    lines = []
    single = next((r for r in in_process if r.batch_size == 1), None)
    first = next((r for r in served if r.concurrency == 1), None)
    if single and first:
        lines.append(f"- Triton at concurrency 1 vs in-process single stream: RTFx {first.rtfx:.1f} / "
                     f"{single.rtfx:.1f} = **{first.rtfx / single.rtfx:.2f}**, p50 {first.p50_ms:.0f} / "
                     f"{single.p50_ms:.0f} ms")
    if served and in_process:
        best_served = max(served, key=lambda r: r.rtfx)
        best_local = max(in_process, key=lambda r: r.rtfx)
        lines.append(f"- best Triton (concurrency {best_served.concurrency}) vs best in-process "
                     f"({best_local.label.removeprefix('in-process, ')}): RTFx {best_served.rtfx:.1f} / "
                     f"{best_local.rtfx:.1f} = **{best_served.rtfx / best_local.rtfx:.2f}**")
    return lines


def write_results(path: str | Path, served: Sequence[ServedResult], in_process: Sequence[InProcessResult],
                  meta: dict) -> Path:
    """Everything measured, as JSON (properties included), for later tables and plots."""
    path = Path(path)
    document = {
        "meta": meta,
        "served": [{**asdict(r), "rtfx": r.rtfx} for r in served],
        "in_process": [{**asdict(r), "rtfx": r.rtfx, "requests_per_second": r.requests_per_second}
                       for r in in_process],
    }
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path


def read_results(path: str | Path) -> tuple[list[ServedResult], list[InProcessResult], dict]:
    document = json.loads(Path(path).read_text())
    served = [ServedResult(**{k: v for k, v in r.items() if k != "rtfx"}) for r in document["served"]]
    local = [InProcessResult(**{k: v for k, v in r.items() if k not in ("rtfx", "requests_per_second")})
             for r in document["in_process"]]
    return served, local, document.get("meta", {})


def plot(path: str | Path, served: Sequence[ServedResult], in_process: Sequence[InProcessResult],
         title: str = "Parakeet on Triton: throughput against p95 latency") -> Path:
    """A small PNG: RTFx against p95 latency, one line per clip set labelled with concurrency; in-process marks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for number, clips in enumerate(dict.fromkeys([r.clips for r in served] + [r.clips for r in in_process])):
        colour = colours[number % len(colours)]
        rows = sorted((r for r in served if r.clips == clips), key=lambda r: r.concurrency)
        if rows:
            axes.plot([r.p95_ms for r in rows], [r.rtfx for r in rows], "o-", color=colour,
                      label=f"Triton, {clips}")
            for r in rows:
                axes.annotate(f"c{r.concurrency}", (r.p95_ms, r.rtfx), textcoords="offset points", xytext=(4, 4),
                              fontsize=7, color=colour)
        for r in (r for r in in_process if r.clips == clips):
            axes.plot([r.p95_ms], [r.rtfx], "s" if r.batch_size == 1 else "D", color=colour, fillstyle="none",
                      markersize=8, label=f"{r.label}, {clips}")
    axes.set_xlabel("p95 latency per request (ms)")
    axes.set_ylabel("RTFx (audio s per wall s)")
    axes.set_title(title, fontsize=10)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=6, loc="best")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path)
    plt.close(figure)
    return path


def plot_title(meta: dict) -> str:
    """`<checkpoint file>, <n> CPUs[, server env]: RTFx against p95 latency`."""
    checkpoint = Path(str(meta.get("checkpoint") or meta.get("url") or "parakeet")).name
    env = " ".join(f"{name}={value}" for name, value in (meta.get("server_env") or {}).items())
    return f"{checkpoint}, {meta.get('cpus', '?')} CPUs{', server ' + env if env else ''}: RTFx against p95 latency"


def main(argv: Sequence[str] | None = None) -> int:
    """Re-print the tables of a results.json and redraw its plot: `python -m benchmarks.loadtest.report R [PNG]`."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("results", type=Path)
    parser.add_argument("plot", type=Path, nargs="?")
    args = parser.parse_args(argv)
    served, local, meta = read_results(args.results)
    print(markdown_tables(served, local))
    if args.plot:
        plot(args.plot, served, local, title=plot_title(meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
