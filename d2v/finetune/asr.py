"""The `asr` downstream task: CTC on letters over transcribed speech shards (README, fine-tuning).

Training masks the features (d2v.finetune.masking) and drops layers as the fine-tuning config says
(its model.layerdrop and dropouts replace the pretrained run's, as fairseq's wav2vec_ctc does).
Evaluation runs over one or several named sets (`finetune.eval_data=dev_clean=PAT;dev_other=PAT`)
and reports per set WER and CER of greedy decoding and, with `finetune.decode.lm`, of beam search
with the LM (`wer_lm`, `cer_lm`). One unnamed set reports `wer`/`cer`; named sets `NAME/wer`.
"""
from __future__ import annotations

import os
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from d2v.config.schema import D2vConfig, ModelConfig
from d2v.finetune.config import FinetuneConfig
from d2v.finetune.ctc import CTC_REDUCTIONS, CharVocab, ctc_loss, greedy_decode
from d2v.finetune.masking import FeatureMasking, check_masking
from d2v.finetune.metrics import char_errors, word_errors
from d2v.finetune.model import FinetuneModel, FrameHead, TaskOutput, freeze_feature_encoder
from d2v.finetune.tasks import DownstreamTask, FtBatch, frames_of, register

LETTERS = ("transcripts", "fairseq")
UNNAMED = "eval"
COUNTS = ("word_errors", "words", "char_errors", "chars")


def parse_eval_sets(text: str) -> list[tuple[str, str]]:
    """[(name, shard pattern)] from `PATTERN` (one set, named "eval") or `NAME=PATTERN;NAME=PATTERN`."""
    items = [item.strip() for item in text.split(";") if item.strip()]
    if len(items) == 1 and "=" not in items[0]:
        return [(UNNAMED, items[0])]
    sets = []
    for item in items:
        name, sep, pattern = item.partition("=")
        if not sep or not name.strip() or not pattern.strip() or "/" in name:
            raise ValueError(f"finetune.eval_data item {item!r}: several evaluation sets are written "
                             f"NAME=PATTERN;NAME=PATTERN (names without '/')")
        sets.append((name.strip(), pattern.strip()))
    if len({n for n, _ in sets}) != len(sets):
        raise ValueError(f"finetune.eval_data names a set twice: {[n for n, _ in sets]}")
    return sets


def length_batches(lengths: Sequence[int], max_tokens: int, rank: int, world_size: int, seed: int,
                   epoch: int) -> list[list[int]]:
    """This rank's batches of an epoch by audio length (fairseq's batch_by_size over its
    ordered_indices): utterances longest first (random order among equal lengths), each batch
    filled while its longest utterance times its size stays within max_tokens; the batches
    shuffled, dealt to the ranks in turn, every rank keeping the same number."""
    rng = np.random.default_rng(seed * 100_003 + epoch)
    order = np.lexsort((rng.permutation(len(lengths)), np.asarray(lengths)))[::-1]
    batches, current, longest = [], [], 0
    for i in order.tolist():
        if lengths[i] > max_tokens:
            raise ValueError(f"a training utterance has {lengths[i]} samples, more than finetune.max_tokens="
                             f"{max_tokens}; raise it")
        if current and max(longest, lengths[i]) * (len(current) + 1) > max_tokens:
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, lengths[i])
    if current:
        batches.append(current)
    batches = [batches[j] for j in rng.permutation(len(batches))]
    per_rank = len(batches) // world_size
    if per_rank == 0:
        raise ValueError(f"{len(batches)} batches of finetune.max_tokens={max_tokens} samples cannot give each of "
                         f"{world_size} ranks one; lower finetune.max_tokens")
    return [batches[k * world_size + rank] for k in range(per_rank)]


def apply_regularization(model: FinetuneModel, m: ModelConfig) -> None:
    """The fine-tuning config's LayerDrop and dropouts on the encoder, whatever the checkpoint was
    pretrained with (fairseq's wav2vec_ctc overrides them the same way)."""
    encoder = model.backbone.encoder
    encoder.layerdrop = m.layerdrop
    encoder.dropout.p = m.dropout
    for block in [*encoder.prenet, *encoder.blocks]:
        block.dropout.p = m.dropout
        block.attention.dropout = m.attention_dropout
        block.ffn.activation_dropout.p = m.activation_dropout


@register
class AsrTask(DownstreamTask):
    """CTC on letters; WER and CER per evaluation set, greedy and (with an LM) beam search."""

    name = "asr"
    modality = "audio"
    data_help = "transcribed shard pattern (eval: also NAME=PATTERN;NAME=PATTERN)"

    @classmethod
    def configure(cls, cfg: FinetuneConfig, base: D2vConfig) -> None:
        # Fine-tuning normalises the waveforms as pretraining did (fairseq refuses a mismatch).
        cfg.finetune.normalize_audio = base.data.normalize

    @classmethod
    def check(cls, cfg: FinetuneConfig) -> list[str]:
        t, d = cfg.finetune, cfg.finetune.decode
        problems = check_masking(t.mask_prob, t.mask_length, t.mask_channel_prob, t.mask_channel_length)
        if t.ctc_reduction not in CTC_REDUCTIONS:
            problems.append(f"finetune.ctc_reduction={t.ctc_reduction!r}: use one of {', '.join(CTC_REDUCTIONS)}")
        if t.max_tokens < 0:
            problems.append("finetune.max_tokens must be >= 0 (0: train.micro_batch_size utterances per batch)")
        if t.letters not in LETTERS:
            problems.append(f"finetune.letters={t.letters!r}: use one of {', '.join(LETTERS)}")
        if d.beam < 1 or d.beam_threshold <= 0 or d.beam_size_token < 0:
            problems.append("finetune.decode.beam must be >= 1, beam_threshold > 0 and beam_size_token >= 0")
        for key in ("lm", "lexicon"):
            path = getattr(d, key)
            if path and not os.path.isfile(path):
                problems.append(f"finetune.decode.{key}={path}: no such file")
        if d.lexicon and not d.lm:
            problems.append("finetune.decode.lexicon is used by beam search with an LM: give finetune.decode.lm too")
        try:
            parse_eval_sets(t.eval_data)
        except ValueError as err:
            problems.append(str(err))
        return problems

    def __init__(self, cfg: FinetuneConfig) -> None:
        from d2v.data.transcribed import read_transcribed

        rate = cfg.model.audio.sample_rate
        self.data = {"train": read_transcribed(cfg.finetune.train_data, sample_rate=rate), "eval": []}
        self.set_of_row: list[str] = []
        self.sets = [name for name, _ in parse_eval_sets(cfg.finetune.eval_data)]
        for name, pattern in parse_eval_sets(cfg.finetune.eval_data):
            utts = read_transcribed(pattern, sample_rate=rate)
            self.data["eval"] += utts
            self.set_of_row += [name] * len(utts)
        train_texts = [u.text for u in self.data["train"]]
        self.vocab = CharVocab.fairseq_letters() if cfg.finetune.letters == "fairseq" else \
            CharVocab.from_transcripts(train_texts)
        self.labels = self.vocab.symbols
        self.num_outputs = len(self.vocab)
        self.normalize = cfg.finetune.normalize_audio
        self.reduction = cfg.finetune.ctc_reduction
        self._targets = [self.vocab.encode(t) for t in train_texts]
        self.decoder = self._decoder(cfg)
        arms = ("", "_lm") if self.decoder is not None else ("",)
        self.score_keys = tuple(f"{s}/{c}{a}" for s in self.sets for a in arms for c in COUNTS)

    def _decoder(self, cfg: FinetuneConfig):
        d = cfg.finetune.decode
        if not d.lm:
            return None
        from d2v.data.arpa import read_arpa
        from d2v.finetune.beam import BeamDecoder, read_lexicon

        return BeamDecoder(self.vocab.symbols, read_arpa(d.lm), read_lexicon(d.lexicon) if d.lexicon else None, d)

    @staticmethod
    def feature_masking(cfg: FinetuneConfig) -> FeatureMasking:
        t = cfg.finetune
        return FeatureMasking(t.mask_prob, t.mask_length, t.mask_channel_prob, t.mask_channel_length)

    def epoch_plan(self, cfg: FinetuneConfig, rank: int, world_size: int) -> Callable[[int], list[list[int]]] | None:
        max_tokens = cfg.finetune.max_tokens
        if not max_tokens:
            return None
        lengths = [len(u.wav) for u in self.data["train"]]
        return lambda epoch: length_batches(lengths, max_tokens, rank, world_size, cfg.train.seed, epoch)

    def head(self, embed_dim: int) -> nn.Module:
        return FrameHead(embed_dim, self.num_outputs)

    def prepare_model(self, model: FinetuneModel, cfg: FinetuneConfig) -> None:
        apply_regularization(model, cfg.model)
        if cfg.finetune.freeze_feature_encoder:
            freeze_feature_encoder(model)

    def size(self, split: str) -> int:
        return len(self.data[split])

    def batch(self, split: str, indices: Sequence[int]) -> FtBatch:
        utts = [self.data[split][i] for i in indices]
        wavs = [u.wav for u in utts]
        if self.normalize:
            wavs = [(w - w.mean()) / (w.std() + 1e-5) for w in wavs]
        lengths = torch.tensor([len(w) for w in wavs], dtype=torch.long)
        source = torch.zeros(len(wavs), int(lengths.max()))
        for row, w in enumerate(wavs):
            source[row, :len(w)] = torch.from_numpy(np.asarray(w, dtype=np.float32))
        targets = [self._targets[i] for i in indices] if split == "train" else None
        sets = [self.set_of_row[i] for i in indices] if split == "eval" else None
        return FtBatch(source, lengths, targets=targets, texts=[u.text for u in utts], sets=sets)

    def loss(self, out: TaskOutput, batch: FtBatch) -> Tensor:
        return ctc_loss(out.logits, frames_of(out), batch.targets, self.reduction)

    def hypotheses(self, out: TaskOutput) -> list[str]:
        return greedy_decode(out.logits, frames_of(out), self.vocab)

    def lm_hypotheses(self, out: TaskOutput) -> list[str]:
        log_probs = torch.log_softmax(out.logits.double(), dim=-1).cpu().numpy()
        return [self.decoder.decode(row[:int(n)]) for row, n in zip(log_probs, frames_of(out).tolist())]

    def score(self, out: TaskOutput, batch: FtBatch) -> dict[str, float]:
        sums = {k: 0.0 for k in self.score_keys}
        arms = [("", self.hypotheses(out))]
        if self.decoder is not None:
            arms.append(("_lm", self.lm_hypotheses(out)))
        sets = batch.sets or [UNNAMED] * len(batch.texts)
        for arm, hyps in arms:
            for s, ref, hyp in zip(sets, batch.texts, hyps):
                w, c = word_errors([ref], [hyp]), char_errors([ref], [hyp])
                for name, value in zip(COUNTS, (w.errors, w.total, c.errors, c.total)):
                    sums[f"{s}/{name}{arm}"] += value
        return sums

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        out = {}
        for s in self.sets:
            prefix = "" if self.sets == [UNNAMED] else f"{s}/"
            for arm in ("", "_lm"):
                if f"{s}/words{arm}" in sums:
                    out[f"{prefix}wer{arm}"] = sums[f"{s}/word_errors{arm}"] / max(sums[f"{s}/words{arm}"], 1)
                    out[f"{prefix}cer{arm}"] = sums[f"{s}/char_errors{arm}"] / max(sums[f"{s}/chars{arm}"], 1)
        return out
