"""Live streams to the server's streaming model (`parakeet-serve --streaming`): audio sources cut into pieces, and
what comes back for each piece.

    async with AsyncParakeetClient("localhost:8001") as client:
        async for update in client.stream("talk.wav", piece_seconds=0.5, realtime=True):
            print(update.text)                # the text so far; update.transcript on the last one

A stream is one Triton sequence: every piece is a request (WAV [1, n] + WAV_LENS) with the same random sequence id,
the first with sequence_start; when the source ends, one more request without audio carries sequence_end and
brings the final transcript with word and segment timestamps.
"""

from __future__ import annotations

import os
import secrets
import struct
from dataclasses import dataclass
from typing import BinaryIO, Iterable, Iterator

import numpy as np

from .audio import AudioInput, load_clip
from .protocol import SAMPLE_RATE
from .transcript import Transcript

STDIN_FORMATS = ("wav", "s16le", "f32le")
"""What `--stream -` reads: a WAV stream (PCM 16/32-bit or float 32-bit, any rate and channels), or raw 16 kHz mono
samples, signed 16-bit or float 32-bit little-endian."""


@dataclass(frozen=True)
class StreamUpdate:
    """The server's answer to one piece of a stream.

    `text` is everything recognised so far (its end may still change by a few characters when punctuation
    follows); `audio_seconds` the audio sent so far; `latency_seconds` the time from sending this piece to its
    answer. The last update has `final` True and `transcript` (with word and segment timestamps)."""

    text: str
    audio_seconds: float
    latency_seconds: float
    final: bool = False
    transcript: Transcript | None = None


def new_sequence_id() -> int:
    """A random non-zero 63-bit sequence id (Triton's sequence ids are uint64; 0 means none)."""
    return secrets.randbits(63) or 1


def piece_samples(piece_seconds: float) -> int:
    if not piece_seconds > 0:
        raise ValueError(f"piece_seconds must be > 0, got {piece_seconds}")
    return max(1, round(piece_seconds * SAMPLE_RATE))


def audio_pieces(audio: AudioInput | Iterable[np.ndarray], piece_seconds: float) -> Iterator[np.ndarray]:
    """Float32 16 kHz mono pieces of `piece_seconds` from a file or an array (decoded whole first, see
    `load_clip`), or the arrays of an iterable of pieces as they come (already 16 kHz mono)."""
    size = piece_samples(piece_seconds)
    if isinstance(audio, (str, os.PathLike, np.ndarray, tuple)):
        samples = load_clip(audio).samples
        for start in range(0, len(samples), size):
            yield samples[start:start + size]
        return
    for piece in audio:
        piece = np.asarray(piece)
        if piece.ndim != 1 or piece.dtype != np.float32:
            raise ValueError(f"pieces must be 1-D float32 arrays at {SAMPLE_RATE} Hz, got {piece.dtype} {piece.shape}")
        yield piece


def read_pieces(stream: BinaryIO, format: str, piece_seconds: float) -> Iterator[np.ndarray]:
    """Float32 16 kHz mono pieces of about `piece_seconds` read from a byte stream (stdin) as it arrives: WAV (its
    header first; converted to 16 kHz mono), or raw 16 kHz mono `s16le` / `f32le`."""
    if format not in STDIN_FORMATS:
        raise ValueError(f"format must be one of {STDIN_FORMATS}, got {format!r}")
    size = piece_samples(piece_seconds)
    if format == "wav":
        header = _read_wav_header(stream)
        yield from _converted(_frames(stream, header, size), header)
        return
    dtype = np.dtype("<i2") if format == "s16le" else np.dtype("<f4")
    yield from _frames(stream, _WavHeader(SAMPLE_RATE, 1, dtype), size)


@dataclass(frozen=True)
class _WavHeader:
    rate: int
    channels: int
    dtype: np.dtype


_WAV_DTYPES = {(1, 16): np.dtype("<i2"), (1, 32): np.dtype("<i4"), (3, 32): np.dtype("<f4")}


def _read_exactly(stream: BinaryIO, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = stream.read(count - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _read_wav_header(stream: BinaryIO) -> _WavHeader:
    """Read up to the start of the `data` chunk; ValueError for what is not a WAV stream this reader takes."""
    riff = _read_exactly(stream, 12)
    if len(riff) < 12 or riff[:4] != b"RIFF" or riff[8:12] != b"WAVE":
        raise ValueError("stdin is not a WAV stream (no RIFF/WAVE header); for raw samples use --stdin-format "
                         "s16le or f32le")
    header = None
    while True:
        chunk = _read_exactly(stream, 8)
        if len(chunk) < 8:
            raise ValueError("WAV stream ended before its data chunk")
        name, length = chunk[:4], struct.unpack("<I", chunk[4:])[0]
        if name == b"data":
            if header is None:
                raise ValueError("WAV stream has no fmt chunk before its data")
            return header
        body = _read_exactly(stream, length + (length & 1))
        if name == b"fmt ":
            tag, channels, rate = struct.unpack("<HHI", body[:8])
            bits = struct.unpack("<H", body[14:16])[0]
            if tag == 0xFFFE and len(body) >= 26:  # WAVE_FORMAT_EXTENSIBLE: the sub-format's first two bytes
                tag = struct.unpack("<H", body[24:26])[0]
            dtype = _WAV_DTYPES.get((tag, bits))
            if dtype is None or channels < 1 or rate < 1:
                raise ValueError(f"unsupported WAV stream (format {tag}, {bits} bits, {channels} channels); "
                                 "send 16- or 32-bit PCM or 32-bit float")
            header = _WavHeader(rate, channels, dtype)


def _frames(stream: BinaryIO, header: _WavHeader, size: int) -> Iterator[np.ndarray]:
    """Pieces of `size` frames (at the stream's rate) as float32 mono, the last one shorter."""
    frame_bytes = header.dtype.itemsize * header.channels
    while True:
        data = _read_exactly(stream, size * frame_bytes)
        usable = len(data) - len(data) % frame_bytes
        if usable:
            samples = np.frombuffer(data[:usable], dtype=header.dtype).reshape(-1, header.channels)
            if header.dtype.kind == "i":
                samples = samples / float(2 ** (8 * header.dtype.itemsize - 1))
            yield samples.mean(axis=1).astype(np.float32)
        if len(data) < size * frame_bytes:
            return


def _converted(pieces: Iterator[np.ndarray], header: _WavHeader) -> Iterator[np.ndarray]:
    if header.rate == SAMPLE_RATE:
        yield from pieces
        return
    import soxr

    resampler = soxr.ResampleStream(header.rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
    for piece in pieces:
        yield resampler.resample_chunk(piece)
    yield resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
