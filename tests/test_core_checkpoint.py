"""Checkpoint reading: local files, gzip tars, the Hugging Face cache, and clear errors for bad ones."""

from __future__ import annotations

import io
import os
import tarfile

import pytest
import yaml

import parakeet_core
from parakeet_core import CheckpointError, UnsupportedConfigError, read_nemo, resolve_checkpoint
from core_fixtures import load_fixture


def _rewrite_nemo(source, target, *, edit_config=None, drop=(), gzip=False):
    """Copy a .nemo tar, optionally editing its config or dropping members."""
    with tarfile.open(source, "r:*") as archive, tarfile.open(target, "w:gz" if gzip else "w") as out:
        for member in archive.getmembers():
            name = os.path.basename(member.name)
            if name in drop:
                continue
            data = archive.extractfile(member).read() if member.isfile() else None
            if name == "model_config.yaml" and edit_config is not None:
                config = yaml.safe_load(data)
                edit_config(config)
                data = yaml.safe_dump(config).encode()
                member.size = len(data)
            out.addfile(member, io.BytesIO(data) if data is not None else None)
    return target


@pytest.fixture(scope="module")
def v3_path():
    return load_fixture("v3_small").checkpoint


def test_config_sizes_come_from_the_checkpoint(v3_path):
    checkpoint = read_nemo(v3_path, load_weights=False)
    raw = checkpoint.raw_config
    assert checkpoint.config.encoder.d_model == raw["encoder"]["d_model"]
    assert checkpoint.config.encoder.n_layers == raw["encoder"]["n_layers"]
    assert checkpoint.config.decoder.durations == tuple(raw["decoding"]["durations"])
    assert checkpoint.state_dict == {}


def test_gzip_compressed_nemo_loads(v3_path, tmp_path):
    path = _rewrite_nemo(v3_path, tmp_path / "model.nemo", gzip=True)
    model = parakeet_core.from_pretrained(path, device="cpu")
    samples = load_fixture("v3_small").clip_samples("speech_en")
    assert model.transcribe(samples).text == load_fixture("v3_small").reference["clips"]["speech_en"]["text"]


@pytest.mark.parametrize(
    "edit,key",
    [
        (lambda c: c["encoder"].update(subsampling="striding"), "encoder.subsampling"),
        (lambda c: c["decoding"].update(model_type="rnnt"), "decoding.model_type"),
        (lambda c: c["encoder"].update(self_attention_model="abs_pos"), "encoder.self_attention_model"),
        (lambda c: c["preprocessor"].update(normalize="all_features"), "preprocessor.normalize"),
        (lambda c: c["decoder"].update(_target_="nemo.collections.asr.modules.StatelessTransducerDecoder"), "decoder._target_"),
        (lambda c: (c.pop("decoder"), c.pop("joint")), "not CTC-only"),
    ],
)
def test_unsupported_config_names_key_and_value(v3_path, tmp_path, edit, key):
    path = _rewrite_nemo(v3_path, tmp_path / "bad.nemo", edit_config=edit)
    with pytest.raises(UnsupportedConfigError, match=key.replace(".", r"\.")):
        read_nemo(path)


def test_missing_weights_member_is_named(v3_path, tmp_path):
    path = _rewrite_nemo(v3_path, tmp_path / "noweights.nemo", drop=("model_weights.ckpt",))
    with pytest.raises(CheckpointError, match="model_weights.ckpt"):
        read_nemo(path)


def test_weights_not_matching_config_are_refused(v3_path, tmp_path):
    path = _rewrite_nemo(v3_path, tmp_path / "wrong.nemo", edit_config=lambda c: c["encoder"].update(n_layers=c["encoder"]["n_layers"] + 1))
    with pytest.raises(CheckpointError, match="do not match the architecture"):
        parakeet_core.from_pretrained(path, device="cpu")


def test_corrupt_file_is_refused(tmp_path):
    path = tmp_path / "corrupt.nemo"
    path.write_bytes(b"this is not a tar archive" * 100)
    with pytest.raises(CheckpointError, match="not a readable .nemo"):
        read_nemo(path)


def test_missing_path_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="neither an existing .nemo file nor a Hugging Face repo id"):
        resolve_checkpoint(tmp_path / "absent.nemo")


def test_repo_id_offline_and_not_cached_says_how_to_pass_a_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="pass its local path"):
        resolve_checkpoint("nvidia/parakeet-tdt-0.6b-v3", cache_dir=tmp_path)


def test_repo_id_resolves_from_hugging_face_cache_offline(v3_path, tmp_path, monkeypatch):
    """The real hub cache layout: models--org--name/{refs/main, snapshots/<rev>/file}."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--nvidia--parakeet-tdt-0.6b-v3"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    (snapshot / "parakeet-tdt-0.6b-v3.nemo").symlink_to(v3_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    resolved = resolve_checkpoint("nvidia/parakeet-tdt-0.6b-v3", cache_dir=tmp_path)
    assert resolved.name == "parakeet-tdt-0.6b-v3.nemo"
    model = parakeet_core.from_pretrained("nvidia/parakeet-tdt-0.6b-v3", device="cpu", cache_dir=tmp_path)
    assert model.config.decoder.vocab_size == 8192


@pytest.mark.parametrize("gzip", [False, True])
def test_truncated_file_is_refused_as_truncated(v3_path, tmp_path, gzip):
    whole = _rewrite_nemo(v3_path, tmp_path / "whole.nemo", gzip=gzip).read_bytes()
    cut = tmp_path / "cut.nemo"
    cut.write_bytes(whole[: len(whole) * 3 // 4])
    with pytest.raises(CheckpointError, match="truncated"):
        read_nemo(cut)


def test_check_nemo_finds_truncated_weights_without_loading_them(v3_path, tmp_path):
    from parakeet_core.checkpoint import check_nemo

    assert check_nemo(v3_path).state_dict == {}
    whole = v3_path.read_bytes() if hasattr(v3_path, "read_bytes") else open(v3_path, "rb").read()
    cut = tmp_path / "cut.nemo"
    cut.write_bytes(whole[: len(whole) - 100_000])
    with pytest.raises(CheckpointError, match="truncated"):
        check_nemo(cut)


class NotATensor:
    """A class torch's weights-only unpickler does not allow."""


def test_pickled_objects_are_refused_without_advice_to_unpickle(v3_path, tmp_path):
    import torch

    evil = io.BytesIO()
    torch.save({"encoder.x": NotATensor()}, evil)
    target = tmp_path / "evil.nemo"
    with tarfile.open(v3_path) as archive, tarfile.open(target, "w") as out:
        for member in archive.getmembers():
            data = archive.extractfile(member).read() if member.isfile() else None
            if os.path.basename(member.name) == "model_weights.ckpt":
                data = evil.getvalue()
                member.size = len(data)
            out.addfile(member, io.BytesIO(data) if data is not None else None)
    with pytest.raises(CheckpointError, match="pickled Python objects") as caught:
        read_nemo(target)
    assert "weights_only" not in str(caught.value) and "trust" not in str(caught.value)
