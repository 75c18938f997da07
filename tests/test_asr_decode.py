"""Speech-recognition decoding: the ARPA reader against hand-computed back-off scores, the
Kneser-Ney builder against a hand-computed bigram and normalisation in every context, and the CTC
prefix beam search against brute-force enumeration of every alignment of a tiny vocabulary."""
import itertools
import math

import numpy as np
import pytest

from d2v.data.arpa import build_kneser_ney, read_arpa, write_arpa
from d2v.finetune.beam import BeamDecoder, Lexicon, read_lexicon
from d2v.finetune.config import DecodeConfig

HAND_ARPA = """\\data\\
ngram 1=4
ngram 2=2

\\1-grams:
-1.0\t<s>\t-0.5
-0.5\tA\t-0.3
-0.7\tB
-0.9\t</s>

\\2-grams:
-0.2\t<s> A
-0.1\tA B

\\end\\
"""


def test_arpa_reader_backs_off_as_written_by_hand(tmp_path):
    path = tmp_path / "hand.arpa"
    path.write_text(HAND_ARPA)
    lm = read_arpa(str(path))
    assert lm.order == 2
    assert lm.log10p("B", ["A"]) == pytest.approx(-0.1)             # listed bigram
    assert lm.log10p("A", ["B"]) == pytest.approx(-0.5)             # B has no back-off weight: 0
    assert lm.log10p("B", ["<s>"]) == pytest.approx(-0.5 - 0.7)     # bow(<s>) + p(B)
    assert lm.log10p("</s>", ["X", "A"]) == pytest.approx(-0.3 - 0.9)  # only the last word counts
    assert lm.sentence_log10p(["A", "B"]) == pytest.approx(-0.2 - 0.1 - 0.9)
    with pytest.raises(ValueError, match="not in the language model"):
        lm.log10p("C", ["A"])
    (tmp_path / "cut.arpa").write_text(HAND_ARPA.replace("-0.1\tA B\n", ""))
    with pytest.raises(ValueError, match="cut.arpa: the header declares 2 2-grams but the file lists 1"):
        read_arpa(str(tmp_path / "cut.arpa"))
    (tmp_path / "junk.arpa").write_text("hello\n")
    with pytest.raises(ValueError, match="junk.arpa, line 1: expected the"):
        read_arpa(str(tmp_path / "junk.arpa"))


def test_kneser_ney_bigram_against_hand_computation(tmp_path):
    # Continuation counts A:1 B:1 C:1 </s>:2 (sum 5), D1 = 3/(3+2) = 0.6; the uniform floor gives
    # 0.6·4/5 over 5 words (A B C </s> <unk>): p(B) = 0.4/5 + 0.096. Bigram counts (<s> A):2 and
    # four 1s: D2 = 4/(4+2) = 2/3; after A: gamma = (2/3)·2/2, p(B|A) = (1/3)/2 + gamma·p(B).
    lm = build_kneser_ney([["A", "B"], ["A", "C"]], order=2)
    assert 10 ** lm.log10p("B") == pytest.approx(0.176)
    assert 10 ** lm.log10p("<unk>") == pytest.approx(0.096)
    assert 10 ** lm.log10p("B", ["A"]) == pytest.approx(1 / 6 + 2 / 3 * 0.176)
    assert 10 ** lm.log10p("Z", ["A"]) == pytest.approx(2 / 3 * 0.096)  # an unknown word is <unk>
    write_arpa(lm, str(tmp_path / "kn.arpa"))
    back = read_arpa(str(tmp_path / "kn.arpa"))
    assert back.log10p("B", ["A"]) == pytest.approx(lm.log10p("B", ["A"]), abs=1e-6)


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_kneser_ney_sums_to_one_in_every_context(order):
    sentences = [s.split() for s in ["THE CAT SAT", "THE DOG SAT", "A CAT RAN", "THE CAT RAN AWAY", "A DOG SAT DOWN"]]
    lm = build_kneser_ney(sentences, order=order)
    words = sorted(lm.vocab - {"<s>"})
    contexts = [(), ("<s>",), ("THE",), ("<s>", "THE"), ("THE", "CAT"), ("CAT", "SAT"), ("ZZ", "THE"),
                ("A", "DOG", "SAT")]
    for ctx in contexts:
        assert sum(10 ** lm.log10p(w, ctx) for w in words) == pytest.approx(1.0, abs=1e-12), ctx


# -- beam search against brute force ------------------------------------------------------------
SYMBOLS = ["<blank>", "|", "A", "B"]


def _collapse(path):
    out, prev = [], None
    for i in path:
        if i != prev and i != 0:
            out.append(i)
        prev = i
    return tuple(out)


def _exact(lp):
    """ln P(labels) for every label sequence: the sum over all alignments of the frames."""
    totals = {}
    for path in itertools.product(range(lp.shape[1]), repeat=lp.shape[0]):
        p = sum(lp[t, i] for t, i in enumerate(path))
        key = _collapse(path)
        totals[key] = np.logaddexp(totals.get(key, -np.inf), p)
    return totals


def _random_log_probs(seed, T=5):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(T, len(SYMBOLS))) * 1.5
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


UNBOUNDED = DecodeConfig(beam=10 ** 6, beam_threshold=math.inf)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prefix_search_without_lm_gives_the_exact_probability_of_every_labelling(seed):
    lp = _random_log_probs(seed)
    exact = _exact(lp)
    found = dict(BeamDecoder(SYMBOLS, settings=UNBOUNDED).search(lp))
    assert found.keys() == exact.keys()
    for key, score in exact.items():
        assert found[key] == pytest.approx(score, abs=1e-9)
    best = max(exact, key=exact.get)
    assert BeamDecoder(SYMBOLS, settings=UNBOUNDED).search(lp)[0][0] == best


def _words(labels):
    text = "".join(" " if i == 1 else SYMBOLS[i] for i in labels)
    return text.split()


@pytest.mark.parametrize("seed", [3, 4])
def test_lexicon_and_lm_scores_match_brute_force(seed):
    lm = build_kneser_ney([["A", "AB"], ["AB", "B"], ["B"]], order=2)
    lexicon = Lexicon(["A", "AB", "B"])
    settings = DecodeConfig(lm_weight=1.7, word_score=-0.4, beam=10 ** 6, beam_threshold=math.inf)
    lp = _random_log_probs(seed)
    want = {}
    for key, acoustic in _exact(lp).items():
        words = _words(key)
        if all(w in lexicon.words for w in words):
            history, lm_score = ["<s>"], 0.0
            for w in words:
                lm_score += settings.lm_weight * lm.log10p(w, history) + settings.word_score
                history.append(w)
            want[key] = acoustic + lm_score + settings.lm_weight * lm.log10p("</s>", history)
    found = dict(BeamDecoder(SYMBOLS, lm, lexicon, settings).search(lp))
    assert found.keys() == want.keys()
    for key, score in want.items():
        assert found[key] == pytest.approx(score, abs=1e-9)


def test_a_narrow_beam_keeps_the_best_of_an_easy_case():
    """Near one-hot frames: beam 2 and a tight threshold find what the unbounded search finds."""
    lp = np.log(np.full((6, 4), 0.02))
    for t, i in enumerate([2, 0, 3, 3, 1, 2]):
        lp[t, i] = np.log(0.94)
    narrow = BeamDecoder(SYMBOLS, settings=DecodeConfig(beam=2, beam_threshold=5.0, beam_size_token=2))
    assert narrow.search(lp)[0][0] == BeamDecoder(SYMBOLS, settings=UNBOUNDED).search(lp)[0][0] == (2, 3, 1, 2)
    assert narrow.decode(lp) == "AB A"


def test_a_strong_lm_fixes_a_greedy_error(tmp_path):
    from d2v.data.arpa import build_arpa_file
    from d2v.finetune.ctc import CharVocab, greedy_decode
    from d2v.finetune.metrics import wer

    import torch

    vocab = CharVocab(["<blank>", "|", "A", "B", "D"])
    lm = build_arpa_file(["A BAD DAB", "BAD DAB", "A BAD BAD", "DAB A BAD"], str(tmp_path / "lm.arpa"), order=3)
    probs = np.full((9, 5), 0.02)
    for t, i in enumerate([2, 0, 1, 3, 4, 0, 4, 0, 0]):  # A | B (D 0.46, A 0.44) D: greedy "A BDD"
        probs[t, i] = 0.92
    probs[4] = [0.02, 0.02, 0.44, 0.06, 0.46]
    lp = np.log(probs / probs.sum(axis=1, keepdims=True))
    greedy = greedy_decode(torch.from_numpy(lp).unsqueeze(0), torch.tensor([9]), vocab)[0]
    assert greedy == "A BDD" and wer(["A BAD"], [greedy]) == 0.5
    decoder = BeamDecoder(vocab.symbols, lm, read_lexicon(_lexicon(tmp_path, ["A", "BAD", "DAB"])),
                          DecodeConfig(lm_weight=2.0, word_score=-1.0, beam=20))
    assert decoder.decode(lp) == "A BAD"
    assert BeamDecoder(vocab.symbols, settings=DecodeConfig(beam=20)).decode(lp) == "A BDD"  # no LM: no fix


def _lexicon(tmp_path, words):
    path = tmp_path / "lexicon.txt"
    path.write_text("".join(f"{w}\t{' '.join(w)} |\n" for w in words))
    return str(path)
