#!/usr/bin/env bash
# Install, serve a Parakeet TDT checkpoint with Triton, transcribe audio through the server, then stop it.
#   ./scripts/quickstart.sh [AUDIO_FILE...]            default checkpoint: nvidia/parakeet-tdt-0.6b-v3 (Hugging Face)
#   PARAKEET_CHECKPOINT=/models/parakeet-tdt-0.6b-v3.nemo ./scripts/quickstart.sh talk.wav    (offline: a local .nemo)
# Relative paths (audio files, PARAKEET_CHECKPOINT, VENV) are taken from the directory the script is run in.
# VENV (default: the repository's .venv) picks the environment; TORCH_SPEC (default torch==2.13.0, this project's CPU
# pin) the torch to install (on a GPU machine: TORCH_SPEC=torch). Ports: PARAKEET_HTTP_PORT/GRPC_PORT/METRICS_PORT
# (8000-8002). The install is skipped while the environment is up to date: its stamp file holds the hash of this
# repository's path, TORCH_SPEC and pyproject.toml, and the packages import. tritonserver's own log goes to
# $VENV/parakeet-serve.log. QUICKSTART_DRY_RUN=1 prints the resolved paths and the plan, and stops before installing.
set -euo pipefail

say() { printf 'quickstart: %s\n' "$*"; }
die() { printf 'quickstart: error: %s\n' "$*" >&2; exit 2; }
absolute() { case $1 in /*) printf '%s\n' "$1" ;; *) printf '%s\n' "$PWD/$1" ;; esac; }

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
venv=$(absolute "${VENV:-$repo/.venv}")
torch_spec=${TORCH_SPEC:-torch==2.13.0}
stamp=$venv/.parakeet-quickstart-stamp
server_log=$venv/parakeet-serve.log

checkpoint=${PARAKEET_CHECKPOINT:-nvidia/parakeet-tdt-0.6b-v3}
if [ -e "$checkpoint" ]; then
  checkpoint=$(absolute "$checkpoint")
elif [[ $checkpoint == *.nemo || $checkpoint == /* || $checkpoint == .* ]]; then
  die "checkpoint not found: $checkpoint (PARAKEET_CHECKPOINT is a .nemo file or a Hugging Face repo id)"
fi

audio=()
for file in "$@"; do
  [ -e "$file" ] || die "audio file not found: $file"
  audio+=("$(absolute "$file")")
done
[ ${#audio[@]} -gt 0 ] || audio=("$repo/tests/fixtures/audio/speech_en.wav")

fingerprint() {
  { printf '%s\n' "$repo" "$torch_spec"; cat "$repo/pyproject.toml"; } |
    python3 -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())'
}

environment_up_to_date() {
  [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$(fingerprint)" ] &&
    "$venv/bin/python" -c 'import torch, parakeet_core, parakeet_triton.serve, parakeet_client, pytriton, fastapi' \
      >/dev/null 2>&1
}

if environment_up_to_date; then install=no; else install=yes; fi

if [ "${QUICKSTART_DRY_RUN:-0}" = 1 ]; then
  say "repository: $repo"
  say "environment: $venv (install: $install)"
  say "checkpoint: $checkpoint"
  for file in "${audio[@]}"; do say "audio: $file"; done
  say "server log: $server_log"
  say "dry run: stopping before the install"
  exit 0
fi

cd "$repo"
if [ "$install" = yes ]; then
  rm -f "$stamp"
  if [ ! -x "$venv/bin/python" ]; then
    say "creating the environment $venv..."
    python3 -m venv "$venv"
  fi
  if [ -n "${TORCH_SPEC:-}" ]; then say "installing $torch_spec..."; else say "installing torch (CPU build)..."; fi
  "$venv/bin/pip" install -q --disable-pip-version-check "$torch_spec"
  say "installing parakeet-triton..."
  "$venv/bin/pip" install -q --disable-pip-version-check -e '.[serve,client,openai]'
  fingerprint >"$stamp"
else
  say "environment $venv is up to date"
fi

export PARAKEET_CHECKPOINT=$checkpoint
export PARAKEET_HTTP_PORT=${PARAKEET_HTTP_PORT:-8000} PARAKEET_GRPC_PORT=${PARAKEET_GRPC_PORT:-8001}
export PARAKEET_METRICS_PORT=${PARAKEET_METRICS_PORT:-8002}
for port in "$PARAKEET_HTTP_PORT" "$PARAKEET_GRPC_PORT" "$PARAKEET_METRICS_PORT"; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then  # another server would answer in place of ours
    die "port $port on 127.0.0.1 is in use; choose free ones with PARAKEET_HTTP_PORT, PARAKEET_GRPC_PORT, PARAKEET_METRICS_PORT"
  fi
done
if [ -e "$checkpoint" ]; then
  say "starting the server..."
else
  say "starting the server (its first start downloads $checkpoint from Hugging Face)..."
fi
"$venv/bin/parakeet-serve" --log-file "$server_log" &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
"$venv/bin/python" - <<PY
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
say "transcribing ${#audio[@]} file(s)..."
"$venv/bin/parakeet-client" --url "127.0.0.1:${PARAKEET_GRPC_PORT}" --timestamps "${audio[@]}"
