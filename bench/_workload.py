"""The requests the benchmark sends: prompts of set sizes and the Check/Commit pair."""

from __future__ import annotations

import itertools
import random
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

from spendgate import tokens
from spendgate.v1 import spendgate_pb2 as pb

MODEL = "gpt-4.1-mini"
TOKENIZER = "o200k_base"
DEPARTMENT = "engineering"
TEAM = "platform"
MAX_OUTPUT_TOKENS = 1024
# Output tokens each Commit reports as the model's usage.
COMMIT_OUTPUT_TOKENS = 300

CHECK_PATH = "/spendgate.v1.SpendGate/Check"
COMMIT_PATH = "/spendgate.v1.SpendGate/Commit"

_VOCABULARY = (
    "the a of to and in for on with as by from at that this it is are was "
    "be budget model request token prompt answer customer order invoice "
    "contract team user report quarter revenue cost price market product "
    "service data system policy review release support ticket account "
    "payment refund error search result document section clause summary "
    "question context source engineer manager analyst deadline meeting "
    "project plan risk change update shows needs returns includes "
    "describes explains covers lists compares new large small early late "
    "higher lower monthly weekly daily internal public legal financial "
    "technical second final first last each every because however "
    "therefore while after before during within between "
)
_WORDS = tuple(_VOCABULARY.split())


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(_WORDS) for _ in range(rng.randint(8, 20))]
    words[0] = words[0].capitalize()
    return " ".join(words) + rng.choice((".", ".", ".", "?", ";"))


def make_text(target_tokens: int, seed: int) -> str:
    """Return English-like text of about `target_tokens` o200k_base tokens.

    Sentences are counted one at a time, so the total can differ from a
    count of the whole text by a few tokens at sentence joins.
    """
    rng = random.Random(seed)
    parts: list[str] = []
    total = 0
    while total < target_tokens:
        sentence = _sentence(rng)
        if rng.random() < 0.08:
            sentence += "\n\n"
        parts.append(sentence)
        total += tokens.count_text(TOKENIZER, " " + sentence).tokens
    return " ".join(parts)


@cache
def rag_document() -> str:
    """Return a retrieved-context document of about 100,000 tokens."""
    chunks = [
        f"[Document {index}]\n{make_text(1_000, seed=1_000 + index)}"
        for index in range(100)
    ]
    return "\n\n".join(chunks)


@cache
def _typical_body() -> str:
    return make_text(990, seed=2)


@cache
def _chat_parts() -> tuple[str, str]:
    return make_text(50, seed=3), make_text(130, seed=4)


RequestBuilder = Callable[[str, str, int], pb.CheckRequest]


def _base(request_id: str, user: str) -> pb.CheckRequest:
    return pb.CheckRequest(
        request_id=request_id,
        principal=pb.Principal(
            department=DEPARTMENT, team=TEAM, user=user, application="bench"
        ),
        model=MODEL,
        max_output_tokens=MAX_OUTPUT_TOKENS,
        labels={"feature": "bench"},
    )


def _chat(request_id: str, user: str, seq: int) -> pb.CheckRequest:
    system, question = _chat_parts()
    request = _base(request_id, user)
    request.messages.messages.extend(
        [
            pb.ChatMessage(role="system", content=system),
            pb.ChatMessage(role="user", content=f"Ticket {seq}: {question}"),
        ]
    )
    return request


def _typical(request_id: str, user: str, seq: int) -> pb.CheckRequest:
    request = _base(request_id, user)
    # A prefix of its own makes every prompt a new text, as real prompts are,
    # so the count cache (texts of 4,096 characters and more) never hits.
    request.prompt = f"Request {request_id} of {user}.\n{_typical_body()}"
    return request


def _rag_same(request_id: str, user: str, seq: int) -> pb.CheckRequest:
    system, _ = _chat_parts()
    request = _base(request_id, user)
    request.messages.messages.extend(
        [
            pb.ChatMessage(role="system", content=system),
            pb.ChatMessage(role="user", content=rag_document()),
            pb.ChatMessage(role="user", content=f"Question {seq}: what changed?"),
        ]
    )
    return request


def _rag_new(request_id: str, user: str, seq: int) -> pb.CheckRequest:
    request = _base(request_id, user)
    request.prompt = f"Question {request_id}: what changed?\n\n{rag_document()}"
    return request


def _client_count(request_id: str, user: str, seq: int) -> pb.CheckRequest:
    request = _base(request_id, user)
    request.input_tokens = 1_000
    return request


@dataclass(frozen=True)
class Scenario:
    """One kind of Check request the benchmark measures."""

    name: str
    description: str
    build: RequestBuilder
    # Each call of a heavy scenario takes milliseconds of token counting, so
    # its sequential run makes fewer calls.
    heavy: bool = False


SCENARIOS = (
    Scenario("chat", "chat prompt, ~200 tokens as 2 messages", _chat),
    Scenario("typical", "prompt of ~1,000 tokens", _typical),
    Scenario(
        "rag",
        "~100,000-token document as a message, the same each call",
        _rag_same,
        heavy=True,
    ),
    Scenario(
        "rag-new",
        "~100,000-token prompt, a new text each call",
        _rag_new,
        heavy=True,
    ),
    Scenario("count", "input_tokens=1000 sent by the client", _client_count),
)


@dataclass(frozen=True)
class Method:
    """One unary RPC: its path and its message codecs."""

    path: str
    serializer: Callable[[Any], bytes]
    deserializer: Callable[[bytes], Any]


class CheckCommit:
    """The spendgate workload: Check, then Commit of its reservation.

    With several scenarios, call `seq` of each client uses scenario
    `seq` modulo their number, which gives the soak its mixed load.
    """

    first = Method(
        CHECK_PATH, pb.CheckRequest.SerializeToString, pb.CheckResponse.FromString
    )
    second: Method | None = Method(
        COMMIT_PATH, pb.CommitRequest.SerializeToString, pb.CommitResponse.FromString
    )

    def __init__(self, *scenarios: Scenario) -> None:
        if not scenarios:
            raise ValueError("CheckCommit needs at least one scenario")
        self.scenarios = scenarios
        # A request id seen before makes Check replay its stored decision, so
        # ids combine a random run prefix with a counter shared by all clients
        # (next() on itertools.count is atomic under the GIL).
        self._run = secrets.token_hex(4)
        self._ids = itertools.count()

    def first_request(self, client: int, seq: int) -> pb.CheckRequest:
        """Build the Check of call `seq` of client `client`."""
        scenario = self.scenarios[seq % len(self.scenarios)]
        request_id = f"{self._run}-{scenario.name}-{next(self._ids)}"
        return scenario.build(request_id, f"user-{client:02d}", seq)

    def second_request(self, first_response: pb.CheckResponse) -> pb.CommitRequest:
        """Build the Commit that settles the Check's reservation."""
        return pb.CommitRequest(
            reservation_id=first_response.reservation_id,
            input_tokens=first_response.input_tokens,
            output_tokens=COMMIT_OUTPUT_TOKENS,
        )

    def outcome(self, first_response: pb.CheckResponse) -> str:
        """Return the decision name, so a run can show that nothing was denied."""
        return str(pb.Decision.Name(first_response.decision))


class EchoPair:
    """The floor workload: two echoes sized like a Check and its Commit."""

    second: Method | None

    def __init__(
        self,
        echo_pb2: Any,
        request_sizes: tuple[int, int],
        reply_sizes: tuple[int, int],
    ) -> None:
        self._messages = echo_pb2
        self._payloads = (bytes(request_sizes[0]), bytes(request_sizes[1]))
        self._reply_sizes = reply_sizes
        path = "/spendgate_bench.v1.Echo/Echo"
        self.first = Method(
            path,
            echo_pb2.EchoRequest.SerializeToString,
            echo_pb2.EchoReply.FromString,
        )
        self.second = self.first

    def first_request(self, client: int, seq: int) -> Any:
        """Build the echo that stands for the Check."""
        return self._messages.EchoRequest(
            payload=self._payloads[0], reply_size=self._reply_sizes[0]
        )

    def second_request(self, first_response: Any) -> Any:
        """Build the echo that stands for the Commit."""
        return self._messages.EchoRequest(
            payload=self._payloads[1], reply_size=self._reply_sizes[1]
        )

    def outcome(self, first_response: Any) -> str:
        """Return "OK": an echo has no decision."""
        return "OK"
