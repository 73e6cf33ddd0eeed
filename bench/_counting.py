"""Time spendgate's token counting against tiktoken's own encoder, in this process."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import tiktoken

from _workload import TOKENIZER, rag_document
from spendgate import tokens

REPEATS = 7


@dataclass(frozen=True)
class CountTimes:
    """Median milliseconds to count one ~100,000-token text, by method."""

    tokens: int
    characters: int
    tiktoken_ms: float
    miss_ms: float
    hit_ms: float


def _median_ms(action: Callable[[int], object], repeats: int) -> float:
    times = []
    for attempt in range(repeats):
        started = time.perf_counter()
        action(attempt)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def measure() -> CountTimes:
    """Count the RAG document with encode_ordinary and with count_text.

    count_text is timed on a new text each time (a cache miss: hash, encode
    and store) and on the same text again (a cache hit: hash and look up).
    """
    # spendgate's own tiktoken.Encoding, loaded from its packaged BPE file:
    # tiktoken.get_encoding would download the file instead.
    encoding: tiktoken.Encoding = tokens._get_encoding(TOKENIZER)
    document = rag_document()
    variants = [f"Variant {index}.\n{document}" for index in range(REPEATS)]

    tiktoken_ms = _median_ms(
        lambda attempt: encoding.encode_ordinary(variants[attempt]), REPEATS
    )
    miss_ms = _median_ms(
        lambda attempt: tokens.count_text(TOKENIZER, variants[attempt]), REPEATS
    )
    hit_ms = _median_ms(
        lambda attempt: tokens.count_text(TOKENIZER, variants[0]), REPEATS * 3
    )
    return CountTimes(
        tokens=tokens.count_text(TOKENIZER, document).tokens,
        characters=len(document),
        tiktoken_ms=tiktoken_ms,
        miss_ms=miss_ms,
        hit_ms=hit_ms,
    )
