"""Triton Python backend model `decoder`: encoder output -> transcript + timestamps (ParakeetTDT.decode, to_transcript).

Thin glue: all parsing, batching and error handling lives in parakeet_triton.glue, all model logic in
parakeet_core. The configuration (checkpoint, device, limits) comes from this model's config.pbtxt parameters,
rendered by `parakeet-serve` / `parakeet-serve --render-only DIR`.
"""

import triton_python_backend_utils as pb_utils

from parakeet_triton.glue import DecoderGlue


class TritonPythonModel(DecoderGlue):
    pb_utils = pb_utils
