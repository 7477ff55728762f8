"""Names at the ensemble boundary, shared by the model repository, the client and the tests.

The input and output names follow the open Triton ASR convention (k2-fsa/sherpa, WeNet, Triton-ASR-Client):
callers send `WAV` (+ `WAV_LENS`) and read `TRANSCRIPTS`.
"""

ENSEMBLE_MODEL = "parakeet"
PREPROCESSOR_MODEL = "preprocessor"
ENCODER_MODEL = "encoder"
DECODER_MODEL = "decoder"

WAV = "WAV"
WAV_LENS = "WAV_LENS"
TRANSCRIPTS = "TRANSCRIPTS"
TIMESTAMPS = "TIMESTAMPS"

SAMPLE_RATE = 16000
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
