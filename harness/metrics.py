"""Scores of a generated answer against a reference: exact match and token F1 on SQuAD-normalised
text, ROUGE-L (the `rouge-score` package) on the same tokens, so that any script's words count."""
from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from dataclasses import dataclass

from converter.errors import ConversionError

METRICS = ("exact_match", "f1", "rouge_l")
ARTICLES = re.compile(r"\b(a|an|the)\b")
PUNCTUATION = set(string.punctuation)


def normalize(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation (Unicode's too), no English
    articles, single spaces."""
    text = "".join(c for c in text.lower() if c not in PUNCTUATION and not unicodedata.category(c).startswith("P"))
    return " ".join(ARTICLES.sub(" ", text).split())


class _Tokens:
    """`rouge-score`'s tokenizer interface over our normalisation (its default keeps only a-z0-9)."""

    @staticmethod
    def tokenize(text: str) -> list[str]:
        return normalize(text).split()


@dataclass(frozen=True)
class Scores:
    exact_match: float
    f1: float
    rouge_l: float


def _rouge_scorer():
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise ConversionError("ROUGE-L needs the rouge-score package: pip install 'lora-convert[eval]'") from None
    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=_Tokens())


def check_available() -> None:
    """Refuse at once, before any model loads, when `rouge-score` is missing."""
    _rouge_scorer()


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
    rouge = _rouge_scorer().score(reference, prediction)["rougeL"].fmeasure
    return Scores(float(predicted == expected), token_f1(predicted, expected), rouge)
