#!/usr/bin/env bash
# Install, serve a Parakeet TDT checkpoint with Triton, transcribe audio through the server, then stop it.
#   ./scripts/quickstart.sh [AUDIO_FILE...]            default checkpoint: nvidia/parakeet-tdt-0.6b-v3 (Hugging Face)
#   PARAKEET_CHECKPOINT=/models/parakeet-tdt-0.6b-v3.nemo ./scripts/quickstart.sh talk.wav    (offline: a local .nemo)
# VENV (default .venv) picks the environment; TORCH_SPEC (default torch==2.13.0, this project's CPU pin) the torch
# to install (on a GPU machine: TORCH_SPEC=torch). Ports: PARAKEET_HTTP_PORT/GRPC_PORT/METRICS_PORT (8000-8002).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
export PARAKEET_CHECKPOINT=${PARAKEET_CHECKPOINT:-nvidia/parakeet-tdt-0.6b-v3}
export PARAKEET_HTTP_PORT=${PARAKEET_HTTP_PORT:-8000} PARAKEET_GRPC_PORT=${PARAKEET_GRPC_PORT:-8001}
export PARAKEET_METRICS_PORT=${PARAKEET_METRICS_PORT:-8002}
audio=("$@")
[ ${#audio[@]} -gt 0 ] || audio=(tests/fixtures/audio/speech_en.wav)

python3 -m venv "$VENV"
"$VENV/bin/pip" install -q "${TORCH_SPEC:-torch==2.13.0}"
"$VENV/bin/pip" install -q -e '.[serve,client,openai]'

"$VENV/bin/parakeet-serve" &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
"$VENV/bin/python" - <<PY
import os, sys, time, urllib.request
deadline = time.time() + 1800
while time.time() < deadline:
    try:
        os.kill(${server}, 0)
    except ProcessLookupError:
        sys.exit("parakeet-serve exited before the server was ready (its reason is printed above)")
    try:
        if urllib.request.urlopen("http://127.0.0.1:${PARAKEET_HTTP_PORT}/v2/health/ready", timeout=2).status == 200:
            sys.exit(0)
    except OSError:
        pass
    time.sleep(1)
sys.exit("server did not become ready")
PY
"$VENV/bin/parakeet-client" --url "127.0.0.1:${PARAKEET_GRPC_PORT}" --timestamps "${audio[@]}"
