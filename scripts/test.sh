#!/usr/bin/env bash
# Set up a fresh virtual environment and run the whole test suite on the CPU, real Triton server included.
#   ./scripts/test.sh [pytest args...]      (VENV=path to choose the environment folder, default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

# System tools some tests use: ffmpeg (audio formats), espeak-ng (load-test speech), promtool (autoscaler query),
# tcmalloc (the server's default allocator), curl and jq (the documented HTTP examples).
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  missing=()
  command -v ffmpeg >/dev/null || missing+=(ffmpeg)
  command -v espeak-ng >/dev/null || missing+=(espeak-ng)
  command -v promtool >/dev/null || missing+=(prometheus)
  command -v curl >/dev/null || missing+=(curl)
  command -v jq >/dev/null || missing+=(jq)
  [ -e /usr/lib/x86_64-linux-gnu/libtcmalloc.so.4 ] || [ -e /usr/lib/aarch64-linux-gnu/libtcmalloc.so.4 ] || missing+=(libgoogle-perftools4)
  if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

python3 -m venv "$VENV"
# The CPU build of torch first, so nothing pulls the multi-GB CUDA build.
"$VENV/bin/pip" install -q torch==2.13.0
# Editable: Triton's Python-backend stub ignores PYTHONPATH and imports the project from this environment.
"$VENV/bin/pip" install -q -e '.[serve,client,openai,bench,test]'
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
