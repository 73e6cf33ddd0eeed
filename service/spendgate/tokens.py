"""Count prompt tokens offline, so the gate can price a request without a network."""

from __future__ import annotations

import base64
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Final, NamedTuple

import tiktoken

from spendgate.errors import SpendgateError

__all__ = [
    "APPROXIMATE",
    "CACHE_MAX_ENTRIES",
    "CACHE_MIN_CHARS",
    "DEFAULT_CHARS_PER_TOKEN",
    "TOKENIZERS",
    "TOKENS_PER_MESSAGE",
    "TOKENS_PER_NAME",
    "TOKENS_PER_REPLY",
    "CacheInfo",
    "ChatMessage",
    "TokenCount",
    "TokenizerError",
    "TokenizerFileError",
    "UnknownTokenizerError",
    "cache_info",
    "count_messages",
    "count_text",
    "preload",
]

TOKENIZERS: Final = ("o200k_base", "cl100k_base", "approximate")
DEFAULT_CHARS_PER_TOKEN: Final = Decimal("4")

APPROXIMATE: Final = "approximate"

# Chat overhead from the OpenAI cookbook "How to count tokens with tiktoken",
# the rule it gives for gpt-3.5-turbo-0613 and gpt-4-0613. Its worked example
# matches the prompt_tokens that the API reported (129, see the tests).
# NOTE: the cookbook version read predates the gpt-4o family, which is assumed
# to use the same overhead.
TOKENS_PER_MESSAGE: Final = 3
TOKENS_PER_NAME: Final = 1
TOKENS_PER_REPLY: Final = 3

# Shorter texts encode in about 0.1 ms (4,096 characters of English with
# o200k_base), so caching them would only push the long texts, where a hit
# saves milliseconds, out of the bounded cache.
CACHE_MIN_CHARS: Final = 4096
# Texts up to this length are encoded whole, so their count is exact. Longer
# ones are encoded in pieces cut at whitespace and flagged as estimated:
# tiktoken needs about 55 bytes of memory per character of a repetitive text,
# so one 30 MiB prompt took 1.6 GB. 2 Mi characters is about 500,000 tokens of
# English, past every context window in the shipped catalog but two.
EXACT_MAX_CHARS: Final = 2 * 1024 * 1024
CHUNK_CHARS: Final = 256 * 1024
# Pieces this small are counted approximately if tiktoken still fails on them.
MIN_CHUNK_CHARS: Final = 4096
# Encodings of long texts that may run at once, bounding the memory they take.
# Texts of up to LONG_TEXT_CHARS skip it, because the server counts texts
# of up to server.INLINE_MAX_CHARS inline on its event loop.
_long_encodings = threading.BoundedSemaphore(2)
LONG_TEXT_CHARS: Final = 64 * 1024
# An entry (key tuple, 32-byte digest, count, OrderedDict link) measured about
# 240 bytes with tracemalloc on CPython 3.11, so a full cache takes about 1 MB.
CACHE_MAX_ENTRIES: Final = 4096


class TokenizerError(SpendgateError):
    """Base of the errors this module raises."""


class UnknownTokenizerError(TokenizerError, ValueError):
    """A tokenizer name that is not in TOKENIZERS."""

    def __init__(self, name: str) -> None:
        self.name = name
        valid = ", ".join(TOKENIZERS)
        super().__init__(f"Unknown tokenizer {name!r}. Use one of: {valid}.")


class TokenizerFileError(TokenizerError):
    """A BPE file that is missing, unreadable or fails its SHA-256 check."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(
            f"Tokenizer file {path} {reason}. "
            "Reinstall spendgate to restore the packaged file."
        )


@dataclass(frozen=True, slots=True)
class TokenCount:
    """Number of tokens in a text or a chat prompt."""

    tokens: int
    estimated: bool  # True for the approximate tokenizer


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One message of a chat completion request."""

    role: str
    content: str
    name: str = ""


class CacheInfo(NamedTuple):
    """Statistics of the count cache, named as in functools.lru_cache."""

    hits: int
    misses: int
    maxsize: int
    currsize: int


@dataclass(frozen=True, slots=True)
class _EncodingSpec:
    file_name: str
    sha256: str
    pat_str: str
    special_tokens: dict[str, int]


# The hashes, patterns and special tokens below are copied from tiktoken 0.14.0,
# tiktoken_ext/openai_public.py (functions cl100k_base and o200k_base). They
# are written out here because calling tiktoken's constructors would download
# the BPE files. tests/test_tokens.py checks them against the installed tiktoken.
_O200K_PAT_STR: Final = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*"""
        r"""[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+"""
        r"""[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
_CL100K_PAT_STR: Final = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+"""
    r"""| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)

_SPECS: Final = {
    "o200k_base": _EncodingSpec(
        file_name="o200k_base.tiktoken",
        sha256="446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        pat_str=_O200K_PAT_STR,
        special_tokens={"<|endoftext|>": 199999, "<|endofprompt|>": 200018},
    ),
    "cl100k_base": _EncodingSpec(
        file_name="cl100k_base.tiktoken",
        sha256="223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        pat_str=_CL100K_PAT_STR,
        special_tokens={
            "<|endoftext|>": 100257,
            "<|fim_prefix|>": 100258,
            "<|fim_middle|>": 100259,
            "<|fim_suffix|>": 100260,
            "<|endofprompt|>": 100276,
        },
    ),
}

_encodings: dict[str, tiktoken.Encoding] = {}
_encodings_lock = threading.Lock()


def _packaged_directory() -> Traversable:
    return resources.files("spendgate").joinpath("tokenizers")


def _read_mergeable_ranks(path: Traversable, expected_sha256: str) -> dict[bytes, int]:
    """Parse a .tiktoken file of "base64-token rank" lines after checking its hash."""
    try:
        contents = path.read_bytes()
    except OSError as error:
        reason = f"could not be read ({error})"
        raise TokenizerFileError(str(path), reason) from error

    actual_sha256 = hashlib.sha256(contents).hexdigest()
    if actual_sha256 != expected_sha256:
        reason = (
            f"failed the SHA-256 check (got {actual_sha256},"
            f" expected {expected_sha256})"
        )
        raise TokenizerFileError(str(path), reason)

    # The hash pins the content, so every line is known to have two fields.
    fields = contents.split()
    tokens = map(base64.b64decode, fields[0::2])
    ranks = map(int, fields[1::2])
    return dict(zip(tokens, ranks, strict=True))


def _load_encoding(name: str, directory: Traversable) -> tiktoken.Encoding:
    """Build the named encoding from the BPE file in directory, never downloading."""
    spec = _SPECS[name]
    ranks = _read_mergeable_ranks(directory.joinpath(spec.file_name), spec.sha256)
    return tiktoken.Encoding(
        name,
        pat_str=spec.pat_str,
        mergeable_ranks=ranks,
        special_tokens=dict(spec.special_tokens),
    )


def _get_encoding(name: str) -> tiktoken.Encoding:
    encoding = _encodings.get(name)
    if encoding is not None:
        return encoding

    with _encodings_lock:
        encoding = _encodings.get(name)
        if encoding is None:
            encoding = _load_encoding(name, _packaged_directory())
            _encodings[name] = encoding
    return encoding


def _check_tokenizer(name: str) -> None:
    if name not in TOKENIZERS:
        raise UnknownTokenizerError(name)


def preload(names: Iterable[str] = ("o200k_base", "cl100k_base")) -> None:
    """Load and verify the named encodings now instead of on first use.

    The server calls this at start-up, so a corrupted file fails the start and
    the first request does not pay the load time (0.1 to 0.3 s per encoding).
    "approximate" is accepted and needs no loading.

    Raises:
        UnknownTokenizerError: a name is not in TOKENIZERS.
        TokenizerFileError: a BPE file is missing or fails its SHA-256 check.
    """
    names = tuple(names)
    for name in names:
        _check_tokenizer(name)
    for name in names:
        if name != APPROXIMATE:
            _get_encoding(name)


class _CountCache:
    """Thread-safe LRU map from (tokenizer, text digest) to a token count.

    Only the digest is stored, never the text, so prompts do not stay in memory.
    """

    def __init__(self, maxsize: int) -> None:
        self._maxsize = maxsize
        self._counts: OrderedDict[tuple[str, bytes], int] = OrderedDict()
        self._lock = threading.Lock()
        self._hits = 0
        self._misses = 0

    def get(self, key: tuple[str, bytes]) -> int | None:
        with self._lock:
            tokens = self._counts.get(key)
            if tokens is None:
                self._misses += 1
                return None
            self._hits += 1
            self._counts.move_to_end(key)
            return tokens

    def put(self, key: tuple[str, bytes], tokens: int) -> None:
        with self._lock:
            self._counts[key] = tokens
            self._counts.move_to_end(key)
            if len(self._counts) > self._maxsize:
                self._counts.popitem(last=False)

    def info(self) -> CacheInfo:
        with self._lock:
            return CacheInfo(self._hits, self._misses, self._maxsize, len(self._counts))


_count_cache = _CountCache(CACHE_MAX_ENTRIES)


def cache_info() -> CacheInfo:
    """Return hit and miss counts and the size of the count cache.

    Only texts of at least CACHE_MIN_CHARS characters under an exact tokenizer
    go through the cache, so only they count as hits or misses.
    """
    return _count_cache.info()


def _text_digest(text: str) -> bytes:
    # surrogatepass keeps lone surrogates, which tiktoken accepts, from raising,
    # and keeps texts that differ only in them apart.
    data = text.encode("utf-8", "surrogatepass")
    return hashlib.blake2b(data, digest_size=32).digest()


def _count_exact(tokenizer: str, text: str) -> tuple[int, bool]:
    """Count with tiktoken; the flag is True when the count is an estimate."""
    encoding = _get_encoding(tokenizer)
    if len(text) < CACHE_MIN_CHARS:
        return _encode_count(encoding, text)

    key = (tokenizer, _text_digest(text))
    tokens = _count_cache.get(key)
    if tokens is not None:
        return tokens, False
    # Encoding runs outside the cache lock. Two threads that miss on the
    # same text both encode it and store the same count.
    if len(text) <= LONG_TEXT_CHARS:
        tokens, estimated = _encode_count(encoding, text)
    else:
        with _long_encodings:
            tokens, estimated = _encode_count(encoding, text)
    if not estimated:
        _count_cache.put(key, tokens)
    return tokens, estimated


def _encode_count(encoding: tiktoken.Encoding, text: str) -> tuple[int, bool]:
    if len(text) <= EXACT_MAX_CHARS:
        try:
            return len(encoding.encode_ordinary(text)), False
        except BaseException as error:
            # tiktoken's Rust code overflows its stack on some million-character
            # whitespace runs and raises a PanicException, a BaseException.
            if isinstance(error, KeyboardInterrupt | SystemExit | GeneratorExit):
                raise
    return _count_pieces(encoding, text, CHUNK_CHARS), True


def _count_pieces(encoding: tiktoken.Encoding, text: str, size: int) -> int:
    """Count text in pieces of at most `size` characters, cut after whitespace."""
    total = 0
    start = 0
    while start < len(text):
        end = min(start + size, len(text))
        if end < len(text):
            cut = max(text.rfind(" ", start, end), text.rfind("\n", start, end))
            if cut > start + size // 2:
                end = cut + 1
        total += _count_piece(encoding, text[start:end])
        start = end
    return total


def _count_piece(encoding: tiktoken.Encoding, piece: str) -> int:
    try:
        return len(encoding.encode_ordinary(piece))
    except BaseException as error:
        if isinstance(error, KeyboardInterrupt | SystemExit | GeneratorExit):
            raise
    if len(piece) > MIN_CHUNK_CHARS:
        return _count_pieces(encoding, piece, len(piece) // 2)
    return _count_approximate(piece, DEFAULT_CHARS_PER_TOKEN)


def _validate_chars_per_token(chars_per_token: Decimal | None) -> Decimal:
    if chars_per_token is None:
        return DEFAULT_CHARS_PER_TOKEN
    if not isinstance(chars_per_token, Decimal):
        raise TypeError(
            f"chars_per_token must be a Decimal, got {type(chars_per_token).__name__}"
            f" {chars_per_token!r}."
        )
    if not chars_per_token.is_finite() or chars_per_token <= 0:
        raise ValueError(
            f"chars_per_token must be a positive finite number, got {chars_per_token}."
        )
    return chars_per_token


def _count_approximate(text: str, chars_per_token: Decimal) -> int:
    # ceil(len / chars_per_token) in exact integer arithmetic, because a
    # Decimal division would first round to the thread's context precision.
    numerator, denominator = chars_per_token.as_integer_ratio()
    return -(-(len(text) * denominator) // numerator)


def count_text(
    tokenizer: str, text: str, chars_per_token: Decimal | None = None
) -> TokenCount:
    """Count the tokens of text under the named tokenizer.

    The exact tokenizers encode special-token strings such as "<|endoftext|>"
    as ordinary text, as tiktoken's encode_ordinary does, so user prompts that
    contain them are counted and never rejected. The approximate tokenizer
    returns ceil(len(text) / chars_per_token), counting Unicode code points,
    with estimated=True. chars_per_token defaults to DEFAULT_CHARS_PER_TOKEN
    and the exact tokenizers ignore it after validating it.

    Raises:
        UnknownTokenizerError: tokenizer is not in TOKENIZERS.
        ValueError: chars_per_token is zero, negative, infinite or NaN.
        TokenizerFileError: the encoding loads on this call and its file is
            missing or corrupted.
    """
    _check_tokenizer(tokenizer)
    ratio = _validate_chars_per_token(chars_per_token)

    if tokenizer == APPROXIMATE:
        return TokenCount(_count_approximate(text, ratio), estimated=True)
    tokens, estimated = _count_exact(tokenizer, text)
    return TokenCount(tokens, estimated=estimated)


def count_messages(
    tokenizer: str,
    messages: Sequence[ChatMessage],
    chars_per_token: Decimal | None = None,
) -> TokenCount:
    """Count the prompt tokens of a chat request as OpenAI's chat models do.

    Each message costs TOKENS_PER_MESSAGE plus the tokens of its role, content
    and name, and TOKENS_PER_NAME more when name is set. The reply primer adds
    TOKENS_PER_REPLY, so an empty list counts 3. The approximate tokenizer
    applies the same overhead to approximate counts of each field. OpenAI
    calls this rule an estimate, because function definitions add tokens
    that it does not count and other models may frame messages differently.

    Raises:
        UnknownTokenizerError: tokenizer is not in TOKENIZERS.
        ValueError: chars_per_token is zero, negative, infinite or NaN.
        TokenizerFileError: the encoding loads on this call and its file is
            missing or corrupted.
    """
    _check_tokenizer(tokenizer)
    ratio = _validate_chars_per_token(chars_per_token)

    estimated = tokenizer == APPROXIMATE

    def count(text: str) -> int:
        nonlocal estimated
        if tokenizer == APPROXIMATE:
            return _count_approximate(text, ratio)
        tokens, rough = _count_exact(tokenizer, text)
        estimated = estimated or rough
        return tokens

    total = TOKENS_PER_REPLY
    for message in messages:
        total += TOKENS_PER_MESSAGE + count(message.role) + count(message.content)
        if message.name:
            total += count(message.name) + TOKENS_PER_NAME
    return TokenCount(total, estimated=estimated)
