"""Triton Inference Server packaging of parakeet_core: model repository rendering and the `parakeet-serve` launcher."""
