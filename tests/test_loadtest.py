"""benchmarks/loadtest: perf_analyzer setup, input data, report, and a short bounded sweep against the server."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks.loadtest import inputs, perf_analyzer, report, sweep  # noqa: E402
from parakeet_triton.protocol import SAMPLE_RATE, WAV, WAV_LENS  # noqa: E402

CSV_2_51 = """Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,Server Compute Input,\
Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency
1,5.99728,34,4229,15,185,104282,2546,4,103401,188440,188440,188440
"""
needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not on PATH")
needs_wheel_binary = pytest.mark.skipif(perf_analyzer.binary_in_tritonclient_wheel() is None and
                                        shutil.which("perf_analyzer") is None,
                                        reason="no perf_analyzer (tritonclient==2.51.0 wheel) installed")


# -- perf_analyzer discovery and library links -------------------------------------------------------------------

@needs_wheel_binary
def test_real_perf_analyzer_starts_after_automatic_setup(tmp_path: Path) -> None:
    analyzer = perf_analyzer.locate(tmp_path)
    assert "Perf Analyzer Version" in analyzer.version()
    for soname, provider in analyzer.linked.items():
        assert (tmp_path / "perf_analyzer-libs" / soname).resolve() == provider
    if analyzer.library_dir is not None:
        assert analyzer.environment({})["LD_LIBRARY_PATH"] == str(analyzer.library_dir)


def test_wheel_binary_is_found_from_the_distribution_record() -> None:
    found = perf_analyzer.binary_in_tritonclient_wheel()
    if found is None:
        pytest.skip("tritonclient wheel without bin/perf_analyzer")
    assert found.name == "perf_analyzer" and os.access(found, os.X_OK)


def test_missing_libraries_are_linked_from_bundled_copies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    binary = tmp_path / "bin" / "perf_analyzer"
    binary.parent.mkdir()
    binary.write_text("#!/bin/sh\necho \"Perf Analyzer Version 0 $LD_LIBRARY_PATH\"\n")
    binary.chmod(0o755)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "libb64-0123abcd.so.0d").write_bytes(b"")
    (bundle / "libcudart-89ab.so.12.6.77").write_bytes(b"")
    resolved: dict[str, bool] = {}

    def fake_missing(executable, env=None):
        library_dir = Path((env or {}).get("LD_LIBRARY_PATH", "/nonexistent").split(os.pathsep)[0])
        resolved.update({name: (library_dir / name).exists() for name in perf_analyzer.NEEDED_LIBRARIES})
        return [name for name, ok in resolved.items() if not ok]

    monkeypatch.setattr(perf_analyzer, "missing_libraries", fake_missing)
    monkeypatch.setattr(perf_analyzer, "library_search_dirs", lambda: [bundle])
    analyzer = perf_analyzer.locate(tmp_path / "work", explicit=binary)
    links = tmp_path / "work" / "perf_analyzer-libs"
    assert (links / "libb64.so.0d").resolve() == bundle / "libb64-0123abcd.so.0d"
    assert (links / "libcudart.so.12").resolve() == bundle / "libcudart-89ab.so.12.6.77"
    env = analyzer.environment({"LD_LIBRARY_PATH": "/existing"})
    assert env["LD_LIBRARY_PATH"] == f"{links}{os.pathsep}/existing"
    assert str(links) in analyzer.version()


def test_unresolvable_library_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    binary = tmp_path / "perf_analyzer"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    monkeypatch.setattr(perf_analyzer, "missing_libraries", lambda executable, env=None: ["libb64.so.0d"])
    monkeypatch.setattr(perf_analyzer, "library_search_dirs", lambda: [])
    with pytest.raises(perf_analyzer.PerfAnalyzerError, match="needs libb64.so.0d.*nvidia-pytriton"):
        perf_analyzer.locate(tmp_path, explicit=binary)


def test_explicit_binary_must_exist(tmp_path: Path) -> None:
    with pytest.raises(perf_analyzer.PerfAnalyzerError, match="not found"):
        perf_analyzer.find_binary(tmp_path / "nope")


def test_binary_on_path_wins_over_the_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    binary = tmp_path / "perf_analyzer"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    monkeypatch.delenv("PERF_ANALYZER", raising=False)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}")
    assert perf_analyzer.find_binary() == binary.resolve()


# -- command line and CSV report ---------------------------------------------------------------------------------

def test_parse_csv_report() -> None:
    (row,) = perf_analyzer.parse_csv_report(CSV_2_51)
    assert row.concurrency == 1 and row.requests_per_second == pytest.approx(5.99728)
    assert (row.p50_ms, row.p95_ms, row.p99_ms) == pytest.approx((103.401, 188.44, 188.44))


@pytest.mark.parametrize("text, match", [("Concurrency,Inferences/Second\n1,2\n", "lacks column"), ("", "no rows")])
def test_bad_csv(text: str, match: str) -> None:
    with pytest.raises(perf_analyzer.PerfAnalyzerError, match=match):
        perf_analyzer.parse_csv_report(text)


def test_command_arguments() -> None:
    counted = perf_analyzer.command_arguments("parakeet", "127.0.0.1:8001", "grpc", "in.json", "out.csv",
                                              perf_analyzer.LoadSettings(concurrency=2, request_count=8))
    assert counted[counted.index("--concurrency-range") + 1] == "2:2"
    assert counted[counted.index("--request-count") + 1] == "8"
    assert counted[counted.index("-b") + 1] == "1" and "--measurement-mode" not in counted
    windows = perf_analyzer.command_arguments("parakeet", "h:1", "grpc", "in.json", "out.csv",
                                              perf_analyzer.LoadSettings(concurrency=1, window_ms=3000))
    assert windows[windows.index("--measurement-interval") + 1] == "3000"
    assert windows[windows.index("--max-trials") + 1] == "3"
    assert windows[windows.index("--stability-percentage") + 1] == "1000"
    with pytest.raises(ValueError):
        perf_analyzer.LoadSettings(concurrency=4, request_count=2)
    with pytest.raises(ValueError, match="windows >= 3"):
        perf_analyzer.LoadSettings(concurrency=1, windows=2)


# -- input data ----------------------------------------------------------------------------------------------------

@needs_espeak
@pytest.mark.parametrize("seconds", [2.0, 5.0])
def test_generated_speech_has_the_exact_duration(seconds: float) -> None:
    clip = inputs.generate_speech(seconds)
    assert clip.samples.size == int(seconds * SAMPLE_RATE) and clip.label == f"speech_{seconds:g}s"
    assert np.abs(clip.samples).max() > 0.05  # speech, not silence
    assert np.array_equal(clip.samples, inputs.generate_speech(seconds).samples)  # deterministic


def test_input_data_round_trip(tmp_path: Path) -> None:
    clips = [inputs.Clip("a", np.linspace(-1, 1, 1600, dtype=np.float32)),
             inputs.Clip("b", np.full(800, 0.25, dtype=np.float32))]
    path = inputs.write_input_data(clips, tmp_path / "set.json")
    document = json.loads(path.read_text())
    assert document["data"][0][WAV]["shape"] == [1600] and document["data"][1][WAV_LENS] == {"content": [800],
                                                                                             "shape": [1]}
    assert inputs.read_clip_seconds(path) == [0.1, 0.05]
    back = sweep.read_input_clips(path)
    assert [c.samples.tolist() for c in back] == [c.samples.tolist() for c in clips]


def test_inputs_cli_from_real_audio(tmp_path: Path) -> None:
    audio = ROOT / "tests" / "fixtures" / "audio"
    assert inputs.main(["--audio", str(audio / "speech_en.wav"), str(audio / "noise.wav"),
                        "--out-dir", str(tmp_path)]) == 0
    assert inputs.read_clip_seconds(tmp_path / "noise.json") == [2.0]
    assert len(inputs.read_clip_seconds(tmp_path / "all.json")) == 2


# -- report --------------------------------------------------------------------------------------------------------

def sample_results() -> tuple[list[report.ServedResult], list[report.InProcessResult]]:
    served = [report.ServedResult("speech_12s", 12.0, c, rps, p50, p95, p99, batch)
              for c, rps, p50, p95, p99, batch in [(1, 0.5, 2000, 2100, 2200, 1.0), (2, 0.6, 3300, 3500, 3600, 1.6)]]
    local = [report.InProcessResult("speech_12s", 12.0, 1, 5, 9.0, 1800, 1850, 1900),
             report.InProcessResult("speech_12s", 12.0, 2, 3, 9.5, 3100, 3200, 3300)]
    return served, local


def test_markdown_table_and_ratios() -> None:
    served, local = sample_results()
    table = report.markdown_tables(served, local)
    assert "| 1 | 0.50 | 6.0 | 2000 | 2100 | 2200 | 1.00 |" in table
    assert "| in-process, batch 2 | 0.63 | 7.6 |" in table
    assert "RTFx 6.0 / 6.7 = **0.90**" in table
    assert "best Triton (concurrency 2) vs best in-process (batch 2): RTFx 7.2 / 7.6 = **0.95**" in table


def test_results_round_trip_and_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    served, local = sample_results()
    report.write_results(tmp_path / "results.json", served, local, {"command": "x"})
    assert report.read_results(tmp_path / "results.json") == (served, local, {"command": "x"})
    png = report.plot(tmp_path / "plot.png", served, local)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < 200_000
    assert report.main([str(tmp_path / "results.json"), str(tmp_path / "again.png")]) == 0
    assert (tmp_path / "again.png").stat().st_size > 1000


def test_plot_title() -> None:
    meta = {"checkpoint": "/x/v3_small.nemo", "cpus": 2, "server_env": {"OMP_NUM_THREADS": "1"}}
    assert report.plot_title(meta) == "v3_small.nemo, 2 CPUs, server OMP_NUM_THREADS=1: RTFx against p95 latency"


def test_window_grows_with_latency_and_concurrency() -> None:
    assert sweep.window_ms_for(3000, 0.05, 8) == 3000
    assert sweep.window_ms_for(3000, 2.0, 2) == 12000
    assert sweep.window_ms_for(3000, 1.1, 1) == 4000


def test_a_failed_level_keeps_the_levels_before_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def fake_level(analyzer, url, clip_set, concurrency, *rest):
        if concurrency > 1:
            raise perf_analyzer.PerfAnalyzerError("No valid requests recorded within time interval")
        return report.ServedResult(clip_set.label, 1.0, concurrency, 2.0, 10, 20, 30, 1.0)

    monkeypatch.setattr(sweep, "run_level", fake_level)
    clip_set = sweep.ClipSet("x", tmp_path / "x.json", (inputs.Clip("x", np.zeros(16000, dtype=np.float32)),))
    args = sweep.build_parser().parse_args(["--concurrency", "1,2,4"])
    levels, failure = sweep.sweep(None, "127.0.0.1:1", clip_set, args, tmp_path, deadline=1e12, latency_s=0.1)
    assert [r.concurrency for r in levels] == [1] and "No valid requests" in failure


def test_server_environment_assignments() -> None:
    assert sweep.parse_env(["OMP_NUM_THREADS=1", "A=b=c"]) == {"OMP_NUM_THREADS": "1", "A": "b=c"}
    with pytest.raises(ValueError, match="NAME=VALUE"):
        sweep.parse_env(["OMP_NUM_THREADS"])


def test_mean_encoder_batch_from_statistics_deltas() -> None:
    assert sweep.mean_batch((10, 10), (22, 16)) == 2.0
    assert sweep.mean_batch(None, (1, 1)) is None and sweep.mean_batch((5, 5), (5, 5)) is None


@pytest.mark.parametrize("url, loopback", [("127.0.0.1:8001", True), ("localhost:8001", True), ("[::1]:8001", True),
                                           ("10.1.2.3:8001", False), ("no-such-host.invalid:1", False)])
def test_loopback_only_by_default(url: str, loopback: bool) -> None:
    assert sweep.is_loopback(url) is loopback


def test_remote_url_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert sweep.main(["--url", "10.1.2.3:8001", "--out-dir", str(tmp_path)]) == 2
    assert "not a loopback address" in capsys.readouterr().err


# -- against the server --------------------------------------------------------------------------------------------

@needs_wheel_binary
def test_short_bounded_sweep_against_the_server(triton_server, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    clip = inputs.Clip("speech_2s", np.asarray(
        inputs.load_audio_clips([ROOT / "tests" / "fixtures" / "audio" / "speech_en.wav"])[0].samples[:2 * SAMPLE_RATE]))
    data = inputs.write_input_data([clip], tmp_path / "speech_2s.json")
    code = sweep.main(["--url", triton_server.grpc_url, "--input-data", str(data), "--concurrency", "1,2",
                       "--window-ms", "1500", "--time-budget", "600",
                       "--in-process", triton_server.checkpoint, "--in-process-budget", "1",
                       "--out-dir", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert code == 0
    served, local, meta = report.read_results(tmp_path / "out" / "results.json")
    assert [r.concurrency for r in served] == [1, 2]
    assert all(r.requests_per_second > 0 and 0 < r.p50_ms <= r.p95_ms <= r.p99_ms for r in served)
    assert all(r.mean_encoder_batch is not None and r.mean_encoder_batch >= 1 for r in served)
    assert [r.batch_size for r in local] == [1, 2]
    assert "2.51.0" in meta["perf_analyzer"]
    assert "| concurrency | requests/s | RTFx |" in printed and "| 2 |" in printed
    assert "in-process, single stream" in printed
    assert (tmp_path / "out" / "perf_speech_2s_c2.csv").is_file()
    if (tmp_path / "out" / "throughput_vs_p95.png").exists():
        assert (tmp_path / "out" / "throughput_vs_p95.png").stat().st_size > 1000
