"""Real English sentences and passages from the documentation bundled with Python (``pydoc_data.topics``)."""

from __future__ import annotations

import functools
import random
import re

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_MARKUP = re.compile(r"\*\*\*|===|---|\+\+\+")  # heading underlines and table rules


@functools.lru_cache(maxsize=1)
def _all_sentences() -> tuple[str, ...]:
    from pydoc_data.topics import topics

    found, seen = [], set()
    for key in sorted(topics):
        # paragraphs are separated by blank lines; code blocks are indented and skipped
        for paragraph in re.split(r"\n\s*\n", topics[key]):
            if paragraph.startswith((" ", "\t", ">>>")):
                continue
            text = " ".join(paragraph.split())
            for sentence in _SENTENCE_END.split(text):
                words = sentence.split()
                if (4 <= len(words) and sentence[0].isupper() and not _MARKUP.search(sentence)
                        and sentence not in seen):
                    seen.add(sentence)
                    found.append(sentence)
    return tuple(found)


def sentences(n: int | None = None, seed: int | None = None, max_words: int = 80) -> list[str]:
    """``n`` English sentences (all of them if None) of at most ``max_words`` words.

    The order is fixed; with ``seed`` the sentences are a reproducible random sample instead, so
    that different seeds give different (mostly disjoint) sets for calibration and evaluation.
    """
    pool = [s for s in _all_sentences() if len(s.split()) <= max_words]
    if seed is not None:
        pool = pool[:]
        random.Random(seed).shuffle(pool)
    return pool if n is None else pool[:n]


def passages(n: int, min_words: int = 110, seed: int | None = None) -> list[str]:
    """``n`` passages of consecutive sentences (in the documentation's order), each at least
    ``min_words`` words long: text that fills a model's whole context (110 words make more than 128
    WordPiece tokens), so a batch of them has no padding. With ``seed``, a reproducible random
    sample of all such passages instead of the first ``n``."""
    pool = _all_sentences()
    found, current = [], []
    for sentence in pool:
        current.append(sentence)
        if sum(len(s.split()) for s in current) >= min_words:
            found.append(" ".join(current))
            current = []
    if seed is not None:
        random.Random(seed).shuffle(found)
    return found[:n]


def prefixes(texts: list[str], words: tuple[int, ...] = (2, 4)) -> list[str]:
    """The first ``words`` words of each text that is longer, for calibration that covers short inputs.

    What a model computes at the end of a short input (BERT's ``[SEP]`` after a few words) can run
    through units that long inputs barely use; pruning calibrated on full sentences alone then removes
    them. Adding these prefixes to the calibration texts keeps those units measured.
    """
    return [" ".join(text.split()[:k]) for text in texts for k in words if k < len(text.split())]
