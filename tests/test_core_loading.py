"""Loading weights in place: the memory-mapped `.nemo`, per-stage reads, no meta tensors left, and safe unpickling."""

from __future__ import annotations

import io
import logging
import os
import tarfile

import pytest
import torch

import parakeet_core
from parakeet_core import CheckpointError, read_nemo
from parakeet_core.checkpoint import MappedStateDict, _StoredRecords
from parakeet_core.model import STAGES, ParakeetTDT
from core_fixtures import load_fixture

STAGE_PREFIXES = {"featurize": ("preprocessor.",), "encode": ("encoder.",), "decode": ("decoder.", "joint.")}


def _weights_bytes(path) -> bytes:
    with tarfile.open(path) as archive:
        member = next(m for m in archive.getmembers() if m.name.endswith("model_weights.ckpt"))
        return archive.extractfile(member).read()


def _with_weights(source, target, weights: bytes, *, gzip: bool = False):
    """A copy of the .nemo `source` whose model_weights.ckpt is `weights`."""
    with tarfile.open(source) as archive, tarfile.open(target, "w:gz" if gzip else "w") as out:
        for member in archive.getmembers():
            data = archive.extractfile(member).read() if member.isfile() else None
            if member.name.endswith("model_weights.ckpt"):
                data = weights
                member.size = len(data)
            out.addfile(member, io.BytesIO(data) if data is not None else None)
    return target


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1).view(torch.uint8)


@pytest.fixture(scope="module")
def v3_path():
    return load_fixture("v3_small").checkpoint


@pytest.mark.parametrize("name", ["v3_small", "v2_small"])
def test_mapped_state_dict_is_bit_identical_to_torch_load(name):
    path = load_fixture(name).checkpoint
    expected = torch.load(io.BytesIO(_weights_bytes(path)), map_location="cpu", weights_only=True)
    mapped = read_nemo(path).state_dict
    assert isinstance(mapped, MappedStateDict)
    assert list(mapped) == list(expected)
    for key, reference in expected.items():
        tensor = mapped[key]
        layout = (tensor.dtype, tensor.shape, tensor.stride(), tensor.storage_offset())
        assert layout == (reference.dtype, reference.shape, reference.stride(), reference.storage_offset()), key
        assert torch.equal(_bits(tensor), _bits(reference)), key
    assert mapped.materialized == frozenset(expected)


@pytest.mark.parametrize("stages", [("featurize",), ("encode",), ("decode",), ("featurize", "decode")])
def test_a_stage_reads_only_its_own_records(v3_path, monkeypatch, stages):
    records_read: list[str] = []
    data_range = _StoredRecords.data_range

    def spy(self, name):
        records_read.append(name)
        return data_range(self, name)

    monkeypatch.setattr(_StoredRecords, "data_range", spy)
    checkpoint = read_nemo(v3_path)
    assert records_read == [] and checkpoint.state_dict.materialized == frozenset()
    ParakeetTDT(checkpoint, device=torch.device("cpu"), dtype=torch.float32, stages=stages)
    prefixes = tuple(p for stage in stages for p in STAGE_PREFIXES[stage])
    wanted = {key for key in checkpoint.state_dict if key.startswith(prefixes)}
    assert checkpoint.state_dict.materialized == wanted
    assert len(records_read) == len(set(records_read)) == len(wanted)


def test_full_load_uses_the_mapped_tensors_without_copying(v3_path):
    checkpoint = read_nemo(v3_path)
    model = ParakeetTDT(checkpoint, device=torch.device("cpu"), dtype=torch.float32)
    state = checkpoint.state_dict
    assert model.encoder.layers[0].feed_forward1.linear1.weight.data_ptr() == \
        state["encoder.layers.0.feed_forward1.linear1.weight"].data_ptr()
    assert model.decoder.joint.enc.weight.data_ptr() == state["joint.enc.weight"].data_ptr()
    assert model.decoder.prediction.dec_rnn.lstm.weight_hh_l0.data_ptr() == \
        state["decoder.prediction.dec_rnn.lstm.weight_hh_l0"].data_ptr()


@pytest.mark.parametrize("stages", [STAGES, ("featurize",), ("encode",), ("decode",)])
def test_loaded_modules_hold_no_meta_tensors(v3_path, stages):
    model = parakeet_core.from_pretrained(v3_path, device="cpu", stages=stages)
    modules = [m for m in (model.preprocessor, model.encoder, model.decoder) if m is not None]
    assert len(modules) == len(stages)
    for module in modules:
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            assert tensor.device == torch.device("cpu"), name
    assert model.encoder is None or model.encoder.pos_enc.pe.shape == (1, 1, model.config.encoder.d_model)
    assert model.decoder is None or model.decoder.duration_values.tolist() == list(model.config.decoder.durations)


def test_a_buffer_the_checkpoint_does_not_fill_is_refused(v3_path, monkeypatch):
    from parakeet_core.encoder import RelativePositionalEncoding

    monkeypatch.setattr(RelativePositionalEncoding, "_table", lambda self, length: torch.zeros(1, 1, self.d_model))
    with pytest.raises(CheckpointError, match=r"'encoder' has tensors the checkpoint did not fill: \['pos_enc.pe'\]"):
        parakeet_core.from_pretrained(v3_path, device="cpu", stages=["encode"])


def test_writing_into_a_loaded_weight_never_reaches_the_file(v3_path, tmp_path):
    copy = tmp_path / "copy.nemo"
    copy.write_bytes(v3_path.read_bytes())
    model = parakeet_core.from_pretrained(copy, device="cpu", stages=["decode"])
    with torch.no_grad():
        model.decoder.joint.enc.weight.add_(1.0)
    assert copy.read_bytes() == v3_path.read_bytes()
    fresh = parakeet_core.from_pretrained(copy, device="cpu", stages=["decode"])
    assert torch.equal(fresh.decoder.joint.enc.weight + 1.0, model.decoder.joint.enc.weight)


def test_compressed_nemo_is_loaded_by_copying_with_a_warning(v3_path, tmp_path, caplog):
    path = _with_weights(v3_path, tmp_path / "model.nemo", _weights_bytes(v3_path), gzip=True)
    with caplog.at_level(logging.WARNING, logger="parakeet_core"):
        state = read_nemo(path).state_dict
    assert "gzip-compressed .nemo, which cannot be memory-mapped" in caplog.text
    mapped = read_nemo(v3_path).state_dict
    assert type(state) is not MappedStateDict and list(state) == list(mapped)
    assert all(torch.equal(_bits(state[key]), _bits(mapped[key])) for key in mapped)


def test_legacy_torch_format_is_loaded_by_copying_with_a_warning(v3_path, tmp_path, caplog):
    expected = read_nemo(v3_path).state_dict
    legacy = io.BytesIO()
    torch.save({key: expected[key].clone() for key in expected}, legacy, _use_new_zipfile_serialization=False)
    path = _with_weights(v3_path, tmp_path / "legacy.nemo", legacy.getvalue())
    with caplog.at_level(logging.WARNING, logger="parakeet_core"):
        state = read_nemo(path).state_dict
    assert "legacy (pre-1.6) format" in caplog.text
    assert all(torch.equal(_bits(state[key]), _bits(expected[key])) for key in expected)


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused_without_running_it(v3_path, tmp_path):
    marker = tmp_path / "ran"
    payload = _RunsCode()
    payload.marker = marker
    evil = io.BytesIO()
    torch.save({"encoder.pre_encode.out.weight": torch.zeros(2), "payload": payload}, evil)
    path = _with_weights(v3_path, tmp_path / "evil.nemo", evil.getvalue())
    with pytest.raises(CheckpointError, match="pickled Python objects besides tensors"):
        read_nemo(path)
    assert not marker.exists()


def test_corrupt_weights_archive_is_refused(v3_path, tmp_path):
    weights = bytearray(_weights_bytes(v3_path))
    weights[-22:] = bytes(22)  # the zip's end-of-central-directory record
    path = _with_weights(v3_path, tmp_path / "corrupt.nemo", bytes(weights))
    with pytest.raises(CheckpointError, match="cannot load model_weights.ckpt"):
        read_nemo(path)


def _mapped(path) -> bool:
    with open("/proc/self/maps") as maps:
        return any(line.rstrip().endswith(str(path)) for line in maps)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc/self/maps")
@pytest.mark.parametrize("dtype,stages,kept", [("fp32", STAGES, True), ("bf16", STAGES, False),
                                               ("fp32", ("featurize",), False)])
def test_the_file_stays_mapped_only_while_parameters_are_views_of_it(v3_path, tmp_path, dtype, stages, kept):
    import gc

    path = tmp_path / "model.nemo"
    path.write_bytes(v3_path.read_bytes())
    model = parakeet_core.from_pretrained(path, device="cpu", dtype=dtype, stages=stages)
    gc.collect()
    assert _mapped(path) == kept
    del model
    gc.collect()
    assert not _mapped(path)
