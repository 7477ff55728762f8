"""Load testing the served ensemble with perf_analyzer, beside parakeet_core in-process (see docs/load-test.md).

- `inputs`: perf_analyzer `--input-data` JSON from real audio or espeak-ng speech at chosen durations
- `perf_analyzer`: find the binary (tritonclient wheel), link its missing libraries, run it, read its CSV
- `sweep`: the runner (concurrency sweep, Triton statistics, in-process baseline, table, plot)
"""
