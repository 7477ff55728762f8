"""Names at the ensemble's public boundary: what a client sends and reads.

The one source of these names: `parakeet_triton.protocol` (the server side) re-exports them, so the standalone
`parakeet-client` distribution needs nothing from the server package. The input and output names follow the open
Triton ASR convention (k2-fsa/sherpa, WeNet, Triton-ASR-Client): callers send `WAV` (+ `WAV_LENS`) and read
`TRANSCRIPTS`.
"""

ENSEMBLE_MODEL = "parakeet"
STREAMING_MODEL = "parakeet_streaming"
"""The streaming model (served with `parakeet-serve --streaming`): one request per piece of a live stream, with
Triton's sequence parameters (sequence_id, sequence_start, sequence_end); docs/streaming.md, "Serving"."""

WAV = "WAV"
WAV_LENS = "WAV_LENS"
TRANSCRIPTS = "TRANSCRIPTS"
TIMESTAMPS = "TIMESTAMPS"

SAMPLE_RATE = 16000

# Parameter of the public model's config.pbtxt: the longest clip the server accepts, in seconds.
MAX_AUDIO_SECONDS_PARAMETER = "max_audio_seconds"

__all__ = ["ENSEMBLE_MODEL", "STREAMING_MODEL", "WAV", "WAV_LENS", "TRANSCRIPTS", "TIMESTAMPS", "SAMPLE_RATE",
           "MAX_AUDIO_SECONDS_PARAMETER"]
