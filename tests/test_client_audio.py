"""parakeet_client.audio: any input becomes 16 kHz mono float32; clear errors otherwise (no server needed)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile

from parakeet_client import AudioClip, AudioDecodeError, load_clip
from parakeet_client import audio as client_audio
from parakeet_client.errors import NoAudioStreamError
from parakeet_triton.protocol import SAMPLE_RATE

needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg not on PATH")


def sine(frequency: float, seconds: float, rate: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


def peak_frequency(samples: np.ndarray, rate: int = SAMPLE_RATE) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(samples.size)))
    return float(np.fft.rfftfreq(samples.size, 1 / rate)[np.argmax(spectrum)])


def ffmpeg_encode(source: Path, target: Path, *options: str) -> Path:
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(source), *options, str(target)], check=True,
                   timeout=60)
    return target


@pytest.fixture
def stereo_44k_wav(tmp_path: Path) -> Path:
    left, right = sine(440, 1.0, 44100), sine(440, 1.0, 44100)
    path = tmp_path / "stereo.wav"
    soundfile.write(path, np.stack([left, right], axis=1), 44100, subtype="PCM_16")
    return path


def test_16k_wav_is_read_as_is(tmp_path: Path) -> None:
    samples = sine(300, 0.5, SAMPLE_RATE)
    path = tmp_path / "mono.wav"
    soundfile.write(path, samples, SAMPLE_RATE, subtype="FLOAT")
    clip = load_clip(path)
    assert clip.samples.dtype == np.float32 and clip.samples.shape == samples.shape
    np.testing.assert_array_equal(clip.samples, samples)
    assert clip.name == str(path) and clip.seconds == pytest.approx(0.5)


def test_stereo_44k_is_downmixed_and_resampled_with_soxr(stereo_44k_wav: Path) -> None:
    clip = load_clip(stereo_44k_wav)
    assert clip.samples.ndim == 1 and clip.samples.dtype == np.float32
    assert clip.samples.size == pytest.approx(SAMPLE_RATE, abs=2)
    assert peak_frequency(clip.samples) == pytest.approx(440, abs=2)


def test_channels_are_averaged(tmp_path: Path) -> None:
    left = sine(500, 0.25, SAMPLE_RATE)
    path = tmp_path / "half.wav"
    soundfile.write(path, np.stack([left, np.zeros_like(left)], axis=1), SAMPLE_RATE, subtype="FLOAT")
    np.testing.assert_allclose(load_clip(path).samples, left / 2, atol=1e-7)


@needs_ffmpeg
@pytest.mark.parametrize("suffix, options", [
    (".m4a", ("-c:a", "aac")),
    (".mp3", ("-c:a", "libmp3lame")),
    (".opus", ("-c:a", "libopus")),
    (".ogg", ("-c:a", "libvorbis")),
    (".flac", ()),
])
def test_compressed_formats(stereo_44k_wav: Path, tmp_path: Path, suffix: str, options: tuple[str, ...]) -> None:
    encoded = ffmpeg_encode(stereo_44k_wav, tmp_path / f"tone{suffix}", *options)
    clip = load_clip(encoded)
    assert clip.seconds == pytest.approx(1.0, abs=0.08)  # codec priming/padding
    assert peak_frequency(clip.samples) == pytest.approx(440, abs=3)


@needs_ffmpeg
def test_video_file_audio_track(stereo_44k_wav: Path, tmp_path: Path) -> None:
    video = tmp_path / "clip.mp4"
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-f", "lavfi", "-i", "color=c=black:s=32x32:d=1",
                    "-i", str(stereo_44k_wav), "-shortest", "-c:v", "libx264", "-c:a", "aac", str(video)],
                   check=True, timeout=60)
    clip = load_clip(video)
    assert clip.seconds == pytest.approx(1.0, abs=0.1)


@needs_ffmpeg
def test_video_without_audio_is_a_clear_error(tmp_path: Path) -> None:
    video = tmp_path / "silent.mp4"
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-f", "lavfi", "-i", "color=c=black:s=32x32:d=1",
                    "-c:v", "libx264", str(video)], check=True, timeout=60)
    with pytest.raises(NoAudioStreamError) as error:
        load_clip(video)
    assert str(error.value) == f"no audio stream in {video}"
    assert "trailing '?'" not in str(error.value)


@needs_ffmpeg
def test_text_renamed_to_mp4_is_called_not_media(tmp_path: Path) -> None:
    path = tmp_path / "notes.mp4"
    path.write_text("these are notes, not a video\n" * 20)
    with pytest.raises(AudioDecodeError, match="notes.mp4: cannot read this file: not audio or video that soundfile "
                                               "or ffmpeg recognise, or damaged"):
        load_clip(path)


@pytest.mark.parametrize("ffmpeg_output, expected", [
    ("Stream map '0:a:0' matches no streams.\nTo ignore this, add a trailing '?' to the map.",
     "no audio stream in v.mp4"),
    ("Output file #0 does not contain any stream", "no audio stream in v.mp4"),
    ("[mov @ 0x1] moov atom not found\nv.mp4: Invalid data found when processing input",
     "v.mp4: cannot read this file: not audio or video that soundfile or ffmpeg recognise, or damaged "
     "(soundfile: Format not recognised; ffmpeg: v.mp4: Invalid data found when processing input)"),
    ("Error while decoding stream #0:0: Invalid argument",
     "v.mp4: cannot read this file (soundfile: Format not recognised; ffmpeg: Error while decoding stream #0:0: "
     "Invalid argument)"),
])
def test_decode_failure_says_what_ffmpeg_found(ffmpeg_output: str, expected: str) -> None:
    error = client_audio.decode_failure("v.mp4", "Format not recognised", ffmpeg_output)
    assert str(error) == expected
    assert isinstance(error, NoAudioStreamError) == expected.startswith("no audio stream")


def test_corrupt_file_names_both_decoders(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.wav"
    path.write_bytes(b"RIFF\x00\x01garbage" * 50)
    with pytest.raises(AudioDecodeError, match=r"corrupt.wav: cannot read this file.*\(soundfile: .*") as error:
        load_clip(path)
    if shutil.which("ffmpeg"):
        assert "ffmpeg:" in str(error.value)


def test_without_ffmpeg_the_error_says_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     stereo_44k_wav: Path) -> None:
    path = tmp_path / "tone.m4a"
    if shutil.which("ffmpeg"):
        ffmpeg_encode(stereo_44k_wav, path, "-c:a", "aac")
    else:
        path.write_bytes(b"\x00\x00\x00\x18ftypM4A " + bytes(100))
    monkeypatch.setattr(client_audio.shutil, "which", lambda name: None)
    with pytest.raises(AudioDecodeError, match="install ffmpeg"):
        load_clip(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(AudioDecodeError, match="no such file"):
        load_clip(tmp_path / "absent.wav")


def test_empty_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "empty.wav"
    soundfile.write(path, np.zeros(0, dtype=np.float32), SAMPLE_RATE)
    with pytest.raises(AudioDecodeError, match="no audio samples"):
        load_clip(path)


def test_float64_array_is_taken_at_16k() -> None:
    samples = sine(200, 0.2, SAMPLE_RATE).astype(np.float64)
    clip = load_clip(samples)
    assert clip.samples.dtype == np.float32 and clip.samples.size == samples.size and clip.name == "audio"


def test_int16_array_is_scaled() -> None:
    clip = load_clip(np.array([0, 16384, -32768], dtype=np.int16))
    np.testing.assert_allclose(clip.samples, [0.0, 0.5, -1.0])


def test_array_with_rate_is_resampled() -> None:
    clip = load_clip((sine(440, 1.0, 8000), 8000))
    assert clip.samples.size == SAMPLE_RATE
    assert peak_frequency(clip.samples) == pytest.approx(440, abs=2)


def test_frames_by_channels_array_is_downmixed() -> None:
    stereo = np.stack([sine(440, 0.1, SAMPLE_RATE)] * 2, axis=1)
    assert load_clip(stereo).samples.shape == (stereo.shape[0],)


@pytest.mark.parametrize("item, error, match", [
    (np.zeros((2, 16000), dtype=np.float32), ValueError, "looks like \\(channels, frames\\)"),
    (np.array([0.0, np.nan], dtype=np.float32), ValueError, "NaN"),
    (np.zeros(0, dtype=np.float32), ValueError, "no samples"),
    ((np.zeros(10, dtype=np.float32), 0), ValueError, "sample_rate"),
    ((np.zeros(10, dtype=np.float32), 16000, 1), TypeError, "tuple of 3"),
    (np.array(["a"]), TypeError, "dtype"),
    (42, TypeError, "expected a path"),
])
def test_bad_arrays_are_refused(item: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        load_clip(item)


def test_audio_clip_validates() -> None:
    with pytest.raises(ValueError, match="float32"):
        AudioClip(np.zeros(4, dtype=np.float64))
    with pytest.raises(ValueError, match="1-D"):
        AudioClip(np.zeros((2, 2), dtype=np.float32))
