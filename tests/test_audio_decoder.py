"""One audio decoder (parakeet_client.audio) for the client and parakeet_core: the same samples from the same
input, the same rules for arrays, the same messages (as InvalidAudioError in the core). No model is loaded."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import soxr
import torch

from parakeet_client.audio import decode_audio, load_clip
from parakeet_client.errors import AudioDecodeError
from parakeet_core import InvalidAudioError, load_audio
from parakeet_core.audio import as_waveform

needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg not on PATH")


def tone(seconds: float, rate: int, frequency: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


@pytest.fixture
def stereo_44k_wav(tmp_path: Path) -> Path:
    path = tmp_path / "stereo.wav"
    soundfile.write(path, np.stack([tone(1.0, 44100), tone(1.0, 44100, 660)], axis=1), 44100, subtype="FLOAT")
    return path


def test_a_file_gives_the_same_samples_to_the_client_and_the_core(stereo_44k_wav: Path) -> None:
    stereo, _ = soundfile.read(stereo_44k_wav, dtype="float32")
    expected = soxr.resample(stereo.mean(axis=1, dtype=np.float32), 44100, 16000, quality="HQ")
    np.testing.assert_array_equal(load_clip(stereo_44k_wav).samples, expected)
    np.testing.assert_array_equal(load_audio(stereo_44k_wav, 16000), expected)
    np.testing.assert_array_equal(as_waveform(str(stereo_44k_wav), 16000), expected)


@needs_ffmpeg
def test_ffmpeg_decodes_and_soxr_resamples_for_both(stereo_44k_wav: Path, tmp_path: Path) -> None:
    """ffmpeg only decodes (first audio stream, its own rate and channels); averaging and soxr are the same as for
    soundfile's files, so the lossless FLAC re-encoded through ffmpeg's path equals the WAV."""
    flac_in_mka = tmp_path / "tone.mka"
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(stereo_44k_wav), "-c:a", "flac",
                    "-sample_fmt", "s32", str(flac_in_mka)], check=True, timeout=60)
    with pytest.raises(RuntimeError):
        soundfile.read(flac_in_mka)  # so the ffmpeg path is the one taken
    core = load_audio(flac_in_mka, 16000)
    np.testing.assert_array_equal(core, load_clip(flac_in_mka).samples)
    np.testing.assert_allclose(core, load_audio(stereo_44k_wav, 16000), atol=1e-6)


def test_integer_pcm_is_scaled_in_the_core_as_in_the_client() -> None:
    signed = np.array([0, 16384, -32768], dtype=np.int16)
    np.testing.assert_array_equal(as_waveform(signed, 16000), [0.0, 0.5, -1.0])
    np.testing.assert_array_equal(as_waveform(signed, 16000), load_clip(signed).samples)
    unsigned = np.array([128, 192, 0], dtype=np.uint8)  # 8-bit PCM is offset binary: 128 is silence
    np.testing.assert_array_equal(decode_audio(unsigned), [0.0, 0.5, -1.0])
    np.testing.assert_array_equal(as_waveform(unsigned, 16000), [0.0, 0.5, -1.0])


def test_tensors_arrays_and_rates_agree() -> None:
    samples = tone(0.5, 8000)
    expected = decode_audio((samples, 8000))
    assert expected.size == 8000
    np.testing.assert_array_equal(as_waveform((torch.from_numpy(samples), 8000), 16000), expected)
    np.testing.assert_array_equal(as_waveform((samples, 8000.0), 16000), expected)  # a whole float rate
    np.testing.assert_array_equal(as_waveform(torch.from_numpy(tone(0.1, 16000)), 16000), tone(0.1, 16000))
    stereo = np.stack([samples, np.zeros_like(samples)], axis=1)
    np.testing.assert_allclose(as_waveform((stereo, 8000), 16000), decode_audio((samples / 2, 8000)), atol=1e-7)


@pytest.mark.parametrize("item, client_error, message", [
    ("absent.wav", AudioDecodeError, "absent.wav: no such file"),
    (np.zeros((2, 16000), dtype=np.float32), ValueError, "looks like (channels, frames)"),
    ((np.zeros(10, dtype=np.float32), 8000.5), ValueError, "sample_rate must be a positive integer, got 8000.5"),
    ((np.zeros(10, dtype=np.float32), True), ValueError, "sample_rate must be a positive integer, got True"),
    ((np.zeros(10, dtype=np.float32), 16000, 1), TypeError, "got a tuple of 3 items"),
    (np.array(["a"]), TypeError, "must be float or integer PCM, got dtype <U1"),
    (42, TypeError, "expected a path, a numpy array or (array, sample_rate), got int"),
])
def test_core_raises_invalid_audio_error_with_the_clients_message(item: object, client_error: type,
                                                                   message: str) -> None:
    with pytest.raises(client_error) as from_client:
        decode_audio(item)
    with pytest.raises(InvalidAudioError) as from_core:
        as_waveform(item, 16000)
    assert message in str(from_client.value)
    assert str(from_core.value) == str(from_client.value)


def test_a_file_without_samples_is_refused_by_both(tmp_path: Path) -> None:
    path = tmp_path / "empty.wav"
    soundfile.write(path, np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(InvalidAudioError, match=f"^{path}: the file holds no audio samples$"):
        load_audio(path, 16000)
    with pytest.raises(AudioDecodeError, match="the file holds no audio samples"):
        load_clip(path)


def test_without_ffmpeg_the_core_also_says_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from parakeet_client import audio as client_audio

    path = tmp_path / "tone.m4a"
    path.write_bytes(b"\x00\x00\x00\x18ftypM4A " + bytes(100))
    monkeypatch.setattr(client_audio.shutil, "which", lambda name: None)
    with pytest.raises(InvalidAudioError, match=r"tone.m4a: cannot read this file \(soundfile: .*install ffmpeg"):
        load_audio(path, 16000)


def test_parakeet_core_does_not_import_tritonclient() -> None:
    code = ("import sys, parakeet_core, parakeet_core.__main__; "
            "loaded = [m for m in ('tritonclient', 'parakeet_triton') if m in sys.modules]; "
            "print(loaded); sys.exit(bool(loaded))")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                               cwd=Path(__file__).resolve().parent.parent)
    assert completed.returncode == 0, completed.stdout + completed.stderr
