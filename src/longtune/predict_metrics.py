"""BLEU-4 and ROUGE-1/2/L of generated predictions, computed as LLaMA-Factory 0.9.5 reports them (its
`ComputeSimilarity`), in pure Python: the same numbers without nltk or rouge-chinese.

LLaMA-Factory scores each (prediction, label) pair and averages over pairs, every value x100 rounded to 4 places:
- BLEU-4: nltk `sentence_bleu` on the *characters* of the two strings (one reference), weights 1/4 each, NIST
  geometric smoothing (`SmoothingFunction().method3`).
- ROUGE: both texts segmented with jieba, re-joined with spaces, scored by rouge-chinese's `Rouge` (F values): its
  n-grams are sets (each distinct n-gram counted once), sentences are cut at Chinese end punctuation and '?', and
  ROUGE-L is the LCS of the whole word sequences. An empty side scores 0.

jieba matters only for Chinese: on text without any character of its Han range we segment exactly as jieba does
(tests/test_chat_predict.py checks it against jieba), so English needs no extra package; Chinese text needs jieba
itself (its dictionary is the segmentation), and asks for it in one line when it is missing.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from fractions import Fraction
from typing import Iterator

from longtune.errors import ConfigError

METRIC_NAMES = ("bleu-4", "rouge-1", "rouge-2", "rouge-l")

# ---------------------------------------------------------------- BLEU-4 (nltk sentence_bleu + method3)


def _ngram_counts(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def sentence_bleu4(reference: list[str], hypothesis: list[str]) -> float:
    """BLEU-4 of one hypothesis against one reference with NIST geometric smoothing (nltk's method3): a precision
    with no match becomes 1 / (2^k * its denominator), k counting such orders from 1."""
    precisions: list[Fraction | float] = []
    for n in range(1, 5):
        hyp_counts = _ngram_counts(hypothesis, n)
        ref_counts = _ngram_counts(reference, n)
        matches = sum(min(count, ref_counts[gram]) for gram, count in hyp_counts.items())
        precisions.append(Fraction(matches, max(1, sum(hyp_counts.values()))))
    if precisions[0] == 0:
        return 0.0
    k = 1
    for i, p in enumerate(precisions):
        if p == 0:
            precisions[i] = 1 / (2**k * max(1, sum(_ngram_counts(hypothesis, i + 1).values())))
            k += 1
    hyp_len, ref_len = len(hypothesis), len(reference)
    brevity = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return brevity * math.exp(math.fsum(0.25 * math.log(p) for p in precisions if p > 0))


# ---------------------------------------------------------------- segmentation (jieba's, without Chinese)

JIEBA_HAN = re.compile("[\u4e00-\u9fd5]")  # the characters jieba segments with its dictionary and HMM
_JIEBA_BLOCK = re.compile("([\u4e00-\u9fd5a-zA-Z0-9+#&._%\\-]+)")  # jieba's re_han_default
_JIEBA_SPACE = re.compile("(\r\n|\\s)")  # jieba's re_skip_default
_JIEBA_ALNUM = re.compile("([a-zA-Z0-9]+(?:\\.\\d+)?%?)")  # jieba.finalseg's re_skip
# The only dictionary words of jieba 0.42.1 made of block characters without Han ones (all with frequency 3),
# and the log of the dictionary's total frequency: they decide its route through an ASCII block.
_JIEBA_ASCII_WORDS = {"AT&T": 3, "c#": 3, "C#": 3, "c++": 3, "C++": 3}
_JIEBA_LOG_TOTAL = math.log(60101967)


def _ascii_block_words(block: str) -> Iterator[str]:
    """jieba's accurate-mode cut (HMM on) of one block of [a-zA-Z0-9+#&._%-]: the most probable route through
    its dictionary words, single characters in between grouped and split into alphanumeric runs."""
    n = len(block)
    best: list[tuple[float, int]] = [(0.0, 0)] * (n + 1)
    for start in range(n - 1, -1, -1):
        candidates = [(-_JIEBA_LOG_TOTAL + best[start + 1][0], start)]
        for word, freq in _JIEBA_ASCII_WORDS.items():
            if block.startswith(word, start):
                end = start + len(word) - 1
                candidates.append((math.log(freq) - _JIEBA_LOG_TOTAL + best[end + 1][0], end))
        best[start] = max(candidates)  # ties go to the longer word, as in jieba's max over (score, end)
    pending, start = "", 0
    while start < n:
        end = best[start][1] + 1
        if end - start == 1:
            pending += block[start]
        else:
            yield from _finalseg_ascii(pending)
            pending = ""
            yield block[start:end]
        start = end
    yield from _finalseg_ascii(pending)


def _finalseg_ascii(chars: str) -> Iterator[str]:
    if len(chars) == 1:
        yield chars
    elif chars:
        yield from (part for part in _JIEBA_ALNUM.split(chars) if part)


def segment_words(text: str) -> list[str]:
    """`list(jieba.cut(text))`: jieba itself when it is installed, else our exact equivalent for text without
    Han characters (Chinese text without jieba is a ConfigError)."""
    try:
        import jieba
    except ImportError:
        jieba = None
    if jieba is not None:
        import logging

        jieba.setLogLevel(logging.WARNING)  # its dictionary-loading banner would interleave with our output
        return list(jieba.cut(text))
    return segment_words_without_jieba(text)


def segment_words_without_jieba(text: str) -> list[str]:
    """`list(jieba.cut(text))` for text without Han characters, computed without jieba."""
    if JIEBA_HAN.search(text):
        raise ConfigError("predict: ROUGE of Chinese text segments words with jieba, as LLaMA-Factory does; "
                          "install it: pip install jieba")
    words: list[str] = []
    for block in _JIEBA_BLOCK.split(text):
        if not block:
            continue
        if _JIEBA_BLOCK.fullmatch(block):
            words.extend(_ascii_block_words(block))
        else:
            for part in _JIEBA_SPACE.split(block):
                if _JIEBA_SPACE.fullmatch(part):
                    words.append(part)
                else:
                    words.extend(part)  # every other character is a word of its own
    return words


# ---------------------------------------------------------------- ROUGE (rouge-chinese's Rouge)


def _rouge_sentences(text: str) -> list[str]:
    """rouge-chinese's sentence cut, then whitespace normalised inside each non-empty sentence."""
    text = re.sub("([。！？\\?])([^”’])", r"\1\n\2", text)
    text = re.sub("(\\.{6})([^”’])", r"\1\n\2", text)
    text = re.sub("(\\…{2})([^”’])", r"\1\n\2", text)
    text = re.sub("([。！？\\?][”’])([^，。！？\\?])", r"\1\n\2", text)
    return [" ".join(s.split()) for s in text.rstrip().split("\n") if len(s) > 0]


def _f1(overlap: int, hyp_count: int, ref_count: int) -> float:
    precision = overlap / hyp_count if hyp_count else 0.0
    recall = overlap / ref_count if ref_count else 0.0
    return 2.0 * ((precision * recall) / (precision + recall + 1e-8))  # rouge-chinese's epsilon


def _lcs_length(x: list[str], y: list[str]) -> int:
    row = [0] * (len(y) + 1)
    for a in x:
        previous_diagonal = 0
        for j, b in enumerate(y, start=1):
            above = row[j]
            row[j] = previous_diagonal + 1 if a == b else max(row[j], row[j - 1])
            previous_diagonal = above
    return row[-1]


def rouge_f_scores(hypothesis: str, reference: str) -> dict[str, float]:
    """ROUGE-1, -2 and -L F values of space-separated texts, as rouge-chinese's `Rouge().get_scores` (exclusive
    n-grams; ROUGE-L summary level over the words of all sentences). Both texts must have a non-space word."""
    hyp_words = [w for s in _rouge_sentences(hypothesis) for w in s.split(" ")]
    ref_words = [w for s in _rouge_sentences(reference) for w in s.split(" ")]
    scores = {}
    for n in (1, 2):
        hyp_grams = {tuple(hyp_words[i : i + n]) for i in range(len(hyp_words) - n + 1)}
        ref_grams = {tuple(ref_words[i : i + n]) for i in range(len(ref_words) - n + 1)}
        scores[f"rouge-{n}"] = _f1(len(hyp_grams & ref_grams), len(hyp_grams), len(ref_grams))
    scores["rouge-l"] = _f1(_lcs_length(ref_words, hyp_words), len(hyp_words), len(ref_words))
    return scores


# ---------------------------------------------------------------- LLaMA-Factory's per-pair scores and average


def similarity_scores(prediction: str, label: str) -> dict[str, float]:
    """One pair's BLEU-4 and ROUGE-1/2/L, x100 and rounded to 4 places (LLaMA-Factory's ComputeSimilarity)."""
    hypothesis = " ".join(segment_words(prediction))
    reference = " ".join(segment_words(label))
    if not hypothesis.split() or not reference.split():
        scores = {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    else:
        scores = rouge_f_scores(hypothesis, reference)
    scores["bleu-4"] = sentence_bleu4(list(label), list(prediction))
    return {name: round(scores[name] * 100, 4) for name in METRIC_NAMES}


def average_similarity(predictions: list[str], labels: list[str]) -> dict[str, float]:
    """The mean of `similarity_scores` over all pairs, per metric (what predict_results.json reports)."""
    if len(predictions) != len(labels) or not predictions:
        raise ValueError(f"need as many predictions as labels (> 0), got {len(predictions)} and {len(labels)}")
    per_pair = [similarity_scores(p, label) for p, label in zip(predictions, labels)]
    return {name: math.fsum(s[name] for s in per_pair) / len(per_pair) for name in METRIC_NAMES}
