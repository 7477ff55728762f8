"""The model's architecture and settings, read from a checkpoint's `model_config.yaml` (NeMo's layout).

Nothing here is hard-coded to one checkpoint: every size comes from the config, and anything this
implementation does not reproduce exactly is refused with an error naming the key and its value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from .errors import UnsupportedConfigError

_MISSING = object()


def _get(section: Mapping[str, Any], key: str, where: str, default: Any = _MISSING) -> Any:
    if key in section and section[key] is not None:
        return section[key]
    if default is _MISSING:
        raise UnsupportedConfigError(f"model_config.yaml: missing required key {where}.{key}")
    return default


def _require(condition: bool, key: str, value: Any, supported: str) -> None:
    if not condition:
        raise UnsupportedConfigError(f"model_config.yaml: unsupported {key}={value!r} (supported: {supported})")


def _target_name(section: Mapping[str, Any]) -> str:
    return str(section.get("_target_", "")).rsplit(".", 1)[-1]


@dataclass(frozen=True)
class PreprocessorConfig:
    sample_rate: int
    window_size: int
    window_stride: int
    window_stride_seconds: float
    n_fft: int
    features: int
    preemph: float
    mag_power: float
    log_zero_guard: float
    normalize: str
    pad_to: int
    pad_value: float
    lowfreq: float
    highfreq: float | None

    @classmethod
    def parse(cls, cfg: Mapping[str, Any]) -> "PreprocessorConfig":
        where = "preprocessor"
        _require(
            _target_name(cfg) in ("AudioToMelSpectrogramPreprocessor", ""),
            f"{where}._target_",
            cfg.get("_target_"),
            "AudioToMelSpectrogramPreprocessor",
        )
        sample_rate = int(_get(cfg, "sample_rate", where, 16000))
        window_seconds = float(_get(cfg, "window_size", where, 0.02))
        stride_seconds = float(_get(cfg, "window_stride", where, 0.01))
        window = _get(cfg, "window", where, "hann")
        _require(window == "hann", f"{where}.window", window, "hann")
        normalize = _get(cfg, "normalize", where, "per_feature")
        _require(normalize in ("per_feature", "NA"), f"{where}.normalize", normalize, "per_feature, NA")
        log = _get(cfg, "log", where, True)
        _require(log is True, f"{where}.log", log, "true")
        splicing = _get(cfg, "frame_splicing", where, 1)
        _require(splicing == 1, f"{where}.frame_splicing", splicing, "1")
        exact_pad = _get(cfg, "exact_pad", where, False)
        _require(exact_pad is False, f"{where}.exact_pad", exact_pad, "false")
        guard_type = _get(cfg, "log_zero_guard_type", where, "add")
        _require(guard_type == "add", f"{where}.log_zero_guard_type", guard_type, "add")
        guard = _get(cfg, "log_zero_guard_value", where, 2**-24)
        _require(isinstance(guard, (int, float)), f"{where}.log_zero_guard_value", guard, "a number")
        mel_norm = _get(cfg, "mel_norm", where, "slaney")
        _require(mel_norm == "slaney", f"{where}.mel_norm", mel_norm, "slaney")
        n_window_size = int(_get(cfg, "n_window_size", where, round(window_seconds * sample_rate)))
        n_window_stride = int(_get(cfg, "n_window_stride", where, round(stride_seconds * sample_rate)))
        n_fft = int(_get(cfg, "n_fft", where, 2 ** math.ceil(math.log2(n_window_size))))
        stft_conv = _get(cfg, "stft_conv", where, False)
        _require(stft_conv is False, f"{where}.stft_conv", stft_conv, "false")
        return cls(
            sample_rate=sample_rate,
            window_size=n_window_size,
            window_stride=n_window_stride,
            window_stride_seconds=stride_seconds,
            n_fft=n_fft,
            features=int(_get(cfg, "features", where, 64)),
            preemph=float(_get(cfg, "preemph", where, 0.97) or 0.0),
            mag_power=float(_get(cfg, "mag_power", where, 2.0)),
            log_zero_guard=float(guard),
            normalize=normalize,
            pad_to=int(_get(cfg, "pad_to", where, 16)),
            pad_value=float(_get(cfg, "pad_value", where, 0.0)),
            lowfreq=float(_get(cfg, "lowfreq", where, 0.0)),
            highfreq=_get(cfg, "highfreq", where, None),
        )


@dataclass(frozen=True)
class EncoderConfig:
    feat_in: int
    n_layers: int
    d_model: int
    n_heads: int
    ff_expansion_factor: int
    conv_kernel_size: int
    subsampling_factor: int
    subsampling_conv_channels: int
    xscaling: bool
    use_bias: bool
    untie_biases: bool
    pos_emb_max_len: int
    subsampling_conv_chunking_factor: int = 1

    @property
    def subsampling_layers(self) -> int:
        return int(math.log2(self.subsampling_factor))

    @classmethod
    def parse(cls, cfg: Mapping[str, Any]) -> "EncoderConfig":
        where = "encoder"
        _require(_target_name(cfg) == "ConformerEncoder", f"{where}._target_", cfg.get("_target_"),
                 "ConformerEncoder (FastConformer)")
        subsampling = _get(cfg, "subsampling", where, "striding")
        _require(subsampling == "dw_striding", f"{where}.subsampling", subsampling, "dw_striding")
        factor = int(_get(cfg, "subsampling_factor", where, 4))
        _require(factor >= 2 and factor & (factor - 1) == 0, f"{where}.subsampling_factor", factor,
                 "a power of two")
        _require(not _get(cfg, "causal_downsampling", where, False), f"{where}.causal_downsampling",
                 cfg.get("causal_downsampling"), "false")
        attention = _get(cfg, "self_attention_model", where, "rel_pos")
        _require(attention == "rel_pos", f"{where}.self_attention_model", attention, "rel_pos")
        context = list(_get(cfg, "att_context_size", where, [-1, -1]))
        _require(context == [-1, -1], f"{where}.att_context_size", context, "[-1, -1] (full context)")
        conv_norm = _get(cfg, "conv_norm_type", where, "batch_norm")
        _require(conv_norm == "batch_norm", f"{where}.conv_norm_type", conv_norm, "batch_norm")
        conv_context = _get(cfg, "conv_context_size", where, None)
        kernel = int(_get(cfg, "conv_kernel_size", where, 31))
        _require(conv_context in (None, [(kernel - 1) // 2, (kernel - 1) // 2]), f"{where}.conv_context_size",
                 conv_context, "null (symmetric)")
        feat_out = _get(cfg, "feat_out", where, -1)
        _require(feat_out in (-1, None), f"{where}.feat_out", feat_out, "-1")
        reduction = _get(cfg, "reduction", where, None)
        _require(reduction is None, f"{where}.reduction", reduction, "null")
        untie = _get(cfg, "untie_biases", where, True)
        _require(untie is True, f"{where}.untie_biases", untie, "true")
        d_model = int(_get(cfg, "d_model", where))
        channels = int(_get(cfg, "subsampling_conv_channels", where, -1))
        chunking = int(_get(cfg, "subsampling_conv_chunking_factor", where, 1))
        _require(chunking == 1 or (chunking > 1 and chunking & (chunking - 1) == 0),
                 f"{where}.subsampling_conv_chunking_factor", chunking, "1 (split when needed) or a power of two")
        return cls(
            feat_in=int(_get(cfg, "feat_in", where)),
            n_layers=int(_get(cfg, "n_layers", where)),
            d_model=d_model,
            n_heads=int(_get(cfg, "n_heads", where, 4)),
            ff_expansion_factor=int(_get(cfg, "ff_expansion_factor", where, 4)),
            conv_kernel_size=kernel,
            subsampling_factor=factor,
            subsampling_conv_channels=d_model if channels == -1 else channels,
            xscaling=bool(_get(cfg, "xscaling", where, True)),
            use_bias=bool(_get(cfg, "use_bias", where, True)),
            untie_biases=untie,
            pos_emb_max_len=int(_get(cfg, "pos_emb_max_len", where, 5000)),
            subsampling_conv_chunking_factor=chunking,
        )


@dataclass(frozen=True)
class DecoderConfig:
    """Prediction network, joint network and greedy TDT decoding settings."""

    vocab_size: int
    pred_hidden: int
    pred_rnn_layers: int
    joint_hidden: int
    durations: tuple[int, ...]
    max_symbols: int

    @property
    def blank_id(self) -> int:
        return self.vocab_size

    @classmethod
    def parse(cls, model: Mapping[str, Any]) -> "DecoderConfig":
        decoder = _get(model, "decoder", "model")
        joint = _get(model, "joint", "model")
        decoding = model.get("decoding") or {}
        _require(_target_name(decoder) == "RNNTDecoder", "decoder._target_", decoder.get("_target_"),
                 "RNNTDecoder")
        _require(_target_name(joint) == "RNNTJoint", "joint._target_", joint.get("_target_"), "RNNTJoint")
        model_type = decoding.get("model_type", "rnnt")
        _require(model_type == "tdt", "decoding.model_type", model_type, "tdt")
        prednet = _get(decoder, "prednet", "decoder")
        _require(_get(decoder, "blank_as_pad", "decoder", True) is True, "decoder.blank_as_pad",
                 decoder.get("blank_as_pad"), "true")
        rnn_type = _get(prednet, "rnn_type", "decoder.prednet", "lstm")
        _require(rnn_type == "lstm", "decoder.prednet.rnn_type", rnn_type, "lstm")
        rnn_hidden = _get(prednet, "rnn_hidden_size", "decoder.prednet", -1)
        _require(rnn_hidden in (-1, None), "decoder.prednet.rnn_hidden_size", rnn_hidden, "-1")
        norm = prednet.get("norm")
        _require(norm in (None, "null"), "decoder.prednet.norm", norm, "null")
        jointnet = _get(joint, "jointnet", "joint")
        activation = _get(jointnet, "activation", "joint.jointnet", "relu")
        _require(activation == "relu", "joint.jointnet.activation", activation, "relu")
        durations = (
            decoding.get("durations")
            or (model.get("model_defaults") or {}).get("tdt_durations")
            or ((model.get("loss") or {}).get("tdt_kwargs") or {}).get("durations")
        )
        _require(bool(durations), "decoding.durations", durations, "a non-empty list of TDT durations")
        durations = tuple(int(d) for d in durations)
        _require(min(durations) >= 0, "decoding.durations", list(durations), "non-negative durations")
        extra = joint.get("num_extra_outputs", len(durations))
        _require(extra == len(durations), "joint.num_extra_outputs", extra, f"{len(durations)} (one per duration)")
        strategy = decoding.get("strategy", "greedy_batch")
        _require(strategy in ("greedy", "greedy_batch"), "decoding.strategy", strategy, "greedy, greedy_batch")
        max_symbols = (decoding.get("greedy") or {}).get("max_symbols", 10)
        _require(max_symbols is not None and int(max_symbols) > 0, "decoding.greedy.max_symbols", max_symbols,
                 "a positive integer")
        vocab_size = int(_get(decoder, "vocab_size", "decoder"))
        joint_classes = int(_get(joint, "num_classes", "joint", vocab_size))
        _require(joint_classes == vocab_size, "joint.num_classes", joint_classes, f"{vocab_size} (decoder.vocab_size)")
        return cls(
            vocab_size=vocab_size,
            pred_hidden=int(_get(prednet, "pred_hidden", "decoder.prednet")),
            pred_rnn_layers=int(_get(prednet, "pred_rnn_layers", "decoder.prednet", 1)),
            joint_hidden=int(_get(jointnet, "joint_hidden", "joint.jointnet")),
            durations=durations,
            max_symbols=int(max_symbols),
        )


@dataclass(frozen=True)
class ModelConfig:
    preprocessor: PreprocessorConfig
    encoder: EncoderConfig
    decoder: DecoderConfig
    tokenizer_model: str

    @property
    def sample_rate(self) -> int:
        return self.preprocessor.sample_rate

    @property
    def seconds_per_encoder_frame(self) -> float:
        return self.preprocessor.window_stride_seconds * self.encoder.subsampling_factor

    @classmethod
    def parse(cls, cfg: Mapping[str, Any]) -> "ModelConfig":
        target = str(cfg.get("target") or "").rsplit(".", 1)[-1]
        _require(target in ("", "EncDecRNNTBPEModel"), "target", cfg.get("target"), "EncDecRNNTBPEModel")
        if "decoder" not in cfg or "joint" not in cfg:
            raise UnsupportedConfigError(
                "model_config.yaml: no 'decoder'/'joint' sections: only transducer (TDT) checkpoints are supported, "
                "not CTC-only ones"
            )
        preprocessor = PreprocessorConfig.parse(_get(cfg, "preprocessor", "model"))
        encoder = EncoderConfig.parse(_get(cfg, "encoder", "model"))
        if encoder.feat_in != preprocessor.features:
            raise UnsupportedConfigError(
                f"model_config.yaml: encoder.feat_in={encoder.feat_in} differs from "
                f"preprocessor.features={preprocessor.features}"
            )
        tokenizer = _get(cfg, "tokenizer", "model")
        tok_type = _get(tokenizer, "type", "tokenizer", "bpe")
        _require(tok_type == "bpe", "tokenizer.type", tok_type, "bpe (SentencePiece)")
        return cls(
            preprocessor=preprocessor,
            encoder=encoder,
            decoder=DecoderConfig.parse(cfg),
            tokenizer_model=str(_get(tokenizer, "model_path", "tokenizer")),
        )
