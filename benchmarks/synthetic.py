"""A full-size v3-config Parakeet TDT with seeded random weights, built in memory without NeMo.

For timing only (its transcripts are meaningless). The architecture is the released v3 one; the tokenizer and
the rest of the config come from the committed v3-like fixture. The joint's blank logit is biased so greedy
decoding emits about as many tokens per encoder frame as real speech does, which keeps decoding cost realistic.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import soundfile
import torch

from parakeet_core import ParakeetTDT, read_nemo
from parakeet_core.checkpoint import NemoCheckpoint
from parakeet_core.config import ModelConfig
from parakeet_core.decoder import TDTGreedyDecoder
from parakeet_core.encoder import ConformerEncoder
from parakeet_core.preprocessor import MelPreprocessor

REPO = Path(__file__).resolve().parents[1]
BASE_FIXTURE = REPO / "tests" / "fixtures" / "v3_small" / "v3_small.nemo"
SPEECH = REPO / "tests" / "fixtures" / "audio" / "long.wav"

V3_ENCODER = dict(n_layers=24, d_model=1024, n_heads=8, ff_expansion_factor=4, conv_kernel_size=9,
                  subsampling="dw_striding", subsampling_factor=8, subsampling_conv_channels=256,
                  xscaling=False, use_bias=False, untie_biases=True, pos_emb_max_len=5000)


def full_size_raw_config(base: dict) -> dict:
    config = copy.deepcopy(base)
    config["encoder"].update(V3_ENCODER)
    config["decoder"]["prednet"].update(pred_hidden=640, pred_rnn_layers=2)
    config["joint"]["jointnet"].update(joint_hidden=640, encoder_hidden=1024, pred_hidden=640)
    return config


def random_state_dict(config: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    preprocessor = MelPreprocessor(config.preprocessor)
    encoder = ConformerEncoder(config.encoder)
    decoder = TDTGreedyDecoder(config.encoder.d_model, config.decoder)
    with torch.no_grad():
        for layer in encoder.layers:
            layer.self_attn.pos_bias_u.normal_(0, 0.02)
            layer.self_attn.pos_bias_v.normal_(0, 0.02)
        decoder.prediction.embed.weight[config.decoder.blank_id].zero_()
    for prefix, module in (("preprocessor.featurizer", preprocessor), ("encoder", encoder),
                           ("decoder.prediction", decoder.prediction), ("joint", decoder.joint)):
        state.update({f"{prefix}.{k}": v for k, v in module.state_dict().items()})
    return state


def speech(seconds: float) -> np.ndarray:
    samples, rate = soundfile.read(SPEECH, dtype="float32")
    assert rate == 16000
    return samples[: int(seconds * rate)]


def encode(model: ParakeetTDT, samples: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    waveform = torch.from_numpy(samples)[None]
    return model.encode(*model.featurize(waveform, torch.tensor([len(samples)])))


def tokens_per_frame(model: ParakeetTDT, encoded: torch.Tensor, encoded_lengths: torch.Tensor) -> float:
    hypothesis = model.decode(encoded, encoded_lengths)[0]
    return len(hypothesis.token_ids) / int(encoded_lengths[0])


def set_blank_bias(model: ParakeetTDT, value: float) -> None:
    with torch.no_grad():
        model.decoder.joint.joint_net[2].bias[model.config.decoder.blank_id] = value


def favour_short_durations(model: ParakeetTDT, encoded: torch.Tensor) -> None:
    """Bias the duration logits towards 1-2 frames, as a trained model predicts for most tokens."""
    decoder = model.decoder
    durations = len(model.config.decoder.durations)
    with torch.no_grad():
        start, _, _ = decoder.start_state(1, model.dtype, model.device)
        logits = decoder.joint.logits(decoder.joint.enc(encoded[0]), start)[:, -durations:]
        scale = float(logits.float().std())
        preference = torch.tensor([0.0, 3.0, 2.0, 1.0, 0.0][:durations], device=model.device)
        decoder.joint.joint_net[2].bias[-durations:] += (preference * scale).to(model.dtype)


def tune_token_rate(model: ParakeetTDT, samples: np.ndarray, target: float = 0.4, steps: int = 14) -> tuple[float, float]:
    """Bisect the blank logit's bias until greedy decoding emits about `target` tokens per encoder frame."""
    low, high = -20.0, 20.0
    rate = float("nan")
    encoded = encode(model, samples)
    favour_short_durations(model, encoded[0])
    for _ in range(steps):
        middle = (low + high) / 2
        set_blank_bias(model, middle)
        rate = tokens_per_frame(model, *encoded)
        if rate > target:
            low = middle
        else:
            high = middle
    set_blank_bias(model, (low + high) / 2)
    return (low + high) / 2, tokens_per_frame(model, *encoded)


def build(device: str = "cpu", dtype: torch.dtype | None = None, seed: int = 0,
          target_tokens_per_frame: float = 0.4) -> tuple[ParakeetTDT, dict]:
    """The synthetic full-size model, tuned to a realistic token rate on 12 s of the fixture speech."""
    base = read_nemo(BASE_FIXTURE, load_weights=False)
    raw = full_size_raw_config(base.raw_config)
    config = ModelConfig.parse(raw)
    checkpoint = NemoCheckpoint(Path("synthetic-v3-full.nemo"), raw, config, random_state_dict(config, seed),
                                base.tokenizer_model)
    from parakeet_core.model import default_dtype

    device_ = torch.device(device)
    model = ParakeetTDT(checkpoint, device=device_, dtype=dtype or default_dtype(device_))
    bias, rate = tune_token_rate(model, speech(12.0), target_tokens_per_frame)
    parameters = sum(p.numel() for m in (model.encoder, model.decoder) for p in m.parameters())
    return model, {"blank_bias": bias, "tokens_per_frame": rate, "parameters": parameters, "raw_config": raw,
                   "tokenizer_model": base.tokenizer_model}


def save_nemo(model: ParakeetTDT, path: Path, raw_config: dict, tokenizer_model: bytes) -> Path:
    """Write the model (tuned biases included) as a `.nemo` tar in NeMo's layout, for serving benchmarks."""
    import io
    import tarfile

    import yaml

    config = copy.deepcopy(raw_config)
    config["tokenizer"]["model_path"] = "nemo:tokenizer.model"
    state: dict[str, torch.Tensor] = {}
    for prefix, module in (("preprocessor.featurizer", model.preprocessor), ("encoder", model.encoder),
                           ("decoder.prediction", model.decoder.prediction), ("joint", model.decoder.joint)):
        state.update({f"{prefix}.{k}": v.detach().float().cpu() for k, v in module.state_dict().items()})
    weights = io.BytesIO()
    torch.save(state, weights)
    members = {"model_config.yaml": yaml.safe_dump(config).encode(), "tokenizer.model": tokenizer_model,
               "model_weights.ckpt": weights.getvalue()}
    with tarfile.open(path, "w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path
