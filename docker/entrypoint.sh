#!/usr/bin/env bash
# Container entrypoint of the parakeet-triton images (Dockerfile.triton, Dockerfile.jetson).
#
# 1. Resolves the checkpoint once, before Triton starts: a Hugging Face id (PARAKEET_CHECKPOINT, default the
#    launcher's) is fetched into HF_HOME / HF_HUB_CACHE with parakeet_core's own resolver (honouring
#    HF_HUB_OFFLINE), and the models are then pointed at the local .nemo file, so the three model processes
#    neither download nor ask the Hub anything. PARAKEET_PREFETCH=0 leaves resolving to the models.
# 2. Renders the model repository with `parakeet-serve --render-only` (every PARAKEET_* variable of the
#    launcher applies: PARAKEET_DEVICE, PARAKEET_INSTANCE_KIND, PARAKEET_INSTANCES, PARAKEET_MAX_BATCH_SIZE,
#    PARAKEET_MAX_QUEUE_DELAY_US, PARAKEET_MAX_AUDIO_SECONDS, ...).
# 3. Starts the HTTP front (python -m parakeet_triton.front) on PARAKEET_HTTP_PORT: it validates every request
#    (size, JSON depth, shapes against data) before forwarding it to tritonserver's HTTP server, which listens on
#    a Unix socket in a private directory only. Triton 2.51's own HTTP front end can be crashed by small
#    malicious requests (docs/deploy.md). gRPC and metrics are Triton's, on PARAKEET_HOST (default 0.0.0.0).
#    Should the front exit, tritonserver is stopped too, and the other way round.
# 4. Starts the stub watchdog (python -m parakeet_triton.watchdog) in the background: should a model's backend
#    process die, it stops tritonserver so that the container exits and is restarted, instead of a server that
#    reports ready while every request fails.
# 5. Runs tritonserver and, on SIGTERM / SIGINT, drains it (python -m parakeet_triton.drain): new requests are
#    refused with UNAVAILABLE, those in flight finish through the whole ensemble (for up to
#    PARAKEET_EXIT_TIMEOUT_SECS), then tritonserver is stopped. A second signal kills it. The exit code is
#    tritonserver's.
#
# Triton's admin APIs (shared-memory registration, logging, trace, model repository) need the header
# parakeet-admin-key: $PARAKEET_ADMIN_KEY; without that variable the key is random, i.e. they are closed.
#
# Arguments starting with "-" are appended to tritonserver's command line (after TRITON_ARGS); any other
# first argument is run as a command instead (`docker run IMAGE bash`).
set -euo pipefail

if [[ $# -gt 0 && "$1" != -* ]]; then
    exec "$@"
fi

say() { echo "parakeet-entrypoint: $*" >&2; }

# Weights baked in at build time (BAKE_CHECKPOINT): use them, offline, unless the environment says otherwise.
baked=/opt/parakeet/baked-checkpoint
if [[ -s "$baked" ]]; then
    : "${PARAKEET_CHECKPOINT:=$(cat "$baked")}"
    : "${HF_HUB_CACHE:=/opt/parakeet/hf-cache}"
    : "${HF_HUB_OFFLINE:=1}"
    export PARAKEET_CHECKPOINT HF_HUB_CACHE HF_HUB_OFFLINE
fi

if [[ "${PARAKEET_PREFETCH:-1}" != 0 ]]; then
    say "resolving checkpoint ${PARAKEET_CHECKPOINT:-<launcher default>}"
    PARAKEET_CHECKPOINT="$(python3 - <<'PY'
import os
import sys

from parakeet_core.checkpoint import DEFAULT_CHECKPOINT, resolve_checkpoint

source = os.environ.get("PARAKEET_CHECKPOINT") or DEFAULT_CHECKPOINT
try:
    print(resolve_checkpoint(source))
except Exception as error:  # CheckpointError, or anything the Hub client raises
    sys.exit(f"parakeet-entrypoint: cannot resolve checkpoint {source!r}: {error}")
PY
)"
    export PARAKEET_CHECKPOINT
    say "checkpoint file $PARAKEET_CHECKPOINT"
fi

repository="${PARAKEET_REPOSITORY_DIR:-${TMPDIR:-/tmp}/parakeet-model-repository}"
rm -rf "$repository"
parakeet-serve --render-only "$repository"

# The flags parakeet_triton.server.tritonserver_command gives the test suite's server, less the ones that only
# matter there (loopback addresses, a per-process shared-memory prefix: a container has its own /dev/shm).
shm_growth=",shm-growth-byte-size=$(( ${PARAKEET_SHM_GROWTH_MB:-64} * 1048576 ))"
admin_key="${PARAKEET_ADMIN_KEY:-$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')}"
restricted="shared-memory,logging,trace,model-repository:parakeet-admin-key=${admin_key}"
# Idle OpenMP threads of one stage sleep instead of spinning on the cores the other stages need.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
host="${PARAKEET_HOST:-0.0.0.0}"
# tritonserver's HTTP listens only on a Unix socket in a directory of ours (0700); the front takes the port.
# Under /tmp whatever TMPDIR says: a Unix socket's path must stay within 107 bytes.
socket_dir="$(mktemp -d /tmp/parakeet-http.XXXXXX)"
chmod 700 "$socket_dir"
http_socket="$socket_dir/triton.sock"
args=(
    --model-repository="$repository"
    --model-control-mode=none
    --http-restricted-api="$restricted"
    --grpc-restricted-protocol="$restricted"
    --disable-auto-complete-config
    --strict-readiness=true
    --exit-on-error=true
    --allow-metrics=true
    --http-address="unix:$http_socket"
    --http-port=0
    --grpc-address="$host"
    --grpc-port="${PARAKEET_GRPC_PORT:-8001}"
    --metrics-address="$host"
    --metrics-port="${PARAKEET_METRICS_PORT:-8002}"
    --exit-timeout-secs="${PARAKEET_EXIT_TIMEOUT_SECS:-60}"
    --log-verbose="${PARAKEET_LOG_VERBOSE:-0}"
    # Large requests (3 h of FP32 audio is ~690 MB) grow the stubs' /dev/shm regions in big steps.
    "--backend-config=python${shm_growth}"
    # Long-lived gRPC channels pin a client to one pod; closing them now and then (GOAWAY; calls in flight
    # get the grace period) lets clients reconnect through the Service and reach pods the autoscaler added.
    --grpc-max-connection-age="${TRITON_GRPC_MAX_CONNECTION_AGE_MS:-600000}"
    --grpc-max-connection-age-grace="${TRITON_GRPC_MAX_CONNECTION_AGE_GRACE_MS:-120000}"
)
# Extra tritonserver flags from the environment (split on blanks), then from the command line.
read -r -a extra <<<"${TRITON_ARGS:-}"
args+=("${extra[@]}" "$@")

# tcmalloc for tritonserver and the stage processes (they inherit it): with glibc's malloc their memory grows
# under mixed request lengths (docs/load-test.md, Soak). PARAKEET_MALLOC=system turns it off.
preload="$(python3 - "${PARAKEET_MALLOC:-}" <<'PY'
import sys

from parakeet_triton.server import choose_allocator

try:
    library, note = choose_allocator(sys.argv[1] or None)
except (FileNotFoundError, ValueError) as error:
    sys.exit(f"parakeet-entrypoint: error: PARAKEET_MALLOC={sys.argv[1]}: {error}")
if note:
    print(f"parakeet-entrypoint: note: {note}", file=sys.stderr)
print(library or "")
PY
)"
say "starting tritonserver ${args[*]//${admin_key}/***}${preload:+ (LD_PRELOAD=$preload)}"
LD_PRELOAD="${preload}${LD_PRELOAD:+:$LD_PRELOAD}" tritonserver "${args[@]}" &
triton=$!
# The front reads PARAKEET_MAX_AUDIO_SECONDS / PARAKEET_MAX_REQUEST_MB (the request size limit) itself.
python3 -m parakeet_triton.front --host "$host" --port "${PARAKEET_HTTP_PORT:-8000}" --upstream-socket "$http_socket" &
front=$!
loopback=127.0.0.1
[[ "$host" == *:* ]] && loopback="[::1]"
http_url="http://$loopback:${PARAKEET_HTTP_PORT:-8000}"
python3 -m parakeet_triton.watchdog --pid "$triton" --ready-url "$http_url/v2/health/ready" \
    --repository "$repository" &

stopping=0
# shellcheck disable=SC2329  # invoked by the trap below
stop() {
    if [[ $stopping == 1 ]]; then
        kill -KILL "$triton" 2>/dev/null || true
        return
    fi
    stopping=1
    # Refuse new requests and let those in flight finish through the whole ensemble, then stop tritonserver,
    # which refuses the ensemble's internal requests once it is signalled.
    python3 -m parakeet_triton.drain --repository "$repository" --http-url "$http_url" \
        --timeout "${PARAKEET_EXIT_TIMEOUT_SECS:-60}" || true
    kill -TERM "$triton" 2>/dev/null || true
}
trap stop TERM INT
code=0
while true; do
    wait -n "$triton" "$front" && code=0 || code=$?
    # wait returns early (code > 128) when a trapped signal arrives; loop until one of the two has exited
    if [[ $stopping == 0 ]] && ! kill -0 "$front" 2>/dev/null && kill -0 "$triton" 2>/dev/null; then
        say "error: the HTTP front exited (code $code); stopping tritonserver"
        stopping=1
        kill -TERM "$triton" 2>/dev/null || true
        wait "$triton" || true
        code=1
        break
    fi
    kill -0 "$triton" 2>/dev/null || break
done
if kill -0 "$triton" 2>/dev/null; then wait "$triton"; fi
if kill -0 "$front" 2>/dev/null; then
    kill -TERM "$front" 2>/dev/null || true
    wait "$front" 2>/dev/null || true
fi
rm -rf "$socket_dir"
exit "$code"
