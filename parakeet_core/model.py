"""`ParakeetTDT`: the three inference stages behind one object, and `from_pretrained` to build it from a checkpoint."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from .attention import AUTO, DEFAULT_FULL_ATTENTION_MAX_SECONDS, AttentionPolicy, AttentionSpec
from .audio import AudioItem, as_waveform, check_waveform
from .checkpoint import DEFAULT_CHECKPOINT, NemoCheckpoint, read_nemo, resolve_checkpoint, sub_state_dict
from .config import ModelConfig
from .decoder import TDTGreedyDecoder
from .encoder import ConformerEncoder
from .errors import CheckpointError, ParakeetError
from .preprocessor import MelPreprocessor
from .tokenizer import DEFAULT_SEGMENT_DELIMITERS, Tokenizer
from .types import Hypothesis, Transcript

logger = logging.getLogger("parakeet_core")

STAGES = ("featurize", "encode", "decode")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on Ampere or newer GPUs, fp16 on older ones, fp32 on the CPU."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _load_strict(module: torch.nn.Module, state: dict, prefix: str, ignore: Iterable[str] = ()) -> None:
    """Load `state` into `module` by assignment (the checkpoint's tensors become the parameters, uncopied)."""
    state = {k: v for k, v in state.items() if k not in set(ignore)}
    try:
        missing, unexpected = module.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:  # shape mismatches
        raise CheckpointError(f"checkpoint weights under '{prefix}.' do not match the architecture in its config: "
                              f"{exc}") from None
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint weights under '{prefix}.' do not match the architecture in its config: "
            f"missing {sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]}"
        )


def _unallocated(factory: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Build a module with its parameters on the meta device: no memory, no random initialisation."""
    with torch.device("meta"):
        return factory()


def _place(module: torch.nn.Module, prefix: str, device: torch.device, dtype: torch.dtype | None = None) -> None:
    """Move the loaded module to `device` (floating-point tensors cast to `dtype` there), one tensor at a time.

    Tensors already on `device` in `dtype` (the mapped checkpoint's, on the CPU in fp32) stay as they are; on a GPU
    each is copied as stored and cast on the device, so the host never holds a converted copy of the weights."""
    tensors = itertools.chain(module.named_parameters(), module.named_buffers())
    left = [name for name, tensor in tensors if tensor.is_meta]
    if left:
        raise CheckpointError(f"'{prefix}' has tensors the checkpoint did not fill: {sorted(left)[:8]}")

    def convert(tensor: torch.Tensor) -> torch.Tensor:
        placed = tensor.to(device)
        if not tensor.is_floating_point():  # a few counters: copied, so that a cast module keeps no view of the file
            return placed.clone() if placed is tensor else placed
        return placed.to(dtype) if dtype is not None else placed

    module._apply(convert)
    module.eval()


class ParakeetTDT:
    """Parakeet TDT inference: featurize -> encode -> decode -> transcript, each batched with lengths."""

    def __init__(self, checkpoint: NemoCheckpoint, *, device: torch.device, dtype: torch.dtype,
                 stages: Sequence[str] = STAGES, attention: AttentionSpec = AUTO,
                 full_attention_max_seconds: float = DEFAULT_FULL_ATTENTION_MAX_SECONDS):
        self.attention = AttentionPolicy.parse(attention, full_attention_max_seconds=full_attention_max_seconds)
        unknown = set(stages) - set(STAGES)
        if unknown:
            raise ValueError(f"unknown stages {sorted(unknown)}; choose from {STAGES}")
        self.config: ModelConfig = checkpoint.config
        self.checkpoint_path = checkpoint.path
        self.device = device
        self.dtype = dtype
        self.stages = tuple(s for s in STAGES if s in stages)
        state = checkpoint.state_dict
        self.preprocessor = self.encoder = self.decoder = None
        if "featurize" in self.stages:
            self.preprocessor = MelPreprocessor(self.config.preprocessor)
            self.preprocessor.load_checkpoint_buffers(sub_state_dict(state, "preprocessor.featurizer"))
            _place(self.preprocessor, "preprocessor", device)
        if "encode" in self.stages:
            self.encoder = _unallocated(lambda: ConformerEncoder(self.config.encoder))
            _load_strict(self.encoder, sub_state_dict(state, "encoder"), "encoder", ignore=("pos_enc.pe",))
            _place(self.encoder, "encoder", device, dtype)
        if "decode" in self.stages:
            self.decoder = _unallocated(lambda: TDTGreedyDecoder(self.config.encoder.d_model, self.config.decoder))
            prediction = sub_state_dict(state, "decoder")
            _load_strict(self.decoder.prediction, sub_state_dict(prediction, "prediction"), "decoder.prediction")
            _load_strict(self.decoder.joint, sub_state_dict(state, "joint"), "joint")
            _place(self.decoder, "decoder", device, dtype)
        decoding = checkpoint.raw_config.get("decoding") or {}
        self.tokenizer = Tokenizer(
            checkpoint.tokenizer_model,
            segment_delimiters=decoding.get("segment_seperators") or DEFAULT_SEGMENT_DELIMITERS,
        )
        if self.tokenizer.vocab_size != self.config.decoder.vocab_size:
            raise CheckpointError(
                f"tokenizer has {self.tokenizer.vocab_size} pieces but decoder.vocab_size is {self.config.decoder.vocab_size}"
            )

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    @property
    def min_samples(self) -> int:
        """Shortest clip with at least one feature frame."""
        return self.config.preprocessor.window_stride

    def _require(self, stage: str, module):
        if module is None:
            raise ParakeetError(f"this instance was loaded with stages={self.stages}; '{stage}' is not among them")
        return module

    @torch.inference_mode()
    def featurize(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Waveforms [B, T] float32 at the model's rate -> log-mel features [B, F, T'] fp32 and valid lengths [B]."""
        preprocessor = self._require("featurize", self.preprocessor)
        return preprocessor(waveforms.to(self.device), lengths.to(self.device))

    def attention_policy(self, attention: AttentionSpec | None = None,
                         full_attention_max_seconds: float | None = None) -> AttentionPolicy:
        """This instance's attention policy, or one given per call (None keeps the instance's value)."""
        policy = self.attention if attention is None else AttentionPolicy.parse(
            attention, full_attention_max_seconds=self.attention.full_attention_max_seconds)
        if full_attention_max_seconds is None:
            return policy
        return dataclasses.replace(policy, full_attention_max_seconds=float(full_attention_max_seconds))

    def local_contexts(self, feature_lengths: torch.Tensor, attention: AttentionSpec | None = None,
                       full_attention_max_seconds: float | None = None) -> list[int | None]:
        """Per clip, the local attention context `encode` uses (None: full attention)."""
        policy = self.attention_policy(attention, full_attention_max_seconds)
        seconds_per_frame = self.config.preprocessor.window_stride_seconds
        return [policy.context_for(int(n) * seconds_per_frame) for n in feature_lengths]

    @torch.inference_mode()
    def encode(self, features: torch.Tensor, feature_lengths: torch.Tensor, *, attention: AttentionSpec | None = None,
               full_attention_max_seconds: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Features [B, F, T'] -> encoded frames [B, T'', D] in the model dtype and valid lengths [B].

        `attention`: "full", "auto", a local context N or (N, N); None uses the instance's setting. Decided per
        clip: clips that get different attention are encoded in separate sub-batches, each exactly as alone.
        """
        encoder = self._require("encode", self.encoder)
        features = features.to(self.device, self.dtype)
        feature_lengths = feature_lengths.to(self.device, torch.long)
        contexts = self.local_contexts(feature_lengths, attention, full_attention_max_seconds)
        if len(set(contexts)) == 1:
            return encoder(features, feature_lengths, contexts[0])
        steps = int(ConformerEncoder.output_lengths_for(self.config.encoder, features.shape[2]))
        encoded = None
        lengths = torch.zeros_like(feature_lengths)
        for context in dict.fromkeys(contexts):
            rows = torch.tensor([i for i, c in enumerate(contexts) if c == context], device=self.device)
            longest = int(feature_lengths[rows].max()) + 1
            part, part_lengths = encoder(features[rows, :, : min(longest, features.shape[2])], feature_lengths[rows], context)
            if encoded is None:
                encoded = part.new_zeros(features.shape[0], steps, part.shape[2])
            encoded[rows, : part.shape[1]] = part
            lengths[rows] = part_lengths
        return encoded, lengths

    @torch.inference_mode()
    def decode(self, encoded: torch.Tensor, encoded_lengths: torch.Tensor, *, loop: str = "auto") -> list[Hypothesis]:
        """Greedy TDT decoding of encoded frames [B, T'', D] -> one Hypothesis per clip. `loop`: the label loop
        (`parakeet_core.decoding.LOOPS`; "auto": the CUDA graph on a GPU, the host loop on the CPU)."""
        decoder = self._require("decode", self.decoder)
        return decoder(encoded.to(self.device, self.dtype), encoded_lengths.to(self.device), loop=loop)

    def to_transcript(self, hypothesis: Hypothesis, *, timestamps: bool = False) -> Transcript:
        """Detokenise a hypothesis; with `timestamps`, add word and segment times in seconds."""
        transcript = Transcript(
            text=self.tokenizer.text(hypothesis.token_ids),
            token_ids=list(hypothesis.token_ids),
            token_frames=list(hypothesis.token_frames),
            token_durations=list(hypothesis.token_durations),
        )
        if timestamps:
            transcript.words, transcript.segments = self.tokenizer.timestamps(hypothesis,
                                                                              self.config.seconds_per_encoder_frame)
        return transcript

    def transcribe_waveforms(self, waveforms: Sequence[np.ndarray], *, timestamps: bool = False,
                             attention: AttentionSpec | None = None,
                             full_attention_max_seconds: float | None = None) -> list[Transcript]:
        """One padded batch of validated float32 waveforms through all three stages."""
        lengths = torch.tensor([len(w) for w in waveforms], dtype=torch.long)
        batch = torch.zeros(len(waveforms), int(lengths.max()), dtype=torch.float32)
        for row, samples in enumerate(waveforms):
            batch[row, : len(samples)] = torch.from_numpy(samples)
        features, feature_lengths = self.featurize(batch, lengths)
        encoded, encoded_lengths = self.encode(features, feature_lengths, attention=attention,
                                               full_attention_max_seconds=full_attention_max_seconds)
        return [self.to_transcript(h, timestamps=timestamps) for h in self.decode(encoded, encoded_lengths)]

    def transcribe(self, audio: AudioItem | list[AudioItem], *, batch_size: int = 16, timestamps: bool = False,
                   attention: AttentionSpec | None = None,
                   full_attention_max_seconds: float | None = None,
                   streaming: tuple[float, float, float] | bool | None = None) -> Transcript | list[Transcript]:
        """Transcribe one item (-> Transcript) or a list (-> list, in order).

        An item is a file path, a 1-D float array/tensor at the model's sample rate, or (array, sample_rate).
        Clips are batched by similar length; batching never changes a clip's result. `attention` ("auto",
        "full", N or (N, N)) and `full_attention_max_seconds` override the instance's settings for this call.
        `streaming=(left, chunk, right)` seconds (or True: 10-2-2) transcribes like `stream()` fed the whole clip
        (NeMo's buffered streaming; `batch_size` streams advance together).
        """
        self.attention_policy(attention, full_attention_max_seconds)
        if streaming is not None and streaming is not False:
            from .streaming import StreamingContext, parse_streaming, transcribe_streaming

            if attention is not None or full_attention_max_seconds is not None:
                raise ValueError("streaming encodes every buffer with full attention; attention= and "
                                 "full_attention_max_seconds= do not apply to it")
            streaming = StreamingContext.from_seconds(self, *parse_streaming(streaming))
        single = not isinstance(audio, list)
        items = [audio] if single else audio
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        waveforms = []
        for index, item in enumerate(items):
            samples = as_waveform(item, self.sample_rate)
            check_waveform(samples, min_samples=self.min_samples, name=str(item) if isinstance(item, (str, os.PathLike)) else f"item {index}")
            waveforms.append(samples)
        if streaming:
            results = transcribe_streaming(self, waveforms, streaming, batch_size=batch_size, timestamps=timestamps)
            return results[0] if single else results
        order = sorted(range(len(waveforms)), key=lambda i: len(waveforms[i]), reverse=True)
        results: list[Transcript | None] = [None] * len(waveforms)
        for start in range(0, len(order), batch_size):
            chosen = order[start : start + batch_size]
            batch = self.transcribe_waveforms([waveforms[i] for i in chosen], timestamps=timestamps, attention=attention,
                                              full_attention_max_seconds=full_attention_max_seconds)
            for index, transcript in zip(chosen, batch):
                results[index] = transcript
        return results[0] if single else results

    def stream(self, *, left_seconds: float = 10.0, chunk_seconds: float = 2.0, right_seconds: float = 2.0):
        """A `StreamingSession`: feed audio in pieces, get final tokens chunk by chunk (NeMo's buffered streaming).

        Contexts are rounded down to whole encoder frames (80 ms for Parakeet): latency is chunk + right context;
        NeMo recommends 10-2-2 for live use and 10-10-5 for long files. See parakeet_core/streaming.py."""
        from .streaming import StreamingContext, StreamingSession

        return StreamingSession(self, StreamingContext.from_seconds(self, left_seconds, chunk_seconds, right_seconds))

    def warmup(self, batch_sizes: Sequence[int] = (1,), seconds: float = 2.0) -> None:
        """Run each loaded stage once per batch size (allocator, kernels, CUDA-graph capture) before real traffic."""
        samples = int(seconds * self.sample_rate)
        generator = torch.Generator().manual_seed(0)
        for batch in batch_sizes:
            waveforms = 0.1 * torch.randn(batch, samples, generator=generator)
            lengths = torch.full((batch,), samples, dtype=torch.long)
            features = feature_lengths = encoded = encoded_lengths = None
            if self.preprocessor is not None:
                features, feature_lengths = self.featurize(waveforms, lengths)
            else:
                feature_lengths = torch.full((batch,), samples // self.config.preprocessor.window_stride, dtype=torch.long)
                features = torch.randn(batch, self.config.preprocessor.features, int(feature_lengths[0]), generator=generator)
            if self.encoder is not None:
                encoded, encoded_lengths = self.encode(features, feature_lengths)
            if self.decoder is not None:
                if encoded is None:
                    steps = int(ConformerEncoder.output_lengths_for(self.config.encoder, int(feature_lengths[0])))
                    encoded = torch.randn(batch, steps, self.config.encoder.d_model, generator=generator)
                    encoded_lengths = torch.full((batch,), steps, dtype=torch.long)
                self.decode(encoded, encoded_lengths)

    def __repr__(self) -> str:
        return (f"ParakeetTDT({self.checkpoint_path.name}, stages={self.stages}, device={self.device}, "
                f"dtype={str(self.dtype).removeprefix('torch.')})")


def from_pretrained(source: str | os.PathLike = DEFAULT_CHECKPOINT, *, device: str | torch.device | None = None,
                    dtype: torch.dtype | str | None = None, cache_dir: str | os.PathLike | None = None,
                    stages: Sequence[str] | None = None, attention: AttentionSpec = AUTO,
                    full_attention_max_seconds: float = DEFAULT_FULL_ATTENTION_MAX_SECONDS) -> ParakeetTDT:
    """Load a Parakeet TDT checkpoint: a local `.nemo` file or a Hugging Face repo id (fetched into its cache).

    `device=None` picks CUDA when present, else CPU; `dtype=None` picks bf16 on Ampere+ GPUs, fp16 on older
    GPUs and fp32 on the CPU. `stages` limits which modules are built (all by default). `attention`: "auto"
    (default: full attention up to `full_attention_max_seconds`, local (256, 256) beyond), "full", or a
    symmetric local context N / (N, N) in encoder frames.
    """
    policy = AttentionPolicy.parse(attention, full_attention_max_seconds=full_attention_max_seconds)
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ParakeetError("device 'cuda' was requested but CUDA is not available")
    if isinstance(dtype, str):
        names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                 "float16": torch.float16, "fp16": torch.float16}
        if dtype not in names:
            raise ValueError(f"unknown dtype {dtype!r}; choose from {sorted(names)}")
        dtype = names[dtype]
    dtype = dtype or default_dtype(device)
    path = resolve_checkpoint(source, cache_dir=cache_dir)
    model = ParakeetTDT(read_nemo(path), device=device, dtype=dtype, stages=stages or STAGES, attention=policy)
    logger.info("loaded %s from %s", model, path)
    return model
