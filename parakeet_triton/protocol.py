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
