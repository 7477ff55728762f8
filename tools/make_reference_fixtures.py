#!/usr/bin/env python
"""Build NeMo reference fixtures for parity tests of the pure-PyTorch Parakeet TDT implementation.

This tool runs ONLY in an optional, separate NeMo environment (the project itself never imports NeMo):

    python3.11 -m venv /work/nemo-env
    /work/nemo-env/bin/pip install torch==2.13.0
    /work/nemo-env/bin/pip install 'nemo-toolkit[asr]==3.0.0'
    # system tools: espeak-ng and sox (apt-get install espeak-ng sox)

Small fixtures (committed under tests/fixtures/):

    /work/nemo-env/bin/python tools/make_reference_fixtures.py            # everything
    /work/nemo-env/bin/python tools/make_reference_fixtures.py --only v2_small
    /work/nemo-env/bin/python tools/make_reference_fixtures.py --long       # long-audio references only

Full-size random v3-config checkpoint (NOT committed; 2.5 GB):

    /work/nemo-env/bin/python tools/make_reference_fixtures.py --full-size /work/cache/full-v3

What it does (see docs/fixtures.md for the file formats):
  1. writes deterministic test audio (espeak-ng + `sox -D`, seeded noise) to tests/fixtures/audio/;
  2. trains small SentencePiece BPE tokenizers on a generated multilingual-ish corpus;
  3. builds small NeMo EncDecRNNTBPEModel checkpoints of the Parakeet TDT architecture family, overwrites
     every parameter (and the BatchNorm statistics) from a seeded torch.Generator, and tunes the joint's
     blank / duration biases so greedy TDT decoding is not degenerate; saves them with NeMo's own save_to;
  4. runs NeMo (eval, CPU, fp32) on every clip and records features, encoder outputs, greedy TDT
     hypotheses (tokens, frames, durations, text) and word/segment timestamps in reference.json + .npz.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
AUDIO_DIR = FIXTURES / "audio"
SR = 16000
DURATIONS = [0, 1, 2, 3, 4]

# --------------------------------------------------------------------------------------------------
# Audio
# --------------------------------------------------------------------------------------------------

TEXT_EN = "The quick brown fox jumps over the lazy dog, then it runs away."
TEXT_DE = "Guten Morgen, wie geht es Ihnen heute?"
TEXT_LONG = (
    "Speech recognition turns spoken words into written text. "
    "A transducer model listens to short frames of audio and predicts small pieces of words. "
    "The encoder looks at the whole recording, while the prediction network remembers what was said before. "
    "Token and duration decoding lets the model skip frames when nothing new is heard, "
    "which makes it fast on long recordings. "
    "This paragraph is read by a simple voice synthesizer, so that the test is repeatable on every machine. "
    "It should last for roughly forty seconds, long enough to exercise long inputs, "
    "timestamps for many words, and several sentences. Thank you for listening, and good luck with the tests!"
)


def _espeak_to_wav16k(text: str, voice: str, out: Path, speed: int = 160) -> None:
    with tempfile.TemporaryDirectory() as td:
        raw = Path(td) / "raw.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(raw), text], check=True)
        # -D: no dither, so the resampled file is deterministic.
        subprocess.run(["sox", "-D", str(raw), "-r", str(SR), "-c", "1", "-b", "16", "-e", "signed-integer",
                        str(out)], check=True)


def _write_pcm16(path: Path, x: np.ndarray) -> None:
    import soundfile as sf

    x = np.clip(np.round(x * 32767.0), -32768, 32767).astype(np.int16)
    sf.write(str(path), x, SR, subtype="PCM_16")


def make_audio() -> dict:
    import soundfile as sf

    AUDIO_DIR.mkdir(parents=True, exist_ok=True)
    _espeak_to_wav16k(TEXT_EN, "en-us", AUDIO_DIR / "speech_en.wav")
    _espeak_to_wav16k(TEXT_DE, "de", AUDIO_DIR / "speech_de.wav", speed=125)
    _espeak_to_wav16k(TEXT_LONG, "en-us", AUDIO_DIR / "long.wav", speed=150)
    rng = np.random.default_rng(1234)
    _write_pcm16(AUDIO_DIR / "noise.wav", 0.1 * rng.standard_normal(2 * SR))
    _write_pcm16(AUDIO_DIR / "silence.wav", np.zeros(SR))
    en, _ = sf.read(str(AUDIO_DIR / "speech_en.wav"), dtype="int16")
    mid = len(en) // 3
    sf.write(str(AUDIO_DIR / "short.wav"), en[mid:mid + SR // 10], SR, subtype="PCM_16")
    info = {}
    for p in sorted(AUDIO_DIR.glob("*.wav")):
        x, sr = sf.read(str(p), dtype="float32")
        info[p.stem] = {"file": f"audio/{p.name}", "samples": int(len(x)), "seconds": len(x) / sr,
                        "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
    return info


CLIPS = ["speech_en", "speech_de", "noise", "silence", "short", "long"]
MEL_MAX_SECONDS = 5.5

# --------------------------------------------------------------------------------------------------
# Tokenizer corpus (generated, deterministic)
# --------------------------------------------------------------------------------------------------

SEED_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.", "Hello, how are you today?", "I'm fine, thank you!",
    "Guten Morgen, wie geht es Ihnen heute?", "Ich heiße Anna und wohne in München.", "Schöne Grüße aus Köln!",
    "Bonjour, où est la gare ?", "C'est très joli, n'est-ce pas ?", "Les élèves étudient à l'école.",
    "¿Dónde está la biblioteca?", "¡Qué día tan bonito!", "El niño come una manzana en el jardín.",
    "Buongiorno, come sta? Però è già tardi.", "A cidade é muito bonita, não é?", "Mañana será otro día.",
    "Dzień dobry, jak się masz?", "Příliš žluťoučký kůň úpěl ďábelské ódy.", "Hyvää päivää, kiitos!",
    "Det är en vacker dag i Stockholm.", "Het weer is mooi vandaag, zeker?", "Jó reggelt kívánok!",
    "Speech recognition turns spoken words into written text.", "Numbers like 42 and 1999 appear too.",
]

LANG_SYLLABLES = {
    "en": ("b c d f g h j k l m n p r s t v w y th sh ch wh", "a e i o u ea oo ou ai y", "n r s t l ng ck st nd"),
    "de": ("b d f g h k l m n p r s t w z sch st sp pf", "a e i o u ä ö ü ei au eu ie", "n r s t ch ng tz ß"),
    "fr": ("b c d f g j l m n p r s t v qu ch", "a e i o u é è ê à ou ai eau oi", "n r s t x"),
    "es": ("b c d f g j l m n ñ p r s t v ll ch", "a e i o u á é í ó ú ue ie", "n r s l z d"),
    "it": ("b c d f g l m n p r s t v z gl gn sc", "a e i o u à è ì ò ù ia io", "n r l"),
    "pt": ("b c d f g j l m n p r s t v lh nh ç", "a e i o u ã õ á é ê ó ão", "s r l m"),
    "pl": ("b c d f g h k l m n p r s t w z ł ś ż cz sz rz", "a e i o u y ą ę ó", "k m n ć ń ś ź ż"),
    "cs": ("b c č d ď f h k l m n ň p r ř s š t ť v z ž", "a e i o u y á é í ó ú ů ý ě", "k l n s t"),
}


def make_corpus(path: Path, n_sentences: int, langs: list[str], seed: int) -> None:
    rng = random.Random(seed)
    inv = {k: tuple(s.split() for s in v) for k, v in LANG_SYLLABLES.items() if k in langs}
    lines = [s for s in SEED_SENTENCES if langs != ["en"] or s.isascii()]
    for _ in range(n_sentences):
        on, vo, co = inv[rng.choice(langs)]
        words = []
        for _ in range(rng.randint(3, 12)):
            w = "".join(rng.choice(on) + rng.choice(vo) + (rng.choice(co) if rng.random() < 0.4 else "")
                        for _ in range(rng.choice([1, 1, 2, 2, 3, 4])))
            if rng.random() < 0.12:
                w = w.capitalize()
            if rng.random() < 0.1:
                w += rng.choice([",", ",", ";", ":"])
            words.append(w)
        s = " ".join(words)
        s = s[0].upper() + s[1:] + rng.choice([".", ".", ".", "?", "!"])
        lines.append(s)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def train_tokenizer(out_dir: Path, vocab_size: int, langs: list[str], n_sentences: int, seed: int) -> Path:
    from nemo.collections.common.tokenizers.sentencepiece_tokenizer import create_spt_model

    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = out_dir / "corpus.txt"
    make_corpus(corpus, n_sentences, langs, seed)
    spt_dir = out_dir / "spt"
    create_spt_model(str(corpus), vocab_size, sample_size=-1, do_lower_case=False, tokenizer_type="bpe",
                     output_dir=str(spt_dir))
    import sentencepiece as spm

    n = spm.SentencePieceProcessor(model_file=str(spt_dir / "tokenizer.model")).get_piece_size()
    if n != vocab_size:
        raise RuntimeError(f"tokenizer has {n} pieces, wanted {vocab_size}: enlarge the corpus")
    return spt_dir


# --------------------------------------------------------------------------------------------------
# Model config
# --------------------------------------------------------------------------------------------------

SPECS = {
    "v3_small": dict(
        seed=3, vocab=8192, langs=list(LANG_SYLLABLES), corpus=60000,
        n_layers=2, d_model=64, n_heads=4, ff=4, sub_ch=64, kernel=9, xscaling=False, use_bias=False,
        pred_hidden=48, pred_layers=2, joint_hidden=32,
    ),
    "v2_small": dict(
        seed=2, vocab=1024, langs=["en"], corpus=20000,
        n_layers=3, d_model=64, n_heads=2, ff=4, sub_ch=32, kernel=5, xscaling=True, use_bias=True,
        pred_hidden=80, pred_layers=2, joint_hidden=96,
    ),
    "full_v3": dict(
        seed=33, vocab=8192, langs=list(LANG_SYLLABLES), corpus=60000,
        n_layers=24, d_model=1024, n_heads=8, ff=4, sub_ch=256, kernel=9, xscaling=False, use_bias=False,
        pred_hidden=640, pred_layers=2, joint_hidden=640,
    ),
}


def make_config(spec: dict, tok_dir: Path):
    from omegaconf import OmegaConf

    cfg = {
        "sample_rate": SR,
        "model_defaults": {"enc_hidden": spec["d_model"], "pred_hidden": spec["pred_hidden"],
                           "joint_hidden": spec["joint_hidden"], "tdt_durations": DURATIONS,
                           "num_tdt_durations": len(DURATIONS)},
        "tokenizer": {"dir": str(tok_dir), "type": "bpe"},
        "validation_ds": {"manifest_filepath": None, "sample_rate": SR, "batch_size": 4, "shuffle": False,
                          "use_start_end_token": False, "num_workers": 0, "pin_memory": False},
        "preprocessor": {
            "_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
            "sample_rate": SR, "normalize": "per_feature", "window_size": 0.025, "window_stride": 0.01,
            "window": "hann", "features": 128, "n_fft": 512, "log": True, "frame_splicing": 1,
            "dither": 1.0e-05, "pad_to": 0, "pad_value": 0.0,
        },
        "spec_augment": {
            "_target_": "nemo.collections.asr.modules.SpectrogramAugmentation",
            "freq_masks": 2, "time_masks": 10, "freq_width": 27, "time_width": 0.05,
        },
        "encoder": {
            "_target_": "nemo.collections.asr.modules.ConformerEncoder",
            "feat_in": 128, "feat_out": -1, "n_layers": spec["n_layers"], "d_model": spec["d_model"],
            "use_bias": spec["use_bias"], "subsampling": "dw_striding", "subsampling_factor": 8,
            "subsampling_conv_channels": spec["sub_ch"], "causal_downsampling": False,
            "ff_expansion_factor": spec["ff"], "self_attention_model": "rel_pos", "n_heads": spec["n_heads"],
            "att_context_size": [-1, -1], "att_context_style": "regular", "xscaling": spec["xscaling"],
            "untie_biases": True, "pos_emb_max_len": 5000, "conv_kernel_size": spec["kernel"],
            "conv_norm_type": "batch_norm", "conv_context_size": None, "dropout": 0.1,
            "dropout_pre_encoder": 0.1, "dropout_emb": 0.0, "dropout_att": 0.1,
            "stochastic_depth_drop_prob": 0.0, "stochastic_depth_mode": "linear",
            "stochastic_depth_start_layer": 1,
        },
        "decoder": {
            "_target_": "nemo.collections.asr.modules.RNNTDecoder",
            "normalization_mode": None, "random_state_sampling": False, "blank_as_pad": True,
            "prednet": {"pred_hidden": spec["pred_hidden"], "pred_rnn_layers": spec["pred_layers"],
                        "t_max": None, "dropout": 0.2},
        },
        "joint": {
            "_target_": "nemo.collections.asr.modules.RNNTJoint",
            "log_softmax": None, "preserve_memory": False, "fuse_loss_wer": True, "fused_batch_size": 4,
            "jointnet": {"joint_hidden": spec["joint_hidden"], "activation": "relu", "dropout": 0.2},
            "num_extra_outputs": len(DURATIONS),
        },
        "decoding": {
            "model_type": "tdt", "strategy": "greedy_batch", "durations": DURATIONS,
            "greedy": {"max_symbols": 10},
            "beam": {"beam_size": 2, "return_best_hypothesis": False, "score_norm": True,
                     "tsd_max_sym_exp": 50, "alsd_max_target_len": 2.0},
        },
        "loss": {"loss_name": "tdt",
                 "tdt_kwargs": {"fastemit_lambda": 0.0, "clamp": -1.0, "durations": DURATIONS,
                                "sigma": 0.02, "omega": 0.1}},
        "optim": {"name": "adamw", "lr": 1e-3, "betas": [0.9, 0.98], "weight_decay": 1e-3},
    }
    return OmegaConf.create(cfg)


# --------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------


def overwrite_weights(model, seed: int, blank_bias: float, dur_bias: list[float]) -> None:
    """Overwrite every parameter and the BatchNorm statistics from a seeded generator."""
    import torch

    g = torch.Generator().manual_seed(seed)

    def randn(shape):
        return torch.randn(shape, generator=g, dtype=torch.float32)

    named_params = dict(model.named_parameters())
    bn_buffers = {}
    for mname, m in model.named_modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            bn_buffers[f"{mname}.running_mean"] = m.running_mean
            bn_buffers[f"{mname}.running_var"] = m.running_var
    modules = dict(model.named_modules())
    blank = model.decoder.blank_idx
    V1 = model.joint.num_classes_with_blank - model.joint.num_extra_outputs  # vocab + blank
    with torch.no_grad():
        for name in sorted(named_params):
            p = named_params[name]
            owner = modules[name.rsplit(".", 1)[0]] if "." in name else model
            leaf = name.rsplit(".", 1)[-1]
            if isinstance(owner, (torch.nn.LayerNorm, torch.nn.modules.batchnorm._BatchNorm)):
                val = 1.0 + 0.1 * randn(p.shape) if leaf == "weight" else 0.1 * randn(p.shape)
            elif leaf in ("pos_bias_u", "pos_bias_v"):
                val = 0.2 * randn(p.shape)
            elif isinstance(owner, torch.nn.Embedding):
                val = randn(p.shape)
                val[blank] = 0.0  # blank_as_pad: the padding row stays zero, as in a trained model
            elif isinstance(owner, torch.nn.LSTM):
                h = owner.hidden_size
                val = (2.0 * torch.rand(p.shape, generator=g) - 1.0) * (1.5 / h ** 0.5)
                if leaf.startswith("bias"):
                    val = 0.1 * randn(p.shape)
            elif leaf == "bias":
                val = 0.05 * randn(p.shape)
            else:
                fan_in = p[0].numel() if p.dim() > 1 else p.numel()
                if isinstance(owner, torch.nn.Conv1d) and owner.groups > 1:
                    fan_in = p.shape[-1]
                val = randn(p.shape) / fan_in ** 0.5
            p.copy_(val)
        for name in sorted(bn_buffers):
            b = bn_buffers[name]
            if name.endswith("running_mean"):
                b.copy_(0.1 * randn(b.shape))
            else:
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
        # Joint output layer: larger token logits, and tuned blank / duration biases.
        out = model.joint.joint_net[-1]
        # Centre each output row over the hidden units: the ReLU hidden vector has a large common positive
        # component, which would otherwise give every frame the same arg-max.
        out.weight.sub_(out.weight.mean(dim=1, keepdim=True)).mul_(3.0)
        out.bias.zero_()
        out.bias[:V1 - 1].copy_(0.1 * randn((V1 - 1,)))
        out.bias[V1 - 1] = blank_bias
        out.bias[V1:] = torch.tensor(dur_bias, dtype=torch.float32)


def calibrate_joint(model, signals: list[np.ndarray], seed: int, enc_gain: float = 1.0,
                    pred_gain: float = 0.7, whiten: bool = False) -> None:
    """Rescale and centre the joint's input projections, as training would, so the joint sees encoder and
    prediction-network variation of a useful size instead of the random network's constant offsets.
    whiten: first whiten the encoder output (PCA over the given clips' frames, eigenvalues floored at 1e-3 of
    the largest) inside the joint's encoder projection. A deep random encoder's output varies along few
    directions; without this the full-size model's joint sees almost the same input on every frame."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        encs = []
        for x in signals:
            _, _, enc, enc_len, _ = run_batch(model, [x], decode=False)
            encs.append(enc[0, :, : int(enc_len[0])].T)
        e = torch.cat(encs)  # [N, D]
        # prediction network outputs along random token sequences
        V = model.decoder.vocab_size
        y = torch.randint(0, V, (8, 40), generator=g)
        y = torch.cat([torch.full((8, 1), model.decoder.blank_idx), y], dim=1)
        pred, _ = model.decoder.predict(y, state=None, add_sos=False, batch_size=8)  # [B, U, H]
        pr = pred.reshape(-1, pred.shape[-1])
    with torch.no_grad():
        if whiten:
            ec = (e - e.mean(dim=0)).double()
            vals, vecs = torch.linalg.eigh(ec.T @ ec / ec.shape[0])
            vals = vals.clamp_min(vals.max() * 1e-3)
            white = (vecs * vals.rsqrt()) @ vecs.T
            model.joint.enc.weight.copy_((model.joint.enc.weight.double() @ white).float())
        for lin, data, gain in ((model.joint.enc, e, enc_gain), (model.joint.pred, pr, pred_gain)):
            w = lin.weight.clone()
            z = data @ w.T
            scale = gain / z.std(dim=0).clamp_min(1e-6)
            lin.weight.copy_(w * scale[:, None])
            lin.bias.copy_(-(z.mean(dim=0) * scale) + 0.1 * torch.randn(lin.bias.shape, generator=g))


def build_model(spec: dict, tok_dir: Path, blank_bias: float, dur_bias: list[float]):
    import torch
    from nemo.collections.asr.models import EncDecRNNTBPEModel

    torch.manual_seed(spec["seed"])
    cfg = make_config(spec, tok_dir)
    model = EncDecRNNTBPEModel(cfg=cfg)
    model.eval()
    overwrite_weights(model, spec["seed"] * 1000 + 7, blank_bias, dur_bias)
    return model


# --------------------------------------------------------------------------------------------------
# Running NeMo
# --------------------------------------------------------------------------------------------------


def read_clip(name: str) -> np.ndarray:
    import soundfile as sf

    x, sr = sf.read(str(AUDIO_DIR / f"{name}.wav"), dtype="float32")
    assert sr == SR and x.ndim == 1
    return x


def set_timestamps(model, on: bool = True) -> None:
    from omegaconf import open_dict

    with open_dict(model.cfg.decoding):
        model.cfg.decoding.compute_timestamps = on
    model.change_decoding_strategy(model.cfg.decoding, verbose=False)


def run_batch(model, signals: list[np.ndarray], decode: bool = True):
    """preprocessor -> encoder -> model.decoding on exactly the given samples (zero-padded batch)."""
    import torch
    from nemo.collections.asr.parts.utils.timestamp_utils import process_timestamp_outputs

    model.eval()
    lens = torch.tensor([len(s) for s in signals], dtype=torch.int64)
    x = torch.zeros(len(signals), int(lens.max()), dtype=torch.float32)
    for i, s in enumerate(signals):
        x[i, :len(s)] = torch.from_numpy(s)
    with torch.inference_mode():
        feats, feat_len = model.preprocessor(input_signal=x, length=lens)
        enc, enc_len = model.encoder(audio_signal=feats, length=feat_len)
        if not decode:
            return feats, feat_len, enc, enc_len, None
        hyps = model.decoding.rnnt_decoder_predictions_tensor(
            encoder_output=enc, encoded_lengths=enc_len, return_hypotheses=True)
        hyps = process_timestamp_outputs(hyps, model.encoder.subsampling_factor,
                                         model.cfg.preprocessor.window_stride)
    return feats, feat_len, enc, enc_len, hyps


def _ts_list(items, keys):
    out = []
    for it in items:
        out.append({k: (float(it[k]) if isinstance(it[k], (float, np.floating)) else
                        int(it[k]) if isinstance(it[k], (int, np.integer)) else it[k]) for k in keys if k in it})
    return out


def hyp_record(hyp) -> dict:
    import torch

    tokens = [int(t) for t in (hyp.y_sequence.tolist() if torch.is_tensor(hyp.y_sequence) else hyp.y_sequence)]
    ts = hyp.timestamp
    frames = ts["timestep"] if isinstance(ts, dict) else ts
    frames = [int(t) for t in (frames.tolist() if torch.is_tensor(frames) else frames)]
    durs = hyp.token_duration
    durs = [int(d) for d in (durs.tolist() if torch.is_tensor(durs) else (durs or []))]
    rec = {"tokens": tokens, "frames": frames, "durations": durs, "text": hyp.text}
    if isinstance(ts, dict):
        rec["words"] = _ts_list(ts.get("word", []), ["word", "start_offset", "end_offset", "start", "end"])
        rec["segments"] = _ts_list(ts.get("segment", []),
                                   ["segment", "start_offset", "end_offset", "start", "end"])
        rec["chars"] = _ts_list(ts.get("char", []), ["char", "start_offset", "end_offset", "start", "end"])
    return rec


def decode_stats(recs: dict, enc_lens: dict) -> dict:
    out = {}
    for k, r in recs.items():
        T = enc_lens[k]
        fr = r["frames"]
        per_frame = {}
        for f in fr:
            per_frame[f] = per_frame.get(f, 0) + 1
        covered = set()
        for f, d in zip(fr, r["durations"]):
            covered.update(range(f, min(f + d, T)))
        out[k] = {"tokens": len(r["tokens"]), "encoder_frames": T,
                  "tokens_per_frame": round(len(r["tokens"]) / max(T, 1), 3),
                  "zero_durations": sum(1 for d in r["durations"] if d == 0),
                  "max_symbols_on_one_frame": max(per_frame.values()) if per_frame else 0,
                  "distinct_tokens": len(set(r["tokens"])),
                  # frames no token's [frame, frame + duration) span covers: skipped by blanks (or by the
                  # forced advance after max_symbols)
                  "frames_not_covered_by_tokens": T - len(covered)}
    return out


def encode_clips(model, clips: dict[str, np.ndarray]) -> dict:
    """Encoder outputs of each clip alone (they do not depend on the joint biases being tuned)."""
    out = {}
    for k, x in clips.items():
        _, _, enc, enc_len, _ = run_batch(model, [x], decode=False)
        out[k] = (enc, enc_len)
    return out


def quick_stats(model, encoded: dict) -> dict:
    import torch

    recs, lens = {}, {}
    with torch.inference_mode():
        for k, (enc, enc_len) in encoded.items():
            hyps = model.decoding.rnnt_decoder_predictions_tensor(
                encoder_output=enc, encoded_lengths=enc_len, return_hypotheses=True)
            recs[k] = hyp_record(hyps[0])
            lens[k] = int(enc_len[0])
    return decode_stats(recs, lens)


def tune_biases(model, clips: dict, target: float = 0.45, zero_frac=(0.05, 0.3),
                speech=("speech_en", "speech_de", "long"), base_dur=(1.2, 0.6, 0.0, -0.5),
                min_blank_frac: float = 0.0, multi_on_every_clip: bool = True):
    """Search the zero-duration bias and the blank bias so that greedy decoding of speech gives about `target`
    tokens per encoder frame, some zero durations (a fraction `zero_frac` of tokens) and frames with several
    symbols. Returns (blank_bias, duration_biases, stats)."""
    import torch

    out = model.joint.joint_net[-1]
    V1 = model.joint.num_classes_with_blank - model.joint.num_extra_outputs
    base_dur = list(base_dur)
    sp = encode_clips(model, {k: clips[k] for k in speech})
    zero_bias, tried, fallback = 0.0, set(), None
    while zero_bias not in tried and len(tried) < 8:
        tried.add(zero_bias)
        lo, hi = -10.0, 20.0
        for _ in range(10):
            b = (lo + hi) / 2
            with torch.no_grad():
                out.bias[V1 - 1] = b
                out.bias[V1:] = torch.tensor([zero_bias] + base_dur)
            t = time.time()
            st = quick_stats(model, sp)
            ntok = sum(s["tokens"] for s in st.values())
            tpf = ntok / sum(s["encoder_frames"] for s in st.values())
            zf = sum(s["zero_durations"] for s in st.values()) / max(ntok, 1)
            multi = (min if multi_on_every_clip else max)(s["max_symbols_on_one_frame"] for s in st.values())
            bf = (sum(s["frames_not_covered_by_tokens"] for s in st.values())
                  / sum(s["encoder_frames"] for s in st.values()))
            print(f"  durations bias {base_dur} zero_bias={zero_bias:+.2f} blank_bias={b:+.4f} "
                  f"tokens/frame={tpf:.3f} zero_dur_frac={zf:.3f} blank_frame_frac={bf:.3f} "
                  f"max symbols/frame={multi} ({time.time() - t:.1f} s)", flush=True)
            if abs(tpf - target) <= 0.04:
                break
            if tpf > target:
                lo = b
            else:
                hi = b
        if abs(tpf - target) <= 0.08 and zero_frac[0] <= zf <= zero_frac[1] and multi >= 2 and bf >= min_blank_frac:
            return b, [zero_bias] + base_dur, st
        if bf < min_blank_frac:
            break  # durations too long for blanks to matter: the caller shortens them
        if abs(tpf - target) <= 0.08 and zf > 0 and bf >= min_blank_frac and max(s["max_symbols_on_one_frame"] for s in st.values()) >= 2:
            fallback = (b, [zero_bias] + base_dur, st)
        # more zero durations (and multi-symbol frames) with a larger duration-0 bias, fewer with a smaller one
        zero_bias += -0.5 if zf > zero_frac[1] else 0.5
    if fallback is None:
        raise RuntimeError("could not tune the joint biases")
    print("  WARNING: no setting met every criterion; using the last one near the target rate", flush=True)
    b, dur, st = fallback
    with torch.no_grad():
        out.bias[V1 - 1] = b
        out.bias[V1:] = torch.tensor(dur)
    return fallback


# --------------------------------------------------------------------------------------------------
# Fixture writing
# --------------------------------------------------------------------------------------------------


def _versions() -> dict:
    import nemo
    import torch

    return {"nemo": nemo.__version__, "torch": torch.__version__, "numpy": np.__version__}


def decoding_info(model) -> dict:
    dec = model.decoding
    inner = dec.decoding
    comp = getattr(inner, "decoding_computer", None)
    return {
        "decoding_class": f"{type(dec).__module__}.{type(dec).__name__}",
        "greedy_class": f"{type(inner).__module__}.{type(inner).__name__}",
        "computer_class": None if comp is None else f"{type(comp).__module__}.{type(comp).__name__}",
        "greedy_method": getattr(getattr(inner, "_greedy_decode", None), "__name__", None),
        "strategy": model.cfg.decoding.strategy,
        "loop_labels": bool(model.cfg.decoding.greedy.get("loop_labels", True)),
        "max_symbols": int(model.cfg.decoding.greedy.max_symbols),
        "durations": list(model.cfg.decoding.durations),
        "blank_id": int(model.decoder.blank_idx),
        "subsampling_factor": int(model.encoder.subsampling_factor),
        "window_stride": float(model.cfg.preprocessor.window_stride),
        "segment_seperators": list(dec.segment_seperators) if hasattr(dec, "segment_seperators") else None,
        "word_seperator": getattr(dec, "word_seperator", None),
        "supported_punctuation": sorted(getattr(dec, "supported_punctuation", []) or []),
    }


def make_reference(model, nemo_path: Path, out_dir: Path, extra: dict) -> dict:
    import torch

    clips = {k: read_clip(k) for k in CLIPS}
    model.eval()
    set_timestamps(model, True)
    arrays = {}
    per_clip = {}
    enc_single = {}
    recs, lens = {}, {}
    for k, x in clips.items():
        feats, feat_len, enc, enc_len, hyps = run_batch(model, [x])
        fl, el = int(feat_len[0]), int(enc_len[0])
        if len(x) / SR <= MEL_MAX_SECONDS:
            arrays[f"mel.{k}"] = feats[0].numpy().astype(np.float32)
        arrays[f"encoder.{k}"] = enc[0].T.numpy().astype(np.float32)  # [T'', D]
        enc_single[k] = enc[0, :, :el].T.clone()
        rec = hyp_record(hyps[0])
        per_clip[k] = {
            "audio": f"audio/{k}.wav", "samples": int(len(x)),
            "feature_length": fl, "feature_frames": int(feats.shape[-1]),
            "mel_key": f"mel.{k}" if f"mel.{k}" in arrays else None,
            "encoder_length": el, "encoder_frames": int(enc.shape[-1]), "encoder_key": f"encoder.{k}",
            **rec,
        }
        recs[k], lens[k] = rec, el

    # Mixed-length batch of every clip, zero-padded.
    names = list(clips)
    feats, feat_len, enc, enc_len, hyps = run_batch(model, [clips[k] for k in names])
    batch = {"order": names, "lengths": [int(len(clips[k])) for k in names], "clips": {}}
    for i, k in enumerate(names):
        el = int(enc_len[i])
        diff = (enc[i, :, :el].T - enc_single[k]).abs().max().item()
        rec = hyp_record(hyps[i])
        batch["clips"][k] = {"feature_length": int(feat_len[i]), "encoder_length": el,
                             "encoder_max_abs_diff_vs_single": diff,
                             "same_tokens_as_single": rec["tokens"] == per_clip[k]["tokens"], **rec}

    # transcribe() on the file paths (batch size 1) must give the same texts.
    paths = [str(AUDIO_DIR / f"{k}.wav") for k in names]
    out = model.transcribe(paths, batch_size=1, timestamps=True, verbose=False)
    out = out[0] if isinstance(out, tuple) else out
    model.eval()
    transcribe = {}
    for k, h in zip(names, out):
        transcribe[k] = {"text": h.text, "equal_to_manual": h.text == per_clip[k]["text"],
                         "same_tokens": [int(t) for t in h.y_sequence.tolist()] == per_clip[k]["tokens"],
                         "same_words": _ts_list(h.timestamp.get("word", []), ["word", "start_offset", "end_offset",
                                                                              "start", "end"])
                         == per_clip[k]["words"]}
        if not transcribe[k]["equal_to_manual"]:
            print(f"WARNING: transcribe() text differs for {k}: {h.text!r} vs {per_clip[k]['text']!r}")

    ref = {
        "format": 1,
        "checkpoint": nemo_path.name,
        "versions": _versions(),
        "decoding": decoding_info(model),
        "preprocessor": {k: (list(v) if not isinstance(v, (str, int, float, bool, type(None))) else v)
                         for k, v in model.cfg.preprocessor.items()},
        "arrays": "reference.npz",
        "stats": decode_stats(recs, lens),
        **extra,
        "clips": per_clip,
        "batch": batch,
        "transcribe": transcribe,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out_dir / "reference.npz", **arrays)
    with open(out_dir / "reference.json", "w", encoding="utf-8") as f:
        json.dump(ref, f, indent=1, ensure_ascii=False)
    return ref


def save_nemo(model, path: Path) -> None:
    """NeMo's own save_to; the tokenizer is referenced only as nemo:<file> artifacts, so the scratch
    directory it was trained in is not recorded."""
    from omegaconf import open_dict

    with open_dict(model.cfg):
        model.cfg.tokenizer.dir = None
    model.save_to(str(path))


def build_small(name: str, work: Path) -> None:
    import torch
    from nemo.collections.asr.models import EncDecRNNTBPEModel

    spec = SPECS[name]
    t0 = time.time()
    tok = train_tokenizer(work / name / "tok", spec["vocab"], spec["langs"], spec["corpus"], spec["seed"])
    model = build_model(spec, tok, 0.0, [0.0] * len(DURATIONS))
    clips = {k: read_clip(k) for k in CLIPS}
    calibrate_joint(model, [clips["speech_en"], clips["speech_de"]], spec["seed"] * 1000 + 11)
    set_timestamps(model, True)
    blank_bias, dur_bias, _ = tune_biases(model, clips)
    out_dir = FIXTURES / name
    out_dir.mkdir(parents=True, exist_ok=True)
    nemo_path = out_dir / f"{name}.nemo"
    save_nemo(model, nemo_path)
    del model
    # Reference outputs come from the checkpoint as restored, exactly as a user would load it.
    model = EncDecRNNTBPEModel.restore_from(str(nemo_path), map_location="cpu")
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    extra = {"model": {"name": name, "spec": {k: v for k, v in spec.items() if k not in ("langs",)},
                       "languages_in_tokenizer_corpus": spec["langs"], "parameters": n_params,
                       "nemo_bytes": nemo_path.stat().st_size, "joint_blank_bias": blank_bias,
                       "joint_duration_biases": dur_bias}}
    ref = make_reference(model, nemo_path, out_dir, extra)
    print(f"{name}: {n_params} params, {nemo_path.stat().st_size} bytes, {time.time() - t0:.0f} s")
    for k, s in ref["stats"].items():
        print(f"  {k:10s} {s}")
    print("  batch max abs diff:", {k: v["encoder_max_abs_diff_vs_single"] for k, v in ref["batch"]["clips"].items()})
    print("  transcribe equal:", {k: v["equal_to_manual"] for k, v in ref["transcribe"].items()})


# --------------------------------------------------------------------------------------------------
# Long audio: NeMo's full and local attention (`--long`)
# --------------------------------------------------------------------------------------------------

# Attention settings NeMo is run with, as `change_attention_model` takes them (None: the checkpoint's full rel_pos).
LONG_MODES = {"full": None, "local256": [256, 256], "local128": [128, 128]}
# Full attention is quadratic: only the clip past 5,000 encoder frames is run with it.
LONG_FULL_CLIPS = ["long_8min"]
LONG_BATCH = ["long_16min", "long_8min", "speech_en", "short"]
ENCODER_SLICE = 24


def _long_model(nemo_path: Path, context):
    from nemo.collections.asr.models import EncDecRNNTBPEModel

    import torch

    model = EncDecRNNTBPEModel.restore_from(str(nemo_path), map_location="cpu")
    if context is not None:
        model.change_attention_model("rel_pos_local_attn", list(context))
        if not model.cfg.encoder.get("use_bias", True):
            # NeMo 3.0's change_attention_model builds the new attention modules with use_bias=True whatever the
            # config says and loads the old weights with strict=False: on a use_bias=false checkpoint (the released
            # v3) linear_q/k/v/out keep nn.Linear's random initial biases, different in every process. The
            # checkpoint has no attention biases, so they are zero here.
            with torch.no_grad():
                for layer in model.encoder.layers:
                    for linear in (layer.self_attn.linear_q, layer.self_attn.linear_k, layer.self_attn.linear_v,
                                   layer.self_attn.linear_out):
                        if linear.bias is not None:
                            linear.bias.zero_()
    model.change_subsampling_conv_chunking_factor(1)
    model.eval()
    set_timestamps(model, True)
    return model


def _encoder_slices(enc, length: int) -> dict:
    """First, middle and last ENCODER_SLICE valid frames of one clip's encoder output [D, T]."""
    middle = max(0, length // 2 - ENCODER_SLICE // 2)
    starts = {"start": 0, "middle": middle, "end": max(0, length - ENCODER_SLICE)}
    return {k: (v, enc[:, v : v + ENCODER_SLICE].T.numpy().astype(np.float32)) for k, v in starts.items()}


def _long_record(hyp) -> dict:
    """hyp_record without the per-token `chars` entries (tokens, frames and durations already say it all)."""
    record = hyp_record(hyp)
    record.pop("chars", None)
    return record


def build_long(name: str) -> None:
    """Long-clip references of a committed small checkpoint: each clip alone and the mixed batch, per mode."""
    sys.path.insert(0, str(REPO))
    from tools.long_audio import LONG_CLIPS, long_clip, sha256

    t0 = time.time()
    nemo_path = FIXTURES / name / f"{name}.nemo"
    signals = {k: long_clip(k) for k in LONG_CLIPS}
    signals.update({k: read_clip(k) for k in ("speech_en", "short")})
    arrays, modes = {}, {}
    for mode, context in LONG_MODES.items():
        model = _long_model(nemo_path, context)
        alone = {}
        for clip in (LONG_FULL_CLIPS if context is None else list(LONG_CLIPS)):
            _, feat_len, enc, enc_len, hyps = run_batch(model, [signals[clip]])
            el = int(enc_len[0])
            slices = {}
            for where, (start, values) in _encoder_slices(enc[0], el).items():
                key = f"encoder.{mode}.{clip}.{where}"
                arrays[key] = values
                slices[where] = {"key": key, "first_frame": start}
            alone[clip] = {"samples": int(len(signals[clip])), "feature_length": int(feat_len[0]),
                           "encoder_length": el, "encoder_slices": slices, **_long_record(hyps[0])}
            print(f"  {name} {mode} {clip}: {el} frames, {len(alone[clip]['tokens'])} tokens, {time.time() - t0:.0f} s")
        record = {"context": context, "clips": alone}
        if context is not None:
            _, _, _, enc_len, hyps = run_batch(model, [signals[k] for k in LONG_BATCH])
            record["batch"] = {"order": LONG_BATCH, "clips": {
                k: {"encoder_length": int(enc_len[i]), **_long_record(hyps[i])} for i, k in enumerate(LONG_BATCH)}}
            for k in LONG_BATCH:
                if k in alone and record["batch"]["clips"][k]["tokens"] != alone[k]["tokens"]:
                    print(f"WARNING: NeMo's batched tokens differ from alone for {k} ({mode})")
        modes[mode] = record
        del model
    reference = {
        "format": 1,
        "checkpoint": nemo_path.name,
        "versions": _versions(),
        "arrays": "long_reference.npz",
        "audio": {k: {"recipe": "tools/long_audio.py", "seconds": LONG_CLIPS[k], "samples": int(len(signals[k])),
                      "sha256": sha256(signals[k])} for k in LONG_CLIPS},
        "subsampling_conv_chunking_factor": 1,
        "modes": modes,
    }
    out_dir = FIXTURES / name
    np.savez_compressed(out_dir / "long_reference.npz", **arrays)
    # Thousands of tokens per clip: compact and gzipped (mtime 0, so reruns give the same bytes).
    with gzip.GzipFile(out_dir / "long_reference.json.gz", "wb", mtime=0) as f:
        f.write(json.dumps(reference, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
    print(f"{name}: long references in {time.time() - t0:.0f} s")


HF_REPO = "nvidia/parakeet-tdt-0.6b-v3"
HF_FILE = "parakeet-tdt-0.6b-v3.nemo"


def make_hf_cache(nemo_path: Path, cache_dir: Path, repo_id: str = HF_REPO) -> Path:
    """Lay `nemo_path` out as the Hugging Face hub cache does after a download: blobs/<sha256> (a hard link to
    the file, or a symlink where hard links are impossible), snapshots/<commit>/<file> -> ../../blobs/<sha256>,
    refs/main = <commit>. `hf_hub_download` / `snapshot_download` then find it offline."""
    h = hashlib.sha256()
    with open(nemo_path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    blob_id = h.hexdigest()
    commit = hashlib.sha1(f"{repo_id}:{blob_id}".encode()).hexdigest()  # any 40-hex revision works offline
    repo_dir = cache_dir / ("models--" + repo_id.replace("/", "--"))
    if repo_dir.exists():
        shutil.rmtree(repo_dir)
    (repo_dir / "blobs").mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True)
    blob = repo_dir / "blobs" / blob_id
    try:
        os.link(nemo_path, blob)
    except OSError:
        blob.symlink_to(nemo_path.resolve())
    (snap / nemo_path.name).symlink_to(Path("..") / ".." / "blobs" / blob_id)
    (repo_dir / "refs" / "main").write_text(commit)
    return snap / nemo_path.name


def build_full(out_dir: Path, work: Path) -> None:
    import torch
    from nemo.collections.asr.models import EncDecRNNTBPEModel

    out_dir.mkdir(parents=True, exist_ok=True)
    spec = SPECS["full_v3"]
    t0 = time.time()
    if not (AUDIO_DIR / "speech_en.wav").exists():
        make_audio()
    tok = train_tokenizer(work / "full_v3" / "tok", spec["vocab"], spec["langs"], spec["corpus"], spec["seed"])
    model = build_model(spec, tok, 0.0, [0.0] * len(DURATIONS))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"built full-size model: {n_params} parameters, {time.time() - t0:.0f} s", flush=True)
    clips = {k: read_clip(k) for k in CLIPS}
    # The deep random encoder's output varies along few directions (5 principal components hold 95 % of its
    # variance on speech): whiten it inside the joint, and keep the prediction network's share small, or the
    # decoder falls into all-token or all-blank regimes depending on its state.
    calibrate_joint(model, [clips["speech_en"], clips["speech_de"], clips["long"]], spec["seed"] * 1000 + 11,
                    pred_gain=0.15, whiten=True)
    set_timestamps(model, True)
    for shift in (1.5, 3.0, 4.5, 6.0):
        try:
            blank_bias, dur_bias, st = tune_biases(
                model, clips, target=0.4, base_dur=(1.2, 0.6 - shift, -shift, -0.5 - shift),
                min_blank_frac=0.2, multi_on_every_clip=False)
            break
        except RuntimeError as exc:
            print(f"  shift {shift}: {exc}", flush=True)
    else:
        raise RuntimeError("could not tune the full-size joint biases")
    print(f"tuned in {time.time() - t0:.0f} s: blank bias {blank_bias}, duration biases {dur_bias}", flush=True)
    nemo_path = out_dir / HF_FILE
    save_nemo(model, nemo_path)
    print(f"saved {nemo_path} ({nemo_path.stat().st_size} bytes), {time.time() - t0:.0f} s", flush=True)
    del model
    snap_file = make_hf_cache(nemo_path, out_dir / "hf-cache")
    print(f"hub cache: {snap_file}", flush=True)
    model = EncDecRNNTBPEModel.restore_from(str(nemo_path), map_location="cpu")
    model.eval()
    extra = {"model": {"name": "full_v3", "spec": {k: v for k, v in spec.items() if k not in ("langs",)},
                       "parameters": n_params, "nemo_bytes": nemo_path.stat().st_size,
                       "joint_blank_bias": blank_bias, "joint_duration_biases": dur_bias},
             "hf_cache": {"HF_HUB_CACHE": str(out_dir / "hf-cache"), "repo_id": HF_REPO,
                          "snapshot_file": str(snap_file)}}
    ref = make_reference(model, nemo_path, out_dir / "reference", extra)
    speech = ("speech_en", "speech_de", "long")
    ntok = sum(ref["stats"][k]["tokens"] for k in speech)
    nfr = sum(ref["stats"][k]["encoder_frames"] for k in speech)
    print(f"full-size: {n_params} params, {time.time() - t0:.0f} s; speech tokens per encoder frame "
          f"{ntok / nfr:.3f}")
    for k, s in ref["stats"].items():
        print(f"  {k:10s} {s}")
    print("  transcribe equal:", {k: v["equal_to_manual"] for k, v in ref["transcribe"].items()})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=None, help="small fixtures to build (default: all)")
    ap.add_argument("--full-size", metavar="OUT_DIR", default=None,
                    help="build the full-size random v3-config checkpoint into OUT_DIR instead")
    ap.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    ap.add_argument("--long", nargs="*", metavar="CKPT", default=None,
                    help="only (re)make the long-audio references of these committed checkpoints "
                         "(default with no names: v3_small v2_small)")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    work = Path(args.work or tempfile.mkdtemp(prefix="parakeet-fixtures-"))
    if args.full_size:
        build_full(Path(args.full_size), work)
        return 0
    if args.long is not None:
        for name in args.long or ["v3_small", "v2_small"]:
            build_long(name)
        return 0
    info = make_audio()
    (FIXTURES / "audio" / "audio.json").write_text(json.dumps(info, indent=1) + "\n")
    for name in args.only or ["v3_small", "v2_small"]:
        build_small(name, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
