"""Loading the committed NeMo reference fixtures (made by tools/make_reference_fixtures.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import soundfile

FIXTURES = Path(__file__).parent / "fixtures"
AUDIO = FIXTURES / "audio"


@dataclass(frozen=True)
class Fixture:
    name: str
    checkpoint: Path
    reference: dict
    arrays: dict

    def clip_path(self, clip: str) -> Path:
        return FIXTURES / self.reference["clips"][clip]["audio"]

    def clip_samples(self, clip: str) -> np.ndarray:
        samples, rate = soundfile.read(self.clip_path(clip), dtype="float32")
        assert rate == 16000
        return samples


def fixture_names() -> list[str]:
    return sorted(p.parent.name for p in FIXTURES.glob("*/reference.json"))


@cache
def load_fixture(name: str) -> Fixture:
    folder = FIXTURES / name
    reference = json.loads((folder / "reference.json").read_text())
    with np.load(folder / reference["arrays"]) as arrays:
        loaded = {key: arrays[key] for key in arrays.files}
    return Fixture(name, folder / reference["checkpoint"], reference, loaded)


@cache
def load_model(name: str):
    """The fixture checkpoint loaded on the CPU in fp32 (shared across tests; read-only use)."""
    import parakeet_core

    return parakeet_core.from_pretrained(load_fixture(name).checkpoint, device="cpu")
