#!/usr/bin/env bash
# Build-time helper: bake a Hugging Face checkpoint into the image for air-gapped sites.
#
#   bake-checkpoint.sh HF_ID_OR_EMPTY [DOWNLOAD_CACHE]
#
# Fetches the checkpoint with the resolver the models and the entrypoint use
# (parakeet_core.checkpoint.resolve_checkpoint) into DOWNLOAD_CACHE (a BuildKit cache mount, so a rebuild after
# a source change does not download the weights again), copies that one repository's cache into
# /opt/parakeet/hf-cache (Hugging Face cache layout), checks that it resolves from there with
# HF_HUB_OFFLINE=1, and records the id in /opt/parakeet/baked-checkpoint, which the entrypoint reads.
# An empty id bakes nothing.
set -euo pipefail

checkpoint="${1:-}"
download_cache="${2:-/tmp/bake-download-cache}"
if [[ -z "$checkpoint" ]]; then
    echo "bake-checkpoint: no BAKE_CHECKPOINT given; the image fetches or mounts its checkpoint at run time"
    exit 0
fi
if [[ "$checkpoint" != */* || -e "$checkpoint" ]]; then
    echo "bake-checkpoint: BAKE_CHECKPOINT must be a Hugging Face id (org/name), got '$checkpoint'" >&2
    exit 1
fi

resolve() {  # resolve "$checkpoint" with HF_HUB_CACHE=$1 and HF_HUB_OFFLINE=$2; prints the .nemo path
    HF_HUB_CACHE="$1" HF_HOME=/tmp/bake-hf-home HF_HUB_OFFLINE="$2" BAKE_ID="$checkpoint" python3 -c '
import os
from parakeet_core.checkpoint import resolve_checkpoint
print(resolve_checkpoint(os.environ["BAKE_ID"]))'
}

mkdir -p "$download_cache"
resolve "$download_cache" 0
repo_dir="models--${checkpoint//\//--}"
if [[ ! -d "$download_cache/$repo_dir" ]]; then
    echo "bake-checkpoint: $checkpoint did not land in $download_cache/$repo_dir" >&2
    exit 1
fi
baked_cache=/opt/parakeet/hf-cache
rm -rf "${baked_cache:?}/$repo_dir"
mkdir -p "$baked_cache"
cp -a "$download_cache/$repo_dir" "$baked_cache/"   # keeps the snapshots/ -> blobs/ relative links
rm -rf "$baked_cache/$repo_dir/.locks"

resolve "$baked_cache" 1
rm -rf /tmp/bake-hf-home
printf '%s\n' "$checkpoint" >/opt/parakeet/baked-checkpoint
du -shL "$baked_cache/$repo_dir"
