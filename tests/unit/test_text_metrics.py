"""WER / ROUGE / Porter kernels against jiwer, rouge-score, nltk and the references."""

from __future__ import annotations

import functools
import itertools
import pathlib
import random
import re

import jiwer
import nltk
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nltk.stem.porter import PorterStemmer
from rouge_score import rouge_scorer

from sophiavl_mcore.rewards.oracle import (
    jiwer_words_oracle,
    rouge_oracle,
    rouge_tokens_oracle,
    wer_oracle,
)
from sophiavl_mcore.rewards.text_metrics import (
    batch_rouge,
    batch_wer,
    batch_wer_counts,
    porter_stem,
    rouge_tokenize,
)

SCORER = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
STEMMER = PorterStemmer()
# Characters that stress the tokenizers: U+212A lowercases to 'k', U+0130 to 'i' + U+0307,
# U+00A0 / U+3000 / U+2028 / U+0085 are whitespace to jiwer, the rest are separators.
SPECIAL = ["\u212a", "\u0130", "\u00a0", "\u3000", "\u2028", "\u0085", "é", "ß", "日本", "ǅ", "\t"]


def _rouge_score(ref: str, hyp: str) -> list[float]:
    s = SCORER.score(target=ref, prediction=hyp)
    return [s["rouge1"].fmeasure, s["rouge2"].fmeasure, s["rougeL"].fmeasure]


@functools.cache
def _english_words() -> tuple[str, ...]:
    """Real English words (with case) from the docstrings / comments of nltk's sources."""
    root = pathlib.Path(nltk.__file__).parent
    words: set[str] = set()
    for path in sorted(root.rglob("*.py"))[:250]:
        words.update(re.findall(r"[A-Za-z]+", path.read_text(errors="ignore")))
    return tuple(sorted(words))


def _text(rng: random.Random, n_words: int, specials: bool = True) -> str:
    words = _english_words()
    common = words[::50]
    out = []
    for _ in range(n_words):
        w = rng.choice(common) if rng.random() < 0.6 else rng.choice(words)
        r = rng.random()
        if r < 0.05:
            w += rng.choice([",", ".", "!", " -", "'s", ")", "1990s"])
        elif r < 0.07:
            w = w.upper()
        elif specials and r < 0.09:
            w += rng.choice(SPECIAL) + rng.choice(words)
        out.append(w)
    return " ".join(out)


# ------------------------------------------------------------------ Porter stemmer

_SUFFIXES = (
    "sses ies ss s eed ed ing ied at bl iz y ational tional enci anci izer bli alli entli eli "
    "ousli ization ation ator alism iveness fulness ousness aliti iviti biliti fulli logi icate "
    "ative alize iciti ical ful ness al ance ence er ic able ible ant ement ment ent ion sion "
    "tion ou ism ate iti ous ive ize e ll"
).split()
_STEMS = (
    "a b y yy ay by ty tr tree troubl oat ivi privat orrer conflat hop tann fall hiss fizz fil "
    "fail sky happ enjoy sp rel condit valen hesit digit conform radic differ vil analog vietnam "
    "predic oper feud decis hope call form sensit sensib triplic electr good reviv allow infer "
    "airlin gyroscop adjust defens irrit replac depend adopt homolog commun activ angular effect "
    "bowdler prob rat ceas controll roll cr d l t pl x w sw wax bow 1990 ab99"
).split()


@functools.cache
def _porter_vocabulary() -> tuple[str, ...]:
    words = {w.lower() for w in _english_words()}
    # every suffix of every Porter rule after stems of measure 0, 1, 2, ... (so each rule
    # is seen both firing and blocked), and pairs of suffixes (rules feeding each other)
    words.update(s + x for s in _STEMS for x in _SUFFIXES)
    words.update(s + x + y for s in _STEMS[::10] for x, y in itertools.product(_SUFFIXES, repeat=2))
    rng = random.Random(7)
    alphabet = "aeiouyybcdlstmnrgzwx0"
    for _ in range(20000):
        stem = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 7)))
        words.add(stem + "".join(rng.choice(_SUFFIXES) for _ in range(rng.randint(0, 2))))
    words.discard("")
    return tuple(sorted(words))


def test_porter_stem_equals_nltk_on_large_vocabulary():
    words = list(_porter_vocabulary())
    assert len(words) > 40000
    got = porter_stem(words)
    bad = [(w, STEMMER.stem(w), g) for w, g in zip(words, got, strict=True) if STEMMER.stem(w) != g]
    assert not bad, f"{len(bad)} stems differ, e.g. {bad[:10]}"


def test_porter_stem_special_cases():
    cases = [
        "skies",
        "dying",
        "lying",
        "tying",
        "news",
        "innings",
        "outings",
        "cannings",
        "howe",
        "proceed",
        "exceed",
        "succeed",
        "ties",
        "dies",
        "cried",
        "died",
        "generalli",
        "Running",
        "CARESSES",
        "y",
        "ab",
        "",
        "yyyy",
        "syzygy",
        "archaeology",
        "fulli",
    ]
    assert porter_stem(cases) == [STEMMER.stem(w) for w in cases]


def test_porter_stem_rejects_non_ascii():
    with pytest.raises(ValueError, match=r"words\[1\] is not ASCII"):
        porter_stem(["ok", "café"])


# ------------------------------------------------------------------ ROUGE


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.sampled_from(list("aAbBkKyYsS09 .,-'\n") + SPECIAL + ["ing", "ies"]), max_size=40
    ).map("".join)
)
def test_rouge_tokenizer_matches_rouge_score(text):
    expected = SCORER._tokenizer.tokenize(text)
    assert rouge_tokenize([text]) == [expected]
    assert rouge_tokens_oracle(text) == expected


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=40), st.text(max_size=40))
def test_rouge_matches_rouge_score_on_arbitrary_unicode(ref, hyp):
    got = batch_rouge([ref], [hyp])
    np.testing.assert_allclose(got[0], _rouge_score(ref, hyp), rtol=0, atol=1e-12)


def test_rouge_edge_cases_match_rouge_score():
    pairs = [
        ("", ""),
        ("a", ""),
        ("", "b c"),
        ("the cat", "the cats"),
        ("KELVIN", "\u212aelvin"),
        ("\u0130stanbul", "i stanbul"),
        ("a\ud800b", "a b"),
        ("x", "x"),
        ("x y", "y x"),
        ("a a a b", "a a b b"),
        ("don't stop", "dont stop"),
        ("1990s", "1990"),
        ("running runs ran", "run running"),
        ("...", "!!!"),
    ]
    got = batch_rouge([p[0] for p in pairs], [p[1] for p in pairs])
    expected = np.array([_rouge_score(r, h) for r, h in pairs])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


def test_rouge_matches_rouge_score_on_realistic_texts():
    rng = random.Random(11)
    pairs = [
        (_text(rng, rng.randint(200, 350)), _text(rng, rng.randint(200, 350))) for _ in range(24)
    ]
    # near-duplicates: long common subsequences and many shared bigrams
    for ref, _ in pairs[:8]:
        words = ref.split()
        pairs.append((ref, " ".join(w for w in words if rng.random() < 0.8)))
    got = batch_rouge([p[0] for p in pairs], [p[1] for p in pairs])
    expected = np.array([_rouge_score(r, h) for r, h in pairs])
    assert got.shape == (len(pairs), 3) and got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)
    assert (expected[24:, 2] > 0.7).all()  # the near-duplicates really exercise LCS


def test_rouge_matches_reference_and_is_order_independent():
    rng = random.Random(5)
    pairs = [(_text(rng, rng.randint(0, 90)), _text(rng, rng.randint(0, 90))) for _ in range(400)]
    refs = [p[0] for p in pairs]
    hyps = [p[1] for p in pairs]
    got = batch_rouge(refs, hyps)
    expected = np.array([rouge_oracle(r, h) for r, h in pairs[:120]])
    np.testing.assert_allclose(got[:120], expected, rtol=0, atol=1e-12)
    # per-thread stem caches and ids: a different order / batch gives the same scores
    rev = batch_rouge(refs[::-1], hyps[::-1])[::-1]
    np.testing.assert_array_equal(got, rev)
    np.testing.assert_array_equal(got[7:8], batch_rouge(refs[7:8], hyps[7:8]))


def test_rouge_long_texts_multiblock_lcs():
    rng = random.Random(2)
    ref = _text(rng, 700, specials=False)
    hyp = " ".join(w for w in ref.split() if rng.random() < 0.9) + " " + _text(rng, 80)
    got = batch_rouge([ref, hyp], [hyp, ref])
    np.testing.assert_allclose(got[0], _rouge_score(ref, hyp), rtol=0, atol=1e-12)
    np.testing.assert_allclose(got[1], _rouge_score(hyp, ref), rtol=0, atol=1e-12)


def test_rouge_empty_batch():
    assert batch_rouge([], []).shape == (0, 3)


# ------------------------------------------------------------------ WER

_WORDS = ["a", "b", "c", "The", "the", "cat", "日本", "x\u00a0y", "é", "K"]
_SEPS = [" ", "  ", "\t", "\t\t", "\n", " \n", "\u3000", "\u2028", "\u00a0", "\u0085 ", "\r\n"]


def _ws_text(rng: random.Random, n: int) -> str:
    body = "".join(rng.choice(_WORDS) + rng.choice(_SEPS) for _ in range(n))
    return rng.choice(["", " ", "\t", "\n\n"]) + body + rng.choice(["", " ", "\t", "\t\t"])


def test_wer_matches_jiwer_and_reference():
    rng = random.Random(3)
    pairs = [
        (_ws_text(rng, rng.randint(1, 80)), _ws_text(rng, rng.randint(0, 80))) for _ in range(600)
    ]
    pairs += [(_ws_text(rng, 300), _ws_text(rng, 280)) for _ in range(5)]  # multi-block
    refs = [p[0] for p in pairs]
    hyps = [p[1] for p in pairs]
    got = batch_wer(refs, hyps)
    expected = np.array([jiwer.wer(r, h) for r, h in pairs])
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(got[:150], [wer_oracle(r, h) for r, h in pairs[:150]])
    counts = batch_wer_counts(refs, hyps)
    assert counts.dtype == np.int64 and counts.shape == (len(pairs), 2)
    outs = [jiwer.process_words(r, h) for r, h in pairs[:100]]
    assert counts[:100, 0].tolist() == [o.substitutions + o.deletions + o.insertions for o in outs]
    assert counts[:100, 1].tolist() == [o.hits + o.substitutions + o.deletions for o in outs]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.sampled_from(_WORDS + _SEPS), min_size=1, max_size=30).map("".join),
    st.lists(st.sampled_from(_WORDS + _SEPS), max_size=30).map("".join),
)
def test_wer_matches_jiwer_property(ref, hyp):
    got = batch_wer([ref], [hyp])[0]
    assert got == wer_oracle(ref, hyp)
    if jiwer_words_oracle(ref):
        assert got == jiwer.wer(ref, hyp)


def test_wer_semantics():
    got = batch_wer(
        ["a b c", "a b c", "", "", "  ", "A b", "a\tb", "a\t\tb", "x y", "a b"],
        ["a b c", "a x", "", "p q", "z", "a b", "a b", "a b", "", "b a c d"],
    )
    # identical; 1 sub + 1 del; empty/empty; empty ref -> #hyp words; whitespace-only ref;
    # case-sensitive; single tab does not split (1 word vs 2: 1 sub + 1 ins over 1 word);
    # double tab splits; empty hypothesis; 'a b' -> 'b a c d' is 3 edits over 2 words
    assert got.tolist() == [0.0, 2 / 3, 0.0, 2.0, 1.0, 0.5, 2.0, 0.0, 1.0, 1.5]
    assert jiwer.wer("a\tb", "a b") == 2.0  # the tab rule really is jiwer's


def test_wer_long_unicode_surrogates_do_not_crash():
    got = batch_wer(["a\ud800 b", "\ud800"], ["a\ud800 b", "x"])
    assert got.tolist() == [0.0, 1.0]


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("fn", [batch_wer, batch_rouge, batch_wer_counts])
def test_text_metric_errors(fn):
    with pytest.raises(ValueError, match=r"same length, got 2 and 1"):
        fn(["a", "b"], ["a"])
    with pytest.raises(ValueError, match=r"hypotheses\[1\] is int; expected str"):
        fn(["a", "b"], ["a", 3])
    with pytest.raises(ValueError, match=r"references\[0\] is NoneType; expected str"):
        fn([None], ["a"])
    with pytest.raises(ValueError, match=r"references must be a sequence of str, not a single str"):
        fn("abc", ["a", "b", "c"])


def test_cxx_rejects_bad_entries_directly():
    from sophiavl_mcore import _C

    with pytest.raises(ValueError, match=r"hypotheses\[2\] is bytes; expected str"):
        _C.batch_rouge(["a", "b", "c"], ["a", "b", b"c"])
    with pytest.raises(ValueError, match=r"references must be a list or tuple of str"):
        _C.batch_wer({"a"}, ["a"])
    with pytest.raises(ValueError, match=r"same length"):
        _C.batch_wer(("a",), ())
