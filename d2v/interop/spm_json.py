"""A `tokenizer.json` (the tokenizers library) equivalent to one of d2v's SentencePiece models.

transformers loads a tokenizer.json with any model, but has no slow SentencePiece class whose ids
are the model's own ids (XLM-R's adds fairseq's offset), so d2v's unigram models (RoBERTa's
special ids inside the model, `<mask>` appended after the last piece) are rebuilt as a tokenizers
Unigram model: the same pieces and scores, SentencePiece's precompiled normaliser, whitespace to
'▁'. The result is only used after it encodes a set of probe strings exactly as SentencePiece
does (`equivalent_tokenizer_json` returns None otherwise).
"""
from __future__ import annotations

PROBES = (
    "Hello world.", "  Leading and trailing   spaces  ", "Numbers 12345 and symbols: {}[]()<>!?",
    "Ünïcödé façade — naïve café, ½ ﬁ ligature", "tabs\tand\nnewlines", "def f(x):\n    return x ** 2",
    "a", "", "MixedCASE wordsWithoutSpaces_underscores-and-dashes",
)


def _build(path: str, mask_id: int) -> str:
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    proto = sentencepiece_model_pb2.ModelProto()
    with open(path, "rb") as f:
        proto.ParseFromString(f.read())
    if proto.trainer_spec.model_type != 1:  # 1 = unigram
        raise ValueError("only unigram SentencePiece models are converted")
    vocab = [(p.piece, p.score) for p in proto.pieces]
    if len(vocab) != mask_id:
        raise ValueError(f"{len(vocab)} pieces, but <mask> is id {mask_id}")
    vocab.append(("<mask>", 0.0))
    tok = Tokenizer(models.Unigram(vocab, unk_id=proto.trainer_spec.unk_id, byte_fallback=False))
    norm = proto.normalizer_spec
    steps = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    tok.normalizer = normalizers.Sequence(steps)
    scheme = "always" if norm.add_dummy_prefix else "never"
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=scheme)
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme=scheme)
    specials = [p.piece for p in proto.pieces if p.type == 3] + ["<mask>"]  # 3 = CONTROL
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return tok.to_str()


def equivalent_tokenizer_json(path: str, mask_id: int, probes: tuple[str, ...] = PROBES) -> str | None:
    """The tokenizer.json text, or None if it cannot be built or encodes a probe differently."""
    try:
        import sentencepiece as spm
        from tokenizers import Tokenizer

        text = _build(path, mask_id)
    except (ImportError, ValueError):
        return None
    sp = spm.SentencePieceProcessor(model_file=path)
    tok = Tokenizer.from_str(text)
    for probe in probes:
        if sp.encode(probe) != tok.encode(probe, add_special_tokens=False).ids:
            return None
    return text
