"""A small tokenizers JSON for text exports in the tests (shared by the transformers interop tests)."""


def word_tokenizer(path, vocab_size: int) -> str:
    """A tokenizers JSON with RoBERTa's special ids and <mask> last (what d2v's Tokenizer accepts)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(4, vocab_size - 1)})
    vocab["<mask>"] = vocab_size - 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))
    return str(path)
