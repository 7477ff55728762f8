"""Exceptions raised by parakeet_core, each carrying a message that names the problem."""


class ParakeetError(Exception):
    """Base class of every error raised on purpose by parakeet_core."""


class CheckpointError(ParakeetError, ValueError):
    """The checkpoint cannot be found, read or used."""


class UnsupportedConfigError(CheckpointError):
    """The checkpoint's configuration asks for something this implementation does not support."""


class InvalidAudioError(ParakeetError, ValueError):
    """The audio given for transcription is unusable (empty, not finite, wrong type, too long...)."""
