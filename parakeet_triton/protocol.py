"""Names at the ensemble boundary, shared by the model repository, the client and the tests.

The public names (what clients send and read: `ENSEMBLE_MODEL`, `STREAMING_MODEL`, `WAV`, `WAV_LENS`, `TRANSCRIPTS`,
`TIMESTAMPS`, `SAMPLE_RATE`, `MAX_AUDIO_SECONDS_PARAMETER`) are defined once, in `parakeet_client.protocol`, and re-exported here;
the rest is the server's own.
"""

from parakeet_client.protocol import (  # noqa: F401 (re-exported)
    ENSEMBLE_MODEL, MAX_AUDIO_SECONDS_PARAMETER, SAMPLE_RATE, STREAMING_MODEL, TIMESTAMPS, TRANSCRIPTS, WAV, WAV_LENS)

PREPROCESSOR_MODEL = "preprocessor"
ENCODER_MODEL = "encoder"
DECODER_MODEL = "decoder"
COMPOSING_MODELS = (PREPROCESSOR_MODEL, ENCODER_MODEL, DECODER_MODEL)

# Template folder of the streaming model's further names: each is an ensemble of one step over the streaming
# model, which passes the sequence id and flags on (Triton 2.51), so an alias costs no memory.
STREAMING_ALIAS_TEMPLATE = "parakeet_streaming_alias"

# Control inputs the streaming model's sequence batcher fills in from each request's sequence parameters; clients
# never send them. The sequence's key is the request's own correlation id (a number or a string), read with
# `InferenceRequest.correlation_id()`: no CORRID control input (Triton 2.51 fills a UINT64 one from a string id with
# the string's memory, and crashed under load with one).
SEQUENCE_START = "START"  # INT32 [1, 1]: 1 on the first request of a sequence (sequence_start)
SEQUENCE_END = "END"  # INT32 [1, 1]: 1 on the last one (sequence_end)

# Longest clip the server accepts unless configured otherwise (3 hours).
DEFAULT_MAX_AUDIO_SECONDS = 10800.0

# Request header (HTTP) / metadata key (gRPC) carrying the operator key for Triton's restricted admin APIs.
ADMIN_KEY_HEADER = "parakeet-admin-key"
# Triton 2.51's gRPC server expects restricted-protocol metadata keys with this prefix.
GRPC_ADMIN_KEY_HEADER = "triton-grpc-protocol-" + ADMIN_KEY_HEADER

# Tensors between the composing models of the ensemble (internal; clients never see them).
# preprocessor -> encoder
FEATURES = "FEATURES"  # FP32 [B, F, T'] log-mel features (F from the checkpoint config)
FEATURE_LENGTHS = "FEATURE_LENGTHS"  # INT64 [B, 1] valid frames of each clip
# encoder -> decoder
ENCODED = "ENCODED"  # FP32 [B, T'', D] encoder output (computed in bf16 on GPU; bf16 -> fp32 -> bf16 is exact)
ENCODED_LENGTHS = "ENCODED_LENGTHS"  # INT64 [B, 1] valid encoder frames of each clip

# Keys of the models' config.pbtxt `parameters`, rendered from parakeet_triton.settings by parakeet_triton.render.
# Read back by parakeet_triton.glue in each composing model:
CHECKPOINT_PARAMETER = "checkpoint"
DEVICE_PARAMETER = "device"
ATTENTION_PARAMETER = "attention"
FULL_ATTENTION_MAX_SECONDS_PARAMETER = "full_attention_max_seconds"
CPU_THREADS_PARAMETER = "cpu_threads"
STREAMING_CONTEXTS_PARAMETER = "streaming_contexts"  # "left,chunk,right" seconds, of the streaming model
# ... and, in the public model too, by clients: MAX_AUDIO_SECONDS_PARAMETER (from parakeet_client.protocol).
# Read by Triton's Python backend itself.
EXECUTION_ENV_PATH_PARAMETER = "EXECUTION_ENV_PATH"
FORCE_CPU_ONLY_INPUT_TENSORS_PARAMETER = "FORCE_CPU_ONLY_INPUT_TENSORS"
