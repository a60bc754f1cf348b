"""Scores of a generated answer against a reference: exact match, token F1 and ROUGE-L on
SQuAD-normalised text's tokens, so that any script's words count. ROUGE-L is `rouge-score`'s
F-measure (longest common subsequence, beta 1) computed here: that package's import pulls in nltk
(3-6 s before every eval); the tests check both agree."""
from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from dataclasses import dataclass

METRICS = ("exact_match", "f1", "rouge_l")
ARTICLES = re.compile(r"\b(a|an|the)\b")
PUNCTUATION = set(string.punctuation)


def normalize(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation (Unicode's too), no English
    articles, single spaces."""
    text = "".join(c for c in text.lower() if c not in PUNCTUATION and not unicodedata.category(c).startswith("P"))
    return " ".join(ARTICLES.sub(" ", text).split())


@dataclass(frozen=True)
class Scores:
    exact_match: float
    f1: float
    rouge_l: float


def longest_common_subsequence(a: list[str], b: list[str]) -> int:
    """Its length, by the usual dynamic programme over one row (O(len(a) * len(b)) time)."""
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, 1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(prediction: list[str], reference: list[str]) -> float:
    """ROUGE-L F-measure: 2PR / (P + R) with P, R the LCS length over each side's length."""
    common = longest_common_subsequence(prediction, reference)
    if not common:
        return 0.0
    precision, recall = common / len(prediction), common / len(reference)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: list[str], reference: list[str]) -> float:
    if not prediction or not reference:
        return float(prediction == reference)
    common = sum((Counter(prediction) & Counter(reference)).values())
    if not common:
        return 0.0
    precision, recall = common / len(prediction), common / len(reference)
    return 2 * precision * recall / (precision + recall)


def score(prediction: str, reference: str) -> Scores:
    """The three scores, each in [0, 1]; two empty answers agree fully."""
    predicted, expected = normalize(prediction).split(), normalize(reference).split()
    if not predicted or not expected:
        agree = float(predicted == expected)
        return Scores(agree, agree, agree)
    return Scores(float(predicted == expected), token_f1(predicted, expected), rouge_l(predicted, expected))
