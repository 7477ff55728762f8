"""Finding and reading `.nemo` checkpoints: a local file, or a Hugging Face repo id fetched into its cache.

A `.nemo` file is a tar (plain or gzip) holding `model_config.yaml`, `model_weights.ckpt` (a torch state
dict) and the SentencePiece tokenizer, which the config names as `nemo:<member>`.

The weights of a plain tar are read in place: a tar member is a byte range of the file, and `torch.save` writes a
zip whose records are stored uncompressed, so the file is memory-mapped and each tensor is a view of its record's
bytes (`MappedStateDict`). Nothing is copied, and a tensor's bytes are read from the file (or shared from the page
cache) only when the tensor is used, so a process that needs part of the model never reads the rest. `data.pkl`
is unpickled by torch's weights-only unpickler, so a checkpoint cannot run code. A compressed tar cannot be mapped:
its weights are decompressed and `torch.load(weights_only=True)`-ed from the member, with a warning.
"""

from __future__ import annotations

import io
import logging
import mmap
import os
import pickle
import struct
import sys
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
import yaml
from torch import _weights_only_unpickler

from .config import ModelConfig
from .errors import CheckpointError

logger = logging.getLogger("parakeet_core")

DEFAULT_CHECKPOINT = "nvidia/parakeet-tdt-0.6b-v3"

_CONFIG_MEMBER = "model_config.yaml"
_WEIGHTS_MEMBER = "model_weights.ckpt"
_COMPRESSION_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz"}
# A zip local file header: signature, version, flags, method, time, date, crc, sizes, name and extra lengths.
_ZIP_LOCAL_HEADER = struct.Struct("<4s5H3L2H")
_ZIP_LOCAL_SIGNATURE = b"PK\x03\x04"
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_MADV_WILLNEED = getattr(mmap, "MADV_WILLNEED", None)


@dataclass
class NemoCheckpoint:
    """What a `.nemo` file holds, parsed: the config, the weights, the tokenizer model bytes.

    `state_dict` is a `MappedStateDict` for a plain tar, a dict for a compressed one (or any mapping of tensors
    when built by hand); it is empty when read with `load_weights=False`."""

    path: Path
    raw_config: dict[str, Any]
    config: ModelConfig
    state_dict: Mapping[str, torch.Tensor]
    tokenizer_model: bytes


def _looks_like_repo_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.endswith(".nemo") and not source.startswith((".", "/", "~"))


def resolve_checkpoint(source: str | os.PathLike = DEFAULT_CHECKPOINT, *, cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the local path of a `.nemo` file given a path or a Hugging Face repo id."""
    text = os.fspath(source)
    local = Path(text).expanduser()
    if local.is_file():
        return local
    if local.is_dir():
        found = sorted(local.glob("*.nemo"))
        if len(found) == 1:
            return found[0]
        raise CheckpointError(f"checkpoint directory {local} holds {len(found)} .nemo files; pass one file")
    if not _looks_like_repo_id(text):
        raise CheckpointError(f"checkpoint not found: {text!r} is neither an existing .nemo file nor a Hugging Face repo id")
    return _download_from_hub(text, cache_dir)


def _download_from_hub(repo_id: str, cache_dir: str | os.PathLike | None) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.utils import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError as exc:  # pragma: no cover - huggingface_hub is a dependency
        raise CheckpointError("huggingface_hub is needed to fetch checkpoints by repo id") from exc
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
    hint = "download its .nemo file elsewhere and pass its local path"
    try:
        folder = snapshot_download(
            repo_id, allow_patterns=["*.nemo"], cache_dir=cache_dir, local_files_only=offline
        )
    except LocalEntryNotFoundError as exc:
        reason = "HF_HUB_OFFLINE is set and it is not in the cache" if offline else "the Hugging Face Hub is unreachable and it is not in the cache"
        raise CheckpointError(f"cannot fetch checkpoint {repo_id!r}: {reason}; {hint}") from exc
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot fetch checkpoint {repo_id!r}: {exc}; {hint}") from exc
    found = sorted(Path(folder).glob("*.nemo"))
    if not found:
        raise CheckpointError(f"Hugging Face repo {repo_id!r} has no .nemo file; {hint}")
    return found[0]


def _members_by_name(archive: tarfile.TarFile) -> dict[str, tarfile.TarInfo]:
    return {os.path.basename(m.name): m for m in archive.getmembers() if m.isfile()}


def _read_member(archive: tarfile.TarFile, members: dict[str, tarfile.TarInfo], name: str, path: Path):
    member = _member(members, name, path)
    handle = archive.extractfile(member)
    if handle is None:  # pragma: no cover - isfile() members always extract
        raise CheckpointError(f"{path}: cannot read {name}")
    return handle


def _member(members: dict[str, tarfile.TarInfo], name: str, path: Path) -> tarfile.TarInfo:
    member = members.get(name)
    if member is None:
        raise CheckpointError(f"{path}: not a NeMo checkpoint, it has no {name} (found: {sorted(members)})")
    return member


def _compression(path: Path) -> str | None:
    with open(path, "rb") as handle:
        start = handle.read(6)
    return next((name for magic, name in _COMPRESSION_MAGIC.items() if start.startswith(magic)), None)


class _ByteRange(io.RawIOBase):
    """A read-only file over `size` bytes of `buffer` from `start`, so that zipfile (or torch) reads a member of the
    mapped tar in place."""

    def __init__(self, buffer, start: int, size: int):
        super().__init__()
        self._buffer, self._start, self._size, self._position = buffer, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._position = base + offset
        return self._position

    def readinto(self, target) -> int:
        end = min(self._size, self._position + len(target))
        count = max(0, end - self._position)
        memoryview(target).cast("B")[:count] = self._buffer[self._start + self._position : self._start + end]
        self._position += count
        return count


@dataclass(frozen=True)
class _TensorLayout:
    """Where a tensor's values lie: its zip record (one storage), the storage's dtype and length, and the view."""

    record: str
    dtype: torch.dtype
    numel: int
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    requires_grad: bool


class _StoredRecords:
    """The records of a zip archive lying at `start` in a mapped file; each must be stored (uncompressed)."""

    def __init__(self, mapping: mmap.mmap, start: int, size: int, archive: zipfile.ZipFile):
        self._mapping, self._start, self._size = mapping, start, size
        self._infos = {info.filename: info for info in archive.infolist()}

    def data_range(self, name: str) -> tuple[int, int]:
        """(offset in the mapped file, length) of record `name`'s bytes; reads only its local header."""
        info = self._infos.get(name)
        if info is None:
            raise CheckpointError(f"its zip archive has no record {name}")
        if info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(f"record {name} is compressed; torch.save stores tensors uncompressed")
        header_at = self._start + info.header_offset
        if info.header_offset + _ZIP_LOCAL_HEADER.size > self._size:
            raise CheckpointError(f"record {name} lies outside its archive")
        fields = _ZIP_LOCAL_HEADER.unpack_from(self._mapping, header_at)
        if fields[0] != _ZIP_LOCAL_SIGNATURE:
            raise CheckpointError(f"record {name} has no zip header where the archive's directory puts it")
        data_at = info.header_offset + _ZIP_LOCAL_HEADER.size + fields[-2] + fields[-1]
        if data_at + info.file_size > self._size:
            raise CheckpointError(f"record {name} runs past the end of its archive")
        return self._start + data_at, info.file_size


class MappedStateDict(Mapping[str, Any]):
    """A state dict whose tensors are views of the memory-mapped `.nemo` file, each made on first access.

    Making a tensor reads only its zip record's header; its values are paged in from the file (shared through the
    page cache) when first used, and are never copied while the dtype and device stay. The mapping is private
    copy-on-write: writing into a tensor changes this process's copy of the page, never the file. `materialized`
    names the keys whose tensors have been made."""

    def __init__(self, mapping: mmap.mmap, records: _StoredRecords, entries: dict[str, Any], path: Path):
        self._mapping, self._records, self._entries, self._path = mapping, records, entries, path
        self._tensors: dict[str, torch.Tensor] = {}
        self._storages: dict[str, torch.Tensor] = {}

    def __getitem__(self, key: str) -> Any:
        value = self._entries[key]
        if not isinstance(value, _TensorLayout):
            return value
        tensor = self._tensors.get(key)
        if tensor is None:
            tensor = self._tensors[key] = self._make_tensor(key, value)
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"MappedStateDict({self._path.name}, {len(self)} entries, {len(self._tensors)} mapped)"

    @property
    def materialized(self) -> frozenset[str]:
        return frozenset(self._tensors)

    def _read_ahead(self, start: int, size: int) -> None:
        """Ask the kernel to start reading a record that is not in the page cache yet (one large read, in the
        background, instead of one small read per page fault on first use)."""
        if _MADV_WILLNEED is None or size == 0:
            return
        aligned = start - start % mmap.PAGESIZE
        try:
            self._mapping.madvise(_MADV_WILLNEED, aligned, start + size - aligned)
        except OSError:  # advice only
            pass

    def _make_tensor(self, key: str, layout: _TensorLayout) -> torch.Tensor:
        storage = self._storages.get(layout.record)
        try:
            if storage is None:
                start, size = self._records.data_range(layout.record)
                if size != layout.numel * layout.dtype.itemsize:
                    raise CheckpointError(f"record {layout.record} holds {size} bytes, its tensor needs "
                                          f"{layout.numel * layout.dtype.itemsize}")
                storage = (torch.frombuffer(self._mapping, dtype=layout.dtype, count=layout.numel, offset=start)
                           if layout.numel else torch.empty(0, dtype=layout.dtype))
                self._read_ahead(start, size)
                self._storages[layout.record] = storage
            tensor = storage.as_strided(layout.size, layout.stride, layout.offset)
        except CheckpointError as exc:
            raise CheckpointError(f"{self._path}: cannot load {key} from model_weights.ckpt: {exc}") from None
        except RuntimeError as exc:
            raise CheckpointError(f"{self._path}: cannot load {key} from model_weights.ckpt: {exc}") from exc
        tensor.requires_grad_(layout.requires_grad)
        return tensor


def _unpickle_layouts(data: bytes) -> tuple[Any, dict[int, tuple[str, torch.dtype, int]]]:
    """Unpickle torch's `data.pkl` with torch's weights-only unpickler, every storage a meta-device placeholder.

    Returns the object (its tensors on the meta device, holding no data) and, per placeholder storage (`_cdata`),
    the record that holds its bytes, its dtype and element count."""
    placeholders: dict[int, tuple[str, torch.dtype, int]] = {}
    by_record: dict[str, torch.storage.TypedStorage] = {}

    def persistent_load(saved_id):
        if not isinstance(saved_id, tuple) or len(saved_id) != 5:
            raise pickle.UnpicklingError(f"unexpected persistent id {saved_id!r}")
        _, storage_type, record, _location, numel = saved_id
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else getattr(storage_type, "dtype", None)
        if not isinstance(dtype, torch.dtype) or type(numel) is not int or numel < 0:
            raise pickle.UnpicklingError(f"unexpected storage {saved_id!r}")
        record = str(record)
        if record not in by_record:
            placeholder = torch.UntypedStorage(numel * dtype.itemsize, device="meta")
            placeholders[placeholder._cdata] = (record, dtype, numel)
            by_record[record] = torch.storage.TypedStorage(wrap_storage=placeholder, dtype=dtype, _internal=True)
        return by_record[record]

    unpickler = _weights_only_unpickler.Unpickler(io.BytesIO(data), encoding="utf-8")
    unpickler.persistent_load = persistent_load
    return unpickler.load(), placeholders


def _state_dict_of(loaded: Any, path: Path) -> dict:
    if isinstance(loaded, dict) and "state_dict" in loaded:
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{path}: model_weights.ckpt does not hold a state dict")
    return loaded


def _refuse_pickled_objects(path: Path) -> CheckpointError:
    return CheckpointError(
        f"{path}: model_weights.ckpt holds pickled Python objects besides tensors; refusing to load it "
        "(only plain tensor state dicts are read, so that a checkpoint cannot run code)")


def _load_copied(handle, path: Path) -> dict:
    """The weights through `torch.load(weights_only=True)`, which copies them into memory."""
    try:
        loaded = torch.load(handle, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise _refuse_pickled_objects(path) from None
    except (EOFError, tarfile.TarError, zlib.error):
        raise
    except Exception as exc:  # torch raises several unrelated types for corrupt files
        raise CheckpointError(f"{path}: cannot load model_weights.ckpt: {exc}") from exc
    return _state_dict_of(loaded, path)


def _map_weights(path: Path, member: tarfile.TarInfo) -> Mapping[str, torch.Tensor]:
    """The weights of a plain tar, read in place from the mapped file (see the module's docstring)."""
    size = os.path.getsize(path)
    start = member.offset_data
    if start + member.size > size:
        raise CheckpointError(f"{path}: truncated .nemo file: {_WEIGHTS_MEMBER} needs {start + member.size} "
                              f"bytes, the file has {size}")
    with open(path, "rb") as handle:
        try:
            mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        except (OSError, ValueError) as exc:
            logger.warning("%s cannot be memory-mapped (%s); loading its weights by copying them into memory",
                           path, exc)
            handle.seek(start)
            return _load_copied(io.BytesIO(handle.read(member.size)), path)
    member_file = _ByteRange(mapping, start, member.size)
    if mapping[start : start + 4] != _ZIP_LOCAL_SIGNATURE:
        logger.warning("%s: model_weights.ckpt is in torch's legacy (pre-1.6) format, which cannot be mapped; "
                       "loading it by copying it into memory", path)
        return _load_copied(member_file, path)
    try:
        with zipfile.ZipFile(member_file) as archive:
            names = archive.namelist()
            pickles = [name for name in names if name.endswith("/data.pkl") and name.count("/") == 1]
            if len(pickles) != 1:
                raise CheckpointError(f"{path}: model_weights.ckpt is not a torch.save archive (no single data.pkl)")
            prefix = pickles[0][: -len("data.pkl")]
            if prefix + "byteorder" in names and archive.read(prefix + "byteorder").decode() != sys.byteorder:
                logger.warning("%s: model_weights.ckpt was saved with the other byte order; loading it by copying "
                               "(torch swaps the bytes)", path)
                member_file.seek(0)
                return _load_copied(member_file, path)
            records = _StoredRecords(mapping, start, member.size, archive)
            loaded, placeholders = _unpickle_layouts(archive.read(pickles[0]))
    except pickle.UnpicklingError:
        raise _refuse_pickled_objects(path) from None
    except CheckpointError:
        raise
    except Exception as exc:  # zipfile and the unpickler raise several unrelated types for corrupt files
        raise CheckpointError(f"{path}: cannot load model_weights.ckpt: {exc}") from exc
    entries: dict[str, Any] = {}
    for key, value in _state_dict_of(loaded, path).items():
        if isinstance(value, torch.Tensor):
            placeholder = placeholders.get(value.untyped_storage()._cdata)
            if placeholder is None:
                raise CheckpointError(f"{path}: model_weights.ckpt holds {key} without data")
            record, dtype, numel = placeholder
            value = _TensorLayout(prefix + "data/" + record, dtype, numel, value.storage_offset(), tuple(value.shape),
                                  tuple(value.stride()), value.requires_grad)
        entries[key] = value
    return MappedStateDict(mapping, records, entries, path)


def _read_archive(archive: tarfile.TarFile, path: Path, load_weights: bool):
    members = _members_by_name(archive)
    try:
        raw_config = yaml.load(_read_member(archive, members, _CONFIG_MEMBER, path).read(), Loader=_YAML_LOADER)
    except yaml.YAMLError as exc:
        raise CheckpointError(f"{path}: model_config.yaml is not valid YAML: {exc}") from exc
    if not isinstance(raw_config, dict):
        raise CheckpointError(f"{path}: model_config.yaml does not hold a mapping")
    config = ModelConfig.parse(raw_config)
    tokenizer_name = os.path.basename(config.tokenizer_model.removeprefix("nemo:"))
    tokenizer_model = _read_member(archive, members, tokenizer_name, path).read()
    state_dict: Mapping[str, torch.Tensor] = {}
    if load_weights:
        compression = _compression(path)
        if compression is None:
            state_dict = _map_weights(path, _member(members, _WEIGHTS_MEMBER, path))
        else:
            logger.warning("%s is a %s-compressed .nemo, which cannot be memory-mapped: its weights are decompressed "
                           "and copied into memory (slower to load, and each process holds its own copy); "
                           "an uncompressed copy (e.g. `%s -dc %s > model.nemo`) loads in place",
                           path, compression, compression, path.name)
            state_dict = _load_copied(_read_member(archive, members, _WEIGHTS_MEMBER, path), path)
    return raw_config, config, tokenizer_model, state_dict


def read_nemo(path: str | os.PathLike, *, load_weights: bool = True) -> NemoCheckpoint:
    """Read a `.nemo` file: parse its config (validating the architecture), its weights and its tokenizer.

    From a plain (uncompressed) tar the weights are a `MappedStateDict`: views of the memory-mapped file, made on
    first access, so reading only some of them reads only their bytes."""
    path = Path(path)
    try:
        archive = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable .nemo (tar) file: {exc}") from exc
    try:
        with archive:
            raw_config, config, tokenizer_model, state_dict = _read_archive(archive, path, load_weights)
    except (EOFError, tarfile.TarError, zlib.error) as exc:
        raise CheckpointError(f"{path}: truncated or corrupt .nemo file ({type(exc).__name__}: {exc})") from exc
    return NemoCheckpoint(path, raw_config, config, state_dict, tokenizer_model)


def check_nemo(path: str | os.PathLike) -> NemoCheckpoint:
    """Read a `.nemo`'s config and tokenizer (validating them) and check its weights are all there, unloaded.

    For an uncompressed tar (NeMo's layout) the weights member must end within the file, which finds a truncated
    download in milliseconds; compressed archives are only checked as far as their headers."""
    checkpoint = read_nemo(path, load_weights=False)
    try:
        with tarfile.open(path, "r:") as archive:
            member = _members_by_name(archive).get(_WEIGHTS_MEMBER)
            if member is None:
                raise CheckpointError(f"{path}: not a NeMo checkpoint, it has no {_WEIGHTS_MEMBER}")
            size = os.path.getsize(path)
            if member.offset_data + member.size > size:
                raise CheckpointError(f"{path}: truncated .nemo file: {_WEIGHTS_MEMBER} needs "
                                      f"{member.offset_data + member.size} bytes, the file has {size}")
    except tarfile.ReadError:
        pass  # compressed
    return checkpoint


def sub_state_dict(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under `prefix.`, with the prefix removed (only those are read from a `MappedStateDict`)."""
    start = prefix + "."
    return {key[len(start):]: state_dict[key] for key in state_dict if key.startswith(start)}
