"""Triton Python backend model `parakeet_streaming`: pieces of live streams -> text so far, final transcript at the
end (parakeet_core.streaming: ParakeetTDT.stream, feed_many, finish_many).

Thin glue: all parsing, per-stream state, batching and error handling lives in parakeet_triton.glue, all model logic
in parakeet_core. The configuration (checkpoint, device, contexts, limits) comes from this model's config.pbtxt,
rendered by `parakeet-serve --streaming` / `parakeet-serve --streaming --render-only DIR`.
"""

import triton_python_backend_utils as pb_utils

from parakeet_triton.glue import StreamingGlue


class TritonPythonModel(StreamingGlue):
    pb_utils = pb_utils
