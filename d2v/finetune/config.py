"""The fine-tuning config: the pretrained model's section plus optimizer, loop and task settings,
in the same typed tree and `key=value` override syntax as pretraining (resolved by
d2v.finetune.resolve), and where the model section of a pretrained run is read from.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from d2v.config.overrides import from_dict
from d2v.config.schema import D2vConfig, ModelConfig, OptimConfig, TrainConfig
from d2v.finetune.image_config import ImageFinetuneConfig


@dataclass(kw_only=True)
class DecodeConfig:
    """asr: how evaluation turns frame scores into words (README, fine-tuning). Greedy (best path)
    is always reported; with an `lm` also CTC beam search with the LM and a lexicon. The defaults
    are fairseq's decoder settings (examples/speech_recognition/new/decoders/decoder_config.py)."""

    lm: str = ""
    """ARPA n-gram model over upper-case words (`python -m d2v.data.arpa` builds one); empty: greedy only."""
    lexicon: str = ""
    """Words the beam search may spell, one per line (flashlight's `WORD W O R D |` lines work);
    empty: the LM's words."""
    lm_weight: float = 2.0
    """Weight of the LM's log10 probabilities against the acoustic natural-log scores (fairseq's lmweight)."""
    word_score: float = -1.0
    """Added per word (fairseq's wordscore; negative discourages insertions)."""
    beam: int = 50
    """Hypotheses kept per frame."""
    beam_threshold: float = 50.0
    """Hypotheses scoring this far below the best are dropped."""
    beam_size_token: int = 0
    """Labels tried per frame, most likely first (0: all)."""


@dataclass(kw_only=True)
class TaskConfig:
    """What is fine-tuned on which data."""

    train_data: str = ""
    """asr: transcribed shard pattern | image_cls: ImageFolder root | text_cls: TSV file (text<TAB>label) |
    glue: a GLUE task folder (its train.tsv) or one of its .tsv files."""
    eval_data: str = ""
    """Held-out data in the same form (asr: one shard pattern, or several sets as `NAME=PATTERN;NAME=PATTERN`;
    glue: the folder's dev files)."""
    tokenizer: str = ""
    """text_cls, glue: SentencePiece .model or tokenizer.json (default: the one beside the pretraining shards,
    else the one a transformers export given as --init ships)."""
    freeze_feature_encoder: bool = True
    """asr: no gradient into the conv waveform encoder (fairseq's feature_grad_mult=0); its projection still trains."""
    freeze_encoder_steps: int = 0
    """Updates at the start during which only the task head trains (fairseq's freeze_finetune_updates)."""
    head_dropout: float = 0.0
    """Dropout on the encoder output before the task head (fairseq's final_dropout; glue: also after the
    head's tanh, fairseq's pooler_dropout)."""
    normalize_audio: bool = True
    """asr: zero mean, unit variance per utterance (default: as the pretraining config's data.normalize)."""
    eval_batch_size: int = 32
    """Examples per rank per evaluation batch."""
    eval_every: int = 0
    """Updates between evaluations (0: only at the end)."""
    recipe: str = ""
    """A fine-tuning recipe (d2v.finetune.recipes) whose settings were applied before the overrides."""
    letters: str = "transcripts"
    """asr: CTC labels: transcripts (the characters of the training transcripts) | fairseq (the letter
    dictionary of fairseq's LibriSpeech recipes, dict.ltr.txt: `|`, 26 letters, apostrophe)."""
    max_tokens: int = 0
    """asr: training batches by audio length, at most this many (padded) samples per rank, utterances of
    similar length together (fairseq's max_tokens); 0: train.micro_batch_size utterances."""
    ctc_reduction: str = "mean"
    """asr: mean (each utterance's CTC loss over its target length, averaged) | sentence (the sums
    averaged over utterances: fairseq's sentence_avg)."""
    mask_prob: float = 0.0
    """asr: time masking while training (wav2vec 2.0 spans replaced by the mask embedding; fairseq's mask_prob)."""
    mask_length: int = 10
    """asr: frames per time-mask span."""
    mask_channel_prob: float = 0.0
    """asr: channel masking while training (spans of feature channels zeroed; fairseq's mask_channel_prob)."""
    mask_channel_length: int = 64
    """asr: channels per channel-mask span."""
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    """asr: decoding at evaluation."""
    glue_task: str = ""
    """glue: the GLUE task (cola | sst_2 | mrpc | qqp | sts_b | mnli | qnli | rte; set by the glue_* recipes)."""
    image: ImageFinetuneConfig = field(default_factory=ImageFinetuneConfig)
    """image_cls: augmentation, mixing, layer-wise LR decay, drop path, pooling."""


@dataclass(kw_only=True)
class FinetuneConfig:
    """A whole fine-tuning run."""

    name: str = "finetune"
    """Preset the model section came from."""
    task: str = "asr"
    """A registered downstream task (d2v.finetune.tasks.TASKS): asr (CTC on characters) | image_cls | text_cls |
    glue."""
    init: str = ""
    """Checkpoint or export directory the encoder was initialised from (empty: random initialisation)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The encoder (from the pretrained run; structural fields must not change)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The loop (max_steps, micro_batch_size, precision, seed, out_dir, log_every)."""
    finetune: TaskConfig = field(default_factory=TaskConfig)
    """Task data and freezing."""


def is_transformers_dir(path: str) -> bool:
    """A transformers-format directory (`export --format hf`, or public data2vec weights on disk)."""
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        return False
    with open(config) as f:
        return "model_type" in json.load(f)


def read_pretrain_config(path: str) -> D2vConfig:
    """The D2vConfig of an export directory (config.json) or a d2v checkpoint (any of run dir,
    checkpoints dir, tag dir)."""
    if os.path.exists(os.path.join(path, "student.safetensors")):
        with open(os.path.join(path, "config.json")) as f:
            return from_dict(json.load(f))
    if is_transformers_dir(path):
        from d2v.interop import pretrained_config

        return pretrained_config(path)
    from d2v.export import resolve_tag_dir

    with open(os.path.join(resolve_tag_dir(path), "d2v_state.json")) as f:
        return from_dict(json.load(f)["config"])
