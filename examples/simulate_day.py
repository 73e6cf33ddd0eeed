"""Send a day of simulated model-call traffic through a running spendgate server.

Every simulated call does what an application does: Check before the model
call, then Commit the usage the provider reported, or Release when the call
failed. The traffic follows the example policies in policies/: six
departments, their teams and users, the models they ask for, and prompts from
a few words to retrieval-augmented (RAG) prompts of tens of thousands of
tokens. The calls run back to back, without the seconds a real model takes.
The default 1,000 calls took 11 to 17 seconds against a server on a local
SQLite file, on a 2-core container shared with other work.

    make migrate
    .venv/bin/spendgate serve --address 127.0.0.1:50071 &
    .venv/bin/python examples/simulate_day.py --address 127.0.0.1:50071

The same --seed sends the same requests. The decisions can still differ
between runs, because budgets keep what earlier runs of the same day spent,
and because concurrent calls reach the ledger in varying order.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import random
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import TextIO

import grpc

from spendgate.v1 import spendgate_pb2 as pb
from spendgate.v1 import spendgate_pb2_grpc as pb_grpc

DEFAULT_ADDRESS = "127.0.0.1:50051"
DEFAULT_REQUESTS = 1000
DEFAULT_CONCURRENCY = 8
RPC_TIMEOUT_SECONDS = 30.0
CONNECT_TIMEOUT_SECONDS = 5.0
# Share of allowed calls whose model call fails and is released, and of calls
# whose application crashes before it settles. The server expires those after
# the policy's reservation_ttl.
RELEASE_RATE = 0.03
ABANDON_RATE = 0.005
# Share of requests for a misspelled model, or from an application that sends
# a department the policy does not define.
UNKNOWN_MODEL_RATE = 0.004
UNKNOWN_DEPARTMENT_RATE = 0.004

_WORD_TEXT = """
account action adapter agent alert analysis answer api approval archive audit
balance batch billing branch budget build bundle cache campaign capacity case
change channel checkout claim client cluster code commit compliance config
contract control cost coverage customer dashboard data database deadline
delivery deployment design detail device discount document draft error
estimate event evidence export feature feedback field filter forecast format
function gateway guideline handler history incident index insight invoice
issue item job journal key label latency ledger license limit log margin
market merge message metric migration model module monitor network note
notice offer order owner package page partner payment pipeline plan platform
policy price priority process product profile project prompt proposal query
queue quota rate record refund region release report request research
response result retention revenue review risk role rollout route rule sample
schedule schema score search security segment server service session signal
source spend stage standard status storage strategy summary supplier support
system table target task team template tenant test ticket timeline token
trace transfer trend update usage user value vendor version warning window
workflow accepted active annual automatic average blocked careful clear
critical current daily detailed early expected external final formal full
general global internal key large late legal local main manual monthly new
open pending primary private public quarterly quick recent regular remote
required secure shared short simple small stable strict total urgent valid
weekly added applied assigned checked closed created deleted failed fixed
found linked loaded measured moved noted opened paid planned raised reduced
removed reported resolved scheduled sent signed started stored tested updated
verified across after against before between during for from into over per
through under with within without the a an and or but so because if when
"""
WORDS = _WORD_TEXT.split()
_FIRST_NAME_TEXT = """
ada ali ana ben chen dana eli emma finn gita hana ivan jade jon kai kim lea
leo lina luca maya mia nia noor omar owen priya raj rosa sam sara tao tom
uma vera wei yara yuki zoe
"""
FIRST_NAMES = _FIRST_NAME_TEXT.split()
_SURNAME_TEXT = "abe bauer cruz diaz ek fox gray hill ito jung khan lund mora ng ortiz"
SURNAMES = _SURNAME_TEXT.split()


@dataclass(frozen=True, slots=True)
class TeamProfile:
    """Traffic profile of one team, with weights as relative shares."""

    department: str
    team: str
    application: str
    users: tuple[str, ...]
    share: int
    models: tuple[tuple[str, int], ...]
    workloads: tuple[tuple[str, int], ...]
    # Largest RAG prompt this team sends, in tokens.
    max_context_tokens: int = 30_000


def people(prefix: str, count: int) -> tuple[str, ...]:
    """Return `count` user names, the same for every run and seed."""
    rng = random.Random(f"users:{prefix}")
    names: list[str] = []
    while len(names) < count:
        name = f"{rng.choice(FIRST_NAMES)}.{rng.choice(SURNAMES)}"
        if name not in names:
            names.append(name)
    return tuple(names)


# Workloads: chat messages, a plain prompt, a question over retrieved
# documents (RAG), a token count the client computed, and a long-context
# call whose client-counted input is half to all of max_context_tokens.
CHAT, PROMPT, RAG, COUNTED, LONG = "chat", "prompt", "rag", "counted", "long"

# Some requests name a model the team may not use, a legacy model or one over
# a per-request cap, so the run shows downgrades and denials as well.
PROFILES = (
    # A coding agent that sends a whole repository on every step, as the
    # user "repo-agent". It spends the engineering per-user daily budget
    # within the run, and its requests move to cheaper models, then are denied.
    TeamProfile(
        "engineering",
        "",
        "repo-agent",
        ("repo-agent",),
        6,
        (("claude-opus-4-1", 1),),
        ((LONG, 1),),
        max_context_tokens=110_000,
    ),
    TeamProfile(
        "engineering",
        "",
        "code-assistant",
        people("engineering", 40),
        10,
        (
            ("claude-sonnet-4", 30),
            ("gpt-5", 15),
            ("gpt-4.1", 10),
            ("o3", 5),
            ("gemini-2.5-pro", 5),
            ("claude-opus-4-1", 4),
            ("gpt-4-turbo", 2),
            ("deepseek-v3", 1),
        ),
        ((CHAT, 40), (RAG, 25), (PROMPT, 25), (COUNTED, 10)),
        max_context_tokens=140_000,
    ),
    TeamProfile(
        "engineering",
        "platform",
        "code-assistant",
        people("platform", 25),
        8,
        (("claude-sonnet-4", 40), ("gpt-5", 25), ("o3", 10), ("claude-opus-4-1", 5)),
        ((CHAT, 40), (RAG, 30), (PROMPT, 30)),
        max_context_tokens=60_000,
    ),
    TeamProfile(
        "engineering",
        "search",
        "ranking-jobs",
        people("search", 12),
        5,
        (
            ("gpt-4.1-mini", 40),
            ("gpt-4o-mini", 20),
            ("claude-sonnet-4", 20),
            ("gpt-5", 5),
        ),
        ((PROMPT, 50), (RAG, 30), (COUNTED, 20)),
    ),
    TeamProfile(
        "engineering",
        "mobile",
        "code-assistant",
        people("mobile", 10),
        4,
        (("claude-sonnet-4", 50), ("gpt-5-mini", 30), ("gpt-4o", 20)),
        ((CHAT, 60), (PROMPT, 40)),
    ),
    TeamProfile(
        "engineering",
        "ci-automation",
        "review-bot",
        ("ci-review-bot", "test-triage-bot", "docs-bot"),
        8,
        (
            ("gpt-4.1-mini", 50),
            ("claude-3-5-haiku", 20),
            ("gpt-5-mini", 20),
            ("claude-sonnet-4", 10),
        ),
        ((COUNTED, 50), (RAG, 30), (PROMPT, 20)),
        max_context_tokens=40_000,
    ),
    TeamProfile(
        "support",
        "frontline",
        "support-copilot",
        people("frontline", 30),
        10,
        (
            ("gpt-4.1-mini", 50),
            ("claude-3-5-haiku", 20),
            ("gemini-2.5-flash", 20),
            ("claude-sonnet-4", 10),
        ),
        ((CHAT, 60), (RAG, 40)),
        max_context_tokens=40_000,
    ),
    TeamProfile(
        "support",
        "escalations",
        "support-copilot",
        people("escalations", 8),
        4,
        (("claude-sonnet-4", 60), ("gpt-5-mini", 30), ("o4-mini", 10)),
        ((CHAT, 50), (RAG, 50)),
        max_context_tokens=30_000,
    ),
    TeamProfile(
        "support",
        "help-center-bot",
        "help-center",
        # The help-center assistant sends no user.
        ("",),
        8,
        (("gpt-4.1-nano", 60), ("gemini-2.5-flash-lite", 30), ("gpt-4.1-mini", 10)),
        ((CHAT, 80), (RAG, 20)),
        max_context_tokens=12_000,
    ),
    TeamProfile(
        "finance",
        "fp-and-a",
        "forecast-notebook",
        people("fp-and-a", 12),
        3,
        (
            ("o4-mini", 40),
            ("gpt-5", 30),
            ("claude-sonnet-4", 20),
            ("gemini-2.5-pro", 10),
        ),
        ((CHAT, 40), (RAG, 40), (PROMPT, 20)),
        max_context_tokens=60_000,
    ),
    TeamProfile(
        "finance",
        "accounts-payable",
        "invoice-extractor",
        ("ap-invoice-pipeline",),
        5,
        (("gpt-4.1-mini", 90), ("gpt-4.1", 10)),
        ((COUNTED, 60), (PROMPT, 40)),
    ),
    TeamProfile(
        "finance",
        "internal-audit",
        "audit-assistant",
        people("internal-audit", 5),
        1,
        (("claude-sonnet-4", 60), ("gpt-5-mini", 40)),
        ((RAG, 60), (CHAT, 40)),
        max_context_tokens=50_000,
    ),
    TeamProfile(
        "legal",
        "contracts",
        "contract-review",
        people("contracts", 10),
        4,
        (("claude-sonnet-4", 60), ("claude-opus-4-1", 30), ("gpt-5", 10)),
        ((RAG, 60), (CHAT, 40)),
        max_context_tokens=150_000,
    ),
    TeamProfile(
        "legal",
        "compliance",
        "policy-qa",
        people("compliance", 8),
        2,
        (("claude-sonnet-4", 50), ("gpt-4.1-mini", 30), ("claude-opus-4-1", 20)),
        ((CHAT, 60), (RAG, 40)),
        max_context_tokens=20_000,
    ),
    TeamProfile(
        "legal",
        "intellectual-property",
        "contract-review",
        people("intellectual-property", 5),
        1,
        (("claude-sonnet-4", 70), ("gpt-5", 30)),
        ((RAG, 70), (CHAT, 30)),
        max_context_tokens=80_000,
    ),
    TeamProfile(
        "marketing",
        "content",
        "copy-studio",
        people("content", 15),
        4,
        (
            ("claude-sonnet-4", 40),
            ("gpt-4o", 30),
            ("gpt-5", 20),
            ("claude-opus-4-1", 10),
        ),
        ((CHAT, 60), (PROMPT, 40)),
    ),
    TeamProfile(
        "marketing",
        "growth",
        "ad-variants",
        people("growth", 8),
        4,
        (("gpt-4o-mini", 50), ("gemini-2.5-flash", 40), ("gpt-4o", 10)),
        ((PROMPT, 70), (COUNTED, 30)),
    ),
    TeamProfile(
        "marketing",
        "product-marketing",
        "copy-studio",
        people("product-marketing", 6),
        2,
        (("claude-sonnet-4", 50), ("gpt-4.1-mini", 50)),
        ((CHAT, 50), (RAG, 50)),
        max_context_tokens=40_000,
    ),
    TeamProfile(
        "research",
        "evals",
        "eval-harness",
        ("eval-runner", *people("evals", 6)),
        5,
        (
            ("gpt-5", 20),
            ("claude-sonnet-4", 20),
            ("claude-opus-4-1", 10),
            ("gemini-2.5-pro", 15),
            ("llama-3.3-70b", 15),
            ("deepseek-v3", 10),
            ("mistral-large", 10),
        ),
        ((COUNTED, 70), (RAG, 30)),
        max_context_tokens=60_000,
    ),
    TeamProfile(
        "research",
        "applied-ml",
        "notebook",
        people("applied-ml", 10),
        4,
        (("gpt-5", 30), ("o3", 20), ("claude-sonnet-4", 30), ("gemini-2.5-pro", 20)),
        ((CHAT, 40), (RAG, 30), (COUNTED, 30)),
        max_context_tokens=100_000,
    ),
    TeamProfile(
        "research",
        "interpretability",
        "notebook",
        people("interpretability", 6),
        2,
        (
            ("llama-3.3-70b", 40),
            ("deepseek-v3", 30),
            ("mistral-small-3.1", 20),
            ("claude-sonnet-4", 10),
        ),
        ((PROMPT, 50), (COUNTED, 50)),
    ),
)

# Median and spread (sigma of the log) of output tokens, per workload.
OUTPUT_SIZES = {
    CHAT: (250, 0.9),
    PROMPT: (400, 1.0),
    RAG: (600, 0.8),
    COUNTED: (300, 0.7),
    LONG: (1500, 0.6),
}


@dataclass(frozen=True, slots=True)
class Call:
    """One simulated model call, decided before the run from the seed."""

    index: int
    profile: TeamProfile
    department: str
    user: str
    model: str
    workload: str
    # The random state that builds the prompt and the usage, one per call.
    seed: str


@dataclass(slots=True)
class Outcome:
    """Result of one simulated call: its decision and how it was settled."""

    department: str
    decision: str = ""
    reason: str = ""
    shadowed: bool = False
    settled: str = ""
    cost_micros: int = 0
    error: str = ""


@dataclass(slots=True)
class DepartmentTotals:
    """Counts for the summary of one department."""

    checks: int = 0
    decisions: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    shadowed: int = 0
    cost_micros: int = 0


def loopback_address(text: str) -> str:
    """Return `text` when its host is a loopback address, or raise ValueError.

    Only localhost and literal loopback IPs pass, so the simulator never
    sends traffic to another machine. Names other than localhost are not
    resolved.
    """
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(
            f"address {text!r} must be HOST:PORT, such as {DEFAULT_ADDRESS}"
        )
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if bare.lower() == "localhost":
        return text
    try:
        loopback = ipaddress.ip_address(bare).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(
            f"address {text!r} is not a loopback address. The simulator only "
            "sends traffic to a server on this machine (127.0.0.1, ::1 or localhost)"
        )
    return text


def plan_calls(count: int, seed: int) -> list[Call]:
    """Draw `count` calls: department, team, user and model, reproducible by seed."""
    rng = random.Random(seed)
    shares = [profile.share for profile in PROFILES]
    calls = []
    for index in range(count):
        profile = rng.choices(PROFILES, weights=shares)[0]
        # A few people send most of a team's requests (Zipf weights).
        weights = [1 / rank for rank in range(1, len(profile.users) + 1)]
        user = rng.choices(profile.users, weights=weights)[0]
        names, model_weights = zip(*profile.models, strict=True)
        model = rng.choices(names, weights=model_weights)[0]
        kinds, kind_weights = zip(*profile.workloads, strict=True)
        workload = rng.choices(kinds, weights=kind_weights)[0]
        department = profile.department
        if rng.random() < UNKNOWN_MODEL_RATE:
            model = model.replace("-", "", 1) + "-turbo"
        if rng.random() < UNKNOWN_DEPARTMENT_RATE:
            department = "sales"
        calls.append(
            Call(index, profile, department, user, model, workload, f"{seed}:{index}")
        )
    return calls


def sentences(rng: random.Random, words: int) -> str:
    """Write about `words` words of sentences drawn from WORDS."""
    parts: list[str] = []
    written = 0
    while written < words:
        length = rng.randint(6, 22)
        chosen = rng.choices(WORDS, k=length)
        if rng.random() < 0.3:
            chosen.insert(rng.randrange(length), str(rng.randint(2, 99_999)))
        parts.append(" ".join(chosen).capitalize() + rng.choice(".......?:"))
        written += length
    return " ".join(parts)


def words_for_tokens(tokens: int) -> int:
    """Return how many words of `sentences` make about `tokens` tokens.

    The text of `sentences` measured 1.14 tokens per word with o200k_base.
    Models with an approximate tokenizer count about 1.8, because spendgate
    estimates those from the length in characters.
    """
    return max(1, int(tokens / 1.14))


def build_request(call: Call, run_id: str, rng: random.Random) -> pb.CheckRequest:
    """Build the CheckRequest of a call, with its prompt, messages or token count."""
    profile = call.profile
    request = pb.CheckRequest(
        request_id=f"simday-{run_id}-{call.index:06d}",
        principal=pb.Principal(
            department=call.department,
            team=profile.team,
            user=call.user,
            application=profile.application,
        ),
        model=call.model,
        labels={"source": "simulate_day", "run": run_id, "workload": call.workload},
    )
    if call.workload == CHAT:
        turns = rng.randint(1, 6)
        messages = [pb.ChatMessage(role="system", content=sentences(rng, 40))]
        for turn in range(turns):
            role = "user" if turn % 2 == 0 else "assistant"
            messages.append(
                pb.ChatMessage(role=role, content=sentences(rng, rng.randint(5, 180)))
            )
        request.messages.messages.extend(messages)
    elif call.workload == PROMPT:
        size = int(rng.lognormvariate(4.5, 1.2))
        request.prompt = sentences(rng, min(max(size, 3), 4000))
    elif call.workload == RAG:
        request.prompt = rag_prompt(rng, profile.max_context_tokens)
    elif call.workload == LONG:
        limit = profile.max_context_tokens
        request.input_tokens = rng.randint(limit // 2, limit)
    else:
        request.input_tokens = int(rng.lognormvariate(7.5, 1.0)) + 50
    if rng.random() < 0.6:
        request.max_output_tokens = rng.choice((512, 1024, 2048, 4096, 8192))
    return request


def rag_prompt(rng: random.Random, max_tokens: int) -> str:
    """Write a question over retrieved documents, 1,500 to `max_tokens` tokens."""
    # The median is 8,000 tokens, and about one prompt in ten is above 29,000.
    total = int(rng.lognormvariate(math.log(8_000), 1.0))
    total = min(max(total, 1_500), max_tokens)
    documents = rng.randint(3, 12)
    parts = ["Answer the question from the documents below. Cite document numbers."]
    for number in range(1, documents + 1):
        source = f"{rng.choice(WORDS)}/{rng.choice(WORDS)}-{rng.randint(1, 400)}"
        body = sentences(rng, words_for_tokens(total // documents))
        parts.append(f"Document {number} (source: {source}):\n{body}")
    parts.append("Question: " + sentences(rng, rng.randint(8, 30)))
    return "\n\n".join(parts)


def run_call(stub: pb_grpc.SpendGateStub, call: Call, run_id: str) -> Outcome:
    """Check one call, then Commit its usage, Release it or leave it open."""
    rng = random.Random(call.seed)
    outcome = Outcome(call.department)
    request = build_request(call, run_id, rng)
    try:
        response = stub.Check(request, timeout=RPC_TIMEOUT_SECONDS)
    except grpc.RpcError as error:
        outcome.error = f"Check: {error.code().name}"
        return outcome
    outcome.decision = pb.Decision.Name(response.decision).removeprefix("DECISION_")
    outcome.reason = response.reason_code
    outcome.shadowed = response.shadow
    if response.decision == pb.DECISION_DENY:
        return outcome

    fate = rng.random()
    try:
        if fate < ABANDON_RATE:
            outcome.settled = "open"
        elif fate < ABANDON_RATE + RELEASE_RATE:
            stub.Release(
                pb.ReleaseRequest(reservation_id=response.reservation_id),
                timeout=RPC_TIMEOUT_SECONDS,
            )
            outcome.settled = "released"
        else:
            committed = stub.Commit(
                usage(call, response, rng), timeout=RPC_TIMEOUT_SECONDS
            )
            outcome.settled = "committed"
            outcome.cost_micros = committed.cost_micros
    except grpc.RpcError as error:
        outcome.error = f"settle: {error.code().name}"
    return outcome


def usage(
    call: Call, response: pb.CheckResponse, rng: random.Random
) -> pb.CommitRequest:
    """Draw the usage a provider would report for an allowed call."""
    input_tokens = response.input_tokens
    if response.input_tokens_estimated:
        # The provider's own count differs from spendgate's estimate from the
        # prompt length.
        input_tokens = max(1, int(input_tokens * rng.uniform(0.85, 1.1)))
    cached = 0
    if call.workload in (CHAT, RAG) and rng.random() < 0.35:
        # A prompt-cache hit on the shared system prompt or documents.
        cached = int(input_tokens * rng.uniform(0.3, 0.9))
    median, sigma = OUTPUT_SIZES[call.workload]
    output = int(rng.lognormvariate(0, sigma) * median) + 1
    output = min(output, response.max_output_tokens or output)
    return pb.CommitRequest(
        reservation_id=response.reservation_id,
        input_tokens=input_tokens,
        cached_input_tokens=cached,
        output_tokens=output,
    )


class Progress:
    """Report finished calls on stderr: one updating line on a terminal."""

    def __init__(self, total: int, stream: TextIO) -> None:
        self.total = total
        self.stream = stream
        self.done = 0
        self.started = time.monotonic()
        self.terminal = stream.isatty()
        self._shown = 0.0
        self._next_tenth = 1

    def step(self) -> None:
        """Count one finished call and show progress when it is due."""
        self.done += 1
        elapsed = time.monotonic() - self.started
        rate = self.done / elapsed if elapsed else 0.0
        line = f"{self.done}/{self.total} calls, {rate:.0f} calls/s"
        if self.terminal:
            if elapsed - self._shown >= 0.2 or self.done == self.total:
                self._shown = elapsed
                self.stream.write(f"\r{line}   ")
                self.stream.flush()
        elif self.done * 10 >= self._next_tenth * self.total:
            self._next_tenth = self.done * 10 // self.total + 1
            self.stream.write(line + "\n")

    def finish(self) -> None:
        """End the updating line."""
        if self.terminal:
            self.stream.write("\n")


def run(
    stub: pb_grpc.SpendGateStub, calls: Sequence[Call], concurrency: int, run_id: str
) -> list[Outcome]:
    """Run the calls on `concurrency` threads and return their outcomes."""
    progress = Progress(len(calls), sys.stderr)
    outcomes: list[Outcome] = []
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        futures = [pool.submit(run_call, stub, call, run_id) for call in calls]
        for future in as_completed(futures):
            outcomes.append(future.result())
            progress.step()
    progress.finish()
    return outcomes


def usd(micros: int) -> str:
    """Format micro-USD exactly, such as "$1,234.500000"."""
    sign = "-" if micros < 0 else ""
    whole, fraction = divmod(abs(micros), 1_000_000)
    return f"{sign}${whole:,}.{fraction:06d}"


def department_budgets(stub: pb_grpc.SpendGateStub, department: str) -> str:
    """Describe the department-wide budgets, as GetBudget returns them."""
    try:
        response = stub.GetBudget(
            pb.GetBudgetRequest(principal=pb.Principal(department=department)),
            timeout=RPC_TIMEOUT_SECONDS,
        )
    except grpc.RpcError as error:
        return f"({error.code().name}: {error.details()})"
    parts = []
    for budget in response.budgets:
        if not budget.scope.startswith("department:"):
            continue
        used = budget.spent_micros + budget.reserved_micros
        percent = used * 100 / budget.limit_micros if budget.limit_micros else 0.0
        shadow = ", shadow" if budget.shadow else ""
        parts.append(
            f"{budget.budget} {budget.window}{shadow}: {usd(budget.spent_micros)} "
            f"spent of {usd(budget.limit_micros)} ({percent:.1f}% used)"
        )
    return "; ".join(parts) or "no department budget"


def summarize(
    outcomes: Sequence[Outcome], stub: pb_grpc.SpendGateStub
) -> Iterator[str]:
    """Yield the summary lines: a table per department, then top reason codes."""
    totals: dict[str, DepartmentTotals] = {}
    for outcome in outcomes:
        entry = totals.setdefault(outcome.department, DepartmentTotals())
        entry.checks += 1
        if outcome.error and not outcome.decision:
            entry.decisions["ERROR"] += 1
            continue
        entry.decisions[outcome.decision] += 1
        entry.reasons[outcome.reason] += 1
        entry.shadowed += outcome.shadowed
        entry.cost_micros += outcome.cost_micros

    headers = ("department", "checks", "allowed", "downgraded", "denied", "shadowed")
    rows = [
        (
            name,
            str(entry.checks),
            str(entry.decisions["ALLOW"]),
            str(entry.decisions["DOWNGRADE"]),
            str(entry.decisions["DENY"]),
            str(entry.shadowed),
            usd(entry.cost_micros),
        )
        for name, entry in sorted(totals.items())
    ]
    table = [(*headers, "committed"), *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        cells = [row[0].ljust(widths[0])]
        cells += [
            cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)
        ]
        yield "  ".join(cells)

    yield ""
    yield "Department budgets now (GetBudget):"
    for name in sorted(totals):
        yield f"  {name}: {department_budgets(stub, name)}"
    yield ""
    yield "Top reason codes:"
    for name, entry in sorted(totals.items()):
        top = ", ".join(f"{code} {n}" for code, n in entry.reasons.most_common(4))
        yield f"  {name}: {top}"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Send a day of simulated traffic through a local spendgate server."
    )
    parser.add_argument(
        "--address",
        default=DEFAULT_ADDRESS,
        help=f"HOST:PORT of the server, loopback only (default {DEFAULT_ADDRESS}).",
    )
    parser.add_argument(
        "--requests",
        type=int,
        default=DEFAULT_REQUESTS,
        help=f"Number of model calls to simulate (default {DEFAULT_REQUESTS}).",
    )
    parser.add_argument(
        "--seed", type=int, default=1, help="Seed of the traffic (default 1)."
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=DEFAULT_CONCURRENCY,
        help=f"Calls in flight at once (default {DEFAULT_CONCURRENCY}).",
    )
    args = parser.parse_args(argv)
    if args.requests < 1:
        parser.error(f"--requests must be at least 1, got {args.requests}")
    if not 1 <= args.concurrency <= 256:
        parser.error(f"--concurrency must be from 1 to 256, got {args.concurrency}")
    try:
        loopback_address(args.address)
    except ValueError as error:
        parser.error(str(error))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the simulation, print its summary and return the exit status."""
    args = parse_args(argv)
    calls = plan_calls(args.requests, args.seed)
    run_id = uuid.uuid4().hex[:8]
    with grpc.insecure_channel(args.address) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=CONNECT_TIMEOUT_SECONDS)
        except grpc.FutureTimeoutError:
            print(
                f"error: no spendgate server answered at {args.address} within "
                f"{CONNECT_TIMEOUT_SECONDS:.0f} s; start one with "
                f"`spendgate serve --address {args.address}`",
                file=sys.stderr,
            )
            return 1
        stub = pb_grpc.SpendGateStub(channel)
        started = time.monotonic()
        outcomes = run(stub, calls, args.concurrency, run_id)
        elapsed = time.monotonic() - started

        settled = Counter(outcome.settled for outcome in outcomes)
        errors = Counter(outcome.error for outcome in outcomes if outcome.error)
        spent = sum(outcome.cost_micros for outcome in outcomes)
        print(
            f"Simulated {len(calls)} calls in {elapsed:.1f} s "
            f"({len(calls) / elapsed:.0f} calls/s) against {args.address}, "
            f"seed {args.seed}, run {run_id}."
        )
        print(
            f"Committed {settled['committed']} ({usd(spent)}), released "
            f"{settled['released']}, left open {settled['open']} (the server "
            f"expires them after the reservation TTL), errors {sum(errors.values())}."
        )
        for error, count in errors.most_common():
            print(f"  {count} x {error}")
        print()
        for line in summarize(outcomes, stub):
            print(line)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
