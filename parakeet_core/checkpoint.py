"""Finding and reading `.nemo` checkpoints: a local file, or a Hugging Face repo id fetched into its cache.

A `.nemo` file is a tar (plain or gzip) holding `model_config.yaml`, `model_weights.ckpt` (a torch state
dict) and the SentencePiece tokenizer, which the config names as `nemo:<member>`. The weights are read with
`torch.load(weights_only=True)` straight from the tar member: no extraction, no temporary files.
"""

from __future__ import annotations

import os
import pickle
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from .config import ModelConfig
from .errors import CheckpointError

DEFAULT_CHECKPOINT = "nvidia/parakeet-tdt-0.6b-v3"

_CONFIG_MEMBER = "model_config.yaml"
_WEIGHTS_MEMBER = "model_weights.ckpt"


@dataclass
class NemoCheckpoint:
    """What a `.nemo` file holds, parsed: the config, the weights, the tokenizer model bytes."""

    path: Path
    raw_config: dict[str, Any]
    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
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
    hint = (
        f"download {repo_id}'s .nemo file elsewhere and pass its local path "
        "(e.g. --checkpoint /models/parakeet-tdt-0.6b-v3.nemo)"
    )
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
    member = members.get(name)
    if member is None:
        raise CheckpointError(f"{path}: not a NeMo checkpoint, it has no {name} (found: {sorted(members)})")
    handle = archive.extractfile(member)
    if handle is None:  # pragma: no cover - isfile() members always extract
        raise CheckpointError(f"{path}: cannot read {name}")
    return handle


def _read_archive(archive: tarfile.TarFile, path: Path, load_weights: bool):
    members = _members_by_name(archive)
    try:
        raw_config = yaml.safe_load(_read_member(archive, members, _CONFIG_MEMBER, path).read())
    except yaml.YAMLError as exc:
        raise CheckpointError(f"{path}: model_config.yaml is not valid YAML: {exc}") from exc
    if not isinstance(raw_config, dict):
        raise CheckpointError(f"{path}: model_config.yaml does not hold a mapping")
    config = ModelConfig.parse(raw_config)
    tokenizer_name = os.path.basename(config.tokenizer_model.removeprefix("nemo:"))
    tokenizer_model = _read_member(archive, members, tokenizer_name, path).read()
    state_dict: dict[str, torch.Tensor] = {}
    if load_weights:
        weights = _read_member(archive, members, _WEIGHTS_MEMBER, path)
        try:
            state_dict = torch.load(weights, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(
                f"{path}: model_weights.ckpt holds pickled Python objects besides tensors; refusing to load it "
                "(only plain tensor state dicts are read, so that a checkpoint cannot run code)") from None
        except (EOFError, tarfile.TarError, zlib.error):
            raise
        except Exception as exc:  # torch raises several unrelated types for corrupt files
            raise CheckpointError(f"{path}: cannot load model_weights.ckpt: {exc}") from exc
        if isinstance(state_dict, dict) and "state_dict" in state_dict:
            state_dict = state_dict["state_dict"]
        if not isinstance(state_dict, dict):
            raise CheckpointError(f"{path}: model_weights.ckpt does not hold a state dict")
    return raw_config, config, tokenizer_model, state_dict


def read_nemo(path: str | os.PathLike, *, load_weights: bool = True) -> NemoCheckpoint:
    """Read a `.nemo` file: parse its config (validating the architecture), its weights and its tokenizer."""
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


def sub_state_dict(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under `prefix.`, with the prefix removed."""
    start = prefix + "."
    return {k[len(start):]: v for k, v in state_dict.items() if k.startswith(start)}
