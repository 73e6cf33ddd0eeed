"""Tests for spendgate.tokens: exact counts, chat overhead, cache and file checks."""

from __future__ import annotations

import hashlib
import random
import shutil
import threading
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path

import pytest
import tiktoken
import tiktoken.load

from spendgate import tokens
from spendgate.tokens import ChatMessage, TokenCount

PACKAGED = Path(tokens.__file__).parent / "tokenizers"
EXACT = ("o200k_base", "cl100k_base")

# 2,000 lines (76,397 characters) of ASCII, accented Latin, CJK and numbers.
LONG_TEXT = "".join(
    f"Line {i}: café №{i * 7919 % 10007} — ünïcödé 東京 {i:x}\n" for i in range(2000)
)


def _reject_download(blobpath: str) -> bytes:
    raise AssertionError(
        f"tiktoken tried to download {blobpath}, so its cache file is missing."
        " Tests must run offline."
    )


@pytest.fixture(scope="module")
def reference(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, tiktoken.Encoding]]:
    """Load tiktoken's own encodings from the packaged files, offline.

    tiktoken looks for a cached copy named by the SHA-1 of the download URL in
    TIKTOKEN_CACHE_DIR (tiktoken 0.14.0, tiktoken/load.py). Its fetch function
    is replaced, so a cache miss fails the test instead of downloading.
    """
    cache_dir = tmp_path_factory.mktemp("tiktoken-cache")
    with pytest.MonkeyPatch.context() as patch:
        for name in EXACT:
            url = (
                f"https://openaipublic.blob.core.windows.net/encodings/{name}.tiktoken"
            )
            cache_name = hashlib.sha1(url.encode()).hexdigest()
            shutil.copyfile(PACKAGED / f"{name}.tiktoken", cache_dir / cache_name)
        patch.setenv("TIKTOKEN_CACHE_DIR", str(cache_dir))
        patch.setattr(tiktoken.load, "read_file", _reject_download)

        yield {name: tiktoken.get_encoding(name) for name in EXACT}


@pytest.mark.parametrize(
    ("text", "o200k", "cl100k"),
    [
        pytest.param("hello world", 2, 2, id="hello"),
        pytest.param("", 0, 0, id="empty"),
        pytest.param("tiktoken is great!", 6, 6, id="cookbook"),
        pytest.param("Grüße aus Köln, schöne Straße!", 9, 11, id="german"),
        pytest.param("お誕生日おめでとう", 8, 9, id="japanese"),
        pytest.param("I 💙 tokens 🚀🚀", 8, 10, id="emoji"),
        pytest.param("def f(x):\n    return x ** 2  # square\r\n", 14, 14, id="code"),
        pytest.param("1234567890 3.14159", 9, 9, id="digits"),
        pytest.param(LONG_TEXT, 36247, 46247, id="long"),
    ],
)
def test_count_text_known(text: str, o200k: int, cl100k: int) -> None:
    assert tokens.count_text("o200k_base", text) == TokenCount(o200k, estimated=False)
    assert tokens.count_text("cl100k_base", text) == TokenCount(cl100k, estimated=False)


@pytest.mark.parametrize("tokenizer", EXACT)
def test_count_text_special_tokens(tokenizer: str) -> None:
    text = "<|endoftext|> and <|endofprompt|>"

    count = tokens.count_text(tokenizer, text)

    expected = {"o200k_base": 15, "cl100k_base": 14}[tokenizer]
    assert count.tokens == expected


@pytest.mark.parametrize("tokenizer", EXACT)
def test_count_text_lone_surrogate(
    tokenizer: str, reference: dict[str, tiktoken.Encoding]
) -> None:
    short = "a\ud800b"
    long = "a" * tokens.CACHE_MIN_CHARS + "\ud800"

    short_count = tokens.count_text(tokenizer, short)
    long_count = tokens.count_text(tokenizer, long)

    assert short_count.tokens == len(reference[tokenizer].encode_ordinary(short))
    assert long_count.tokens == len(reference[tokenizer].encode_ordinary(long))


@pytest.mark.parametrize("tokenizer", EXACT)
def test_count_messages_total(tokenizer: str) -> None:
    messages = [
        ChatMessage("system", "You are a helpful assistant."),
        ChatMessage("user", "What is the capital of France?", name="example_user"),
    ]

    count = tokens.count_messages(tokenizer, messages)

    # Reply primer 3. System: 3 + role 1 + content 6. User: 3 + role 1 +
    # content 7 + name 2 + 1 for having a name. Same in both encodings.
    assert count == TokenCount(3 + (3 + 1 + 6) + (3 + 1 + 7 + 2 + 1), estimated=False)


def test_count_messages_cookbook() -> None:
    # The worked example of the OpenAI cookbook "How to count tokens with
    # tiktoken", for which the API reported 129 prompt tokens on gpt-4-0613.
    messages = [
        ChatMessage(
            "system",
            "You are a helpful, pattern-following assistant that translates "
            "corporate jargon into plain English.",
        ),
        ChatMessage(
            "system", "New synergies will help drive top-line growth.", "example_user"
        ),
        ChatMessage(
            "system",
            "Things working well together will increase revenue.",
            "example_assistant",
        ),
        ChatMessage(
            "system",
            "Let's circle back when we have more bandwidth to touch base on "
            "opportunities for increased leverage.",
            "example_user",
        ),
        ChatMessage(
            "system",
            "Let's talk later when we're less busy about how to do better.",
            "example_assistant",
        ),
        ChatMessage(
            "user",
            "This late pivot means we don't have time to boil the ocean for the "
            "client deliverable.",
        ),
    ]

    count = tokens.count_messages("cl100k_base", messages)

    assert count == TokenCount(129, estimated=False)


def test_count_messages_empty() -> None:
    count = tokens.count_messages("o200k_base", [])

    assert count == TokenCount(tokens.TOKENS_PER_REPLY, estimated=False)


def test_count_messages_approximate() -> None:
    messages = [
        ChatMessage("system", "You are a helpful assistant."),
        ChatMessage("user", "What is the capital of France?", name="example_user"),
    ]

    count = tokens.count_messages("approximate", messages)

    # At 4 characters a token: system 6 -> 2, content 28 -> 7, user 4 -> 1,
    # content 30 -> 8, name 12 -> 3.
    assert count == TokenCount(3 + (3 + 2 + 7) + (3 + 1 + 8 + 3 + 1), estimated=True)


@pytest.mark.parametrize("tokenizer", EXACT)
def test_count_messages_special_tokens(tokenizer: str) -> None:
    messages = [ChatMessage("user", "<|endoftext|>")]

    count = tokens.count_messages(tokenizer, messages)

    # "<|endoftext|>" as ordinary text is 7 tokens in both encodings.
    assert count == TokenCount(3 + (3 + 1 + 7), estimated=False)


@pytest.mark.parametrize(
    ("text", "chars_per_token", "expected"),
    [
        pytest.param("", None, 0, id="empty"),
        pytest.param("abc", None, 1, id="under-one"),
        pytest.param("abcd", None, 1, id="exactly-one"),
        pytest.param("abcde", None, 2, id="ceil-default"),
        pytest.param("お誕生日おめでとう", None, 3, id="code-points"),
        pytest.param("x" * 10, Decimal("2.5"), 4, id="fraction-exact"),
        pytest.param("x" * 11, Decimal("2.5"), 5, id="fraction-ceil"),
        pytest.param("x" * 10, Decimal("3.3"), 4, id="ceil-small-remainder"),
        pytest.param("abc", Decimal("0.5"), 6, id="below-one"),
        # 10 / 0.999... (29 nines) is just above 10. Decimal division at the
        # default 28-digit precision rounds it to 10, which would lose the ceil.
        pytest.param("x" * 10, Decimal("0." + "9" * 29), 11, id="beyond-precision"),
    ],
)
def test_count_text_approximate(
    text: str, chars_per_token: Decimal | None, expected: int
) -> None:
    count = tokens.count_text("approximate", text, chars_per_token)

    assert count == TokenCount(expected, estimated=True)


@pytest.mark.parametrize(
    "chars_per_token",
    [
        pytest.param(Decimal(0), id="zero"),
        pytest.param(Decimal(-4), id="negative"),
        pytest.param(Decimal("NaN"), id="nan"),
        pytest.param(Decimal("Infinity"), id="infinity"),
    ],
)
def test_chars_per_token_invalid(chars_per_token: Decimal) -> None:
    with pytest.raises(ValueError, match="chars_per_token must be a positive finite"):
        tokens.count_text("approximate", "text", chars_per_token)


def test_chars_per_token_float() -> None:
    with pytest.raises(TypeError, match="chars_per_token must be a Decimal, got float"):
        tokens.count_text("approximate", "text", 4.0)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda: tokens.count_text("gpt2", "x"), id="count_text"),
        pytest.param(lambda: tokens.count_messages("gpt2", []), id="count_messages"),
        pytest.param(lambda: tokens.preload(["o200k_base", "gpt2"]), id="preload"),
    ],
)
def test_unknown_tokenizer(call: Callable[[], object]) -> None:
    with pytest.raises(tokens.UnknownTokenizerError) as caught:
        call()

    assert isinstance(caught.value, ValueError)
    assert "'gpt2'" in str(caught.value)
    assert "o200k_base, cl100k_base, approximate" in str(caught.value)


def test_preload_loads_encodings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokens, "_encodings", {})

    tokens.preload(["approximate", "cl100k_base"])

    assert set(tokens._encodings) == {"cl100k_base"}


def test_load_corrupted_file(tmp_path: Path) -> None:
    corrupted = tmp_path / "o200k_base.tiktoken"
    data = bytearray((PACKAGED / "o200k_base.tiktoken").read_bytes())
    data[len(data) // 2] ^= 0x01
    corrupted.write_bytes(bytes(data))

    with pytest.raises(tokens.TokenizerFileError) as caught:
        tokens._load_encoding("o200k_base", tmp_path)

    message = str(caught.value)
    assert str(corrupted) in message
    assert "failed the SHA-256 check" in message
    assert "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d" in message


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(tokens.TokenizerFileError, match="could not be read") as caught:
        tokens._load_encoding("cl100k_base", tmp_path)

    assert caught.value.path == str(tmp_path / "cl100k_base.tiktoken")


def test_load_copied_file(tmp_path: Path) -> None:
    shutil.copyfile(
        PACKAGED / "cl100k_base.tiktoken", tmp_path / "cl100k_base.tiktoken"
    )

    encoding = tokens._load_encoding("cl100k_base", tmp_path)

    assert len(encoding.encode_ordinary("hello world")) == 2


@pytest.mark.parametrize("tokenizer", EXACT)
def test_cache_hit_long_text(tokenizer: str) -> None:
    text = f"cache hit test for {tokenizer}\n" + LONG_TEXT
    before = tokens.cache_info()

    first = tokens.count_text(tokenizer, text)
    after_first = tokens.cache_info()
    second = tokens.count_text(tokenizer, text)
    after_second = tokens.cache_info()

    assert second == first
    assert after_first.misses == before.misses + 1
    assert after_first.hits == before.hits
    assert after_second.hits == before.hits + 1
    assert after_second.misses == before.misses + 1


def test_cache_keys_tokenizer() -> None:
    text = "cache key test\n" + LONG_TEXT

    o200k = tokens.count_text("o200k_base", text)
    cl100k = tokens.count_text("cl100k_base", text)

    assert o200k.tokens != cl100k.tokens


def test_cache_skips_short_text() -> None:
    text = "s" * (tokens.CACHE_MIN_CHARS - 1)
    before = tokens.cache_info()

    tokens.count_text("o200k_base", text)
    tokens.count_text("o200k_base", text)

    after = tokens.cache_info()
    assert after.hits == before.hits
    assert after.misses == before.misses


def test_cache_stores_digest_only() -> None:
    tokens.count_text("o200k_base", "digest only test\n" + LONG_TEXT)

    keys = list(tokens._count_cache._counts)

    assert keys
    for tokenizer, digest in keys:
        assert tokenizer in EXACT
        assert isinstance(digest, bytes)
        assert len(digest) == 32


def test_cache_evicts_least_recent() -> None:
    cache = tokens._CountCache(maxsize=2)
    cache.put(("o200k_base", b"a"), 1)
    cache.put(("o200k_base", b"b"), 2)

    assert cache.get(("o200k_base", b"a")) == 1
    cache.put(("o200k_base", b"c"), 3)

    assert cache.get(("o200k_base", b"b")) is None
    assert cache.get(("o200k_base", b"a")) == 1
    assert cache.get(("o200k_base", b"c")) == 3
    assert cache.info() == tokens.CacheInfo(hits=3, misses=1, maxsize=2, currsize=2)


def test_concurrent_first_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokens, "_encodings", {})
    barrier = threading.Barrier(8)
    loaded: list[tiktoken.Encoding] = []

    def load() -> None:
        barrier.wait()
        loaded.append(tokens._get_encoding("cl100k_base"))

    threads = [threading.Thread(target=load) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(loaded) == 8
    assert all(encoding is loaded[0] for encoding in loaded)


@pytest.mark.parametrize("name", EXACT)
def test_encoding_matches_tiktoken(
    name: str, reference: dict[str, tiktoken.Encoding]
) -> None:
    ours = tokens._get_encoding(name)
    theirs = reference[name]

    assert ours._pat_str == theirs._pat_str
    assert ours._special_tokens == theirs._special_tokens
    assert ours._mergeable_ranks == theirs._mergeable_ranks
    assert ours.n_vocab == theirs.n_vocab


def _equivalence_texts() -> list[str]:
    # Characters from every class the split patterns treat apart: letter cases,
    # marks, digits, punctuation, line breaks, other whitespace and emoji.
    pool = "aZé ÉßΩж東京\u0301\u200d0123456789 \t\r\n\n.,;'\"/-_()<|>👩🚀"
    generator = random.Random(20240601)
    noise = "".join(generator.choice(pool) for _ in range(20000))
    return [
        "I'm sure you're right, they'LL say it's theirs and WE'VE agreed.",
        "HTTPServer parseJSON CamelCaseWords ALLCAPS iPhone",
        "12345678901234567890 3.14159 1,000,000",
        "a  \t\n\n  b   \r\n\r\n  end   ",
        "naïve café Здравствуй, мир مرحبا بالعالم नमस्ते दुनिया",
        "family 👩‍👩‍👧‍👦 e\u0301 flags 🇫🇷",
        "https://example.com/a/b?c=d&e=f /usr/bin//x",
        "<|endoftext|><|fim_prefix|><|endofprompt|>",
        LONG_TEXT,
        noise,
    ]


@pytest.mark.parametrize("name", EXACT)
def test_tokens_match_tiktoken(
    name: str, reference: dict[str, tiktoken.Encoding]
) -> None:
    ours = tokens._get_encoding(name)
    theirs = reference[name]

    for text in _equivalence_texts():
        assert ours.encode_ordinary(text) == theirs.encode_ordinary(text), text[:60]
        count = tokens.count_text(name, text).tokens
        assert count == len(theirs.encode_ordinary(text)), text[:60]


def test_count_text_whitespace_run_survives() -> None:
    # tiktoken overflows its stack on a million-tab run; the count falls back
    # to pieces instead of failing the request.
    counted = tokens.count_text("o200k_base", "\t" * 1_000_000)

    assert counted.estimated
    assert counted.tokens > 0


def test_count_text_over_exact_limit_estimated() -> None:
    phrase = "spendgate counts tokens. "
    repeats = tokens.EXACT_MAX_CHARS // len(phrase) + 10
    thousand = tokens.count_text("o200k_base", phrase * 1000).tokens
    next_thousand = tokens.count_text("o200k_base", phrase * 2000).tokens - thousand
    expected = thousand + (repeats - 1000) * next_thousand / 1000

    counted = tokens.count_text("o200k_base", phrase * repeats)

    # Each cut between pieces may change the count by a token or two.
    pieces = len(phrase) * repeats // tokens.CHUNK_CHARS + 1
    assert counted.estimated
    assert abs(counted.tokens - expected) <= 2 * pieces
