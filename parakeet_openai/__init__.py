"""An OpenAI-compatible speech-to-text API (`POST /v1/audio/transcriptions`) in front of the Triton ensemble."""
