#!/usr/bin/env bash
# Build-time step shared by Dockerfile.triton and Dockerfile.jetson (run as root).
#
#   install-parakeet.sh SOURCE_DIR
#
# Installs parakeet-triton and its few dependencies into the image's python3, the interpreter that Triton's
# Python backend stub embeds (Python 3.10 in the 24.10 images), checks that the base image has what the
# entrypoint relies on, and creates the non-root user (uid/gid 10001) that the container runs as.
# PyTorch must already be installed: the two images get it from different places.
set -euo pipefail

src="${1:?usage: install-parakeet.sh SOURCE_DIR}"

python3 -c 'import torch' || { echo "install-parakeet: install PyTorch first" >&2; exit 1; }
# numpy<2: with numpy 2 in the stub's environment, outputs of the 2.51 Python backend arrive empty.
# tcmalloc (preloaded into tritonserver and the stage processes: flat memory under mixed request lengths) and
# ffmpeg (the OpenAI gateway decodes m4a, webm, mp4 and other uploads with it).
# Ubuntu's package versions move with the base image's archive snapshot; pinning them here would only break.
apt-get update
apt-get install -y --no-install-recommends libgoogle-perftools4 ffmpeg
rm -rf /var/lib/apt/lists/*
python3 -m pip install --no-cache-dir "numpy<2" "${src}[openai]"
cd /  # import the installed package, not a source tree
python3 - <<'PY'
import sys

import numpy
import torch

import parakeet_core  # noqa: F401
import parakeet_triton  # noqa: F401
import parakeet_openai.app  # noqa: F401

from parakeet_triton.render import template_dir

assert int(numpy.__version__.split(".")[0]) < 2, f"numpy {numpy.__version__}: the 2.51 Python backend needs numpy<2"
print(f"install-parakeet: model repository templates in {template_dir()}")  # shipped as package data
print(f"install-parakeet: python {sys.version.split()[0]}, torch {torch.__version__}, numpy {numpy.__version__}")
PY

# What the entrypoint and the HEALTHCHECK use from the base image.
command -v tritonserver
command -v parakeet-serve
command -v parakeet-openai
command -v ffmpeg
test -f /opt/tritonserver/backends/python/libtriton_python.so
test -x /opt/nvidia/nvidia_entrypoint.sh

groupadd --system --gid 10001 parakeet
useradd --system --uid 10001 --gid parakeet --home-dir /home/parakeet --create-home \
    --shell /usr/sbin/nologin parakeet
# /cache: Hugging Face cache (HF_HOME=/cache/huggingface), normally a mounted volume.
install -d -o parakeet -g parakeet -m 0775 /cache /cache/huggingface
