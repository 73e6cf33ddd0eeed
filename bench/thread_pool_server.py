"""spendgate's handlers on a grpcio thread pool, for the server model table.

On SQLite, `spendgate serve` runs on grpc.aio and calls its handlers
inline on the event loop. This process builds the same objects (policy,
tokenizers, engine, ledger, servicer) and serves Check, Commit and Release
from a grpcio thread-pool server instead. It has the same worker count
and message size options, so `make bench` compares the two models on real
work. Health, reflection, policy reloading and the expiry sweeper are
left out: no benchmark call touches them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _serving import serve_thread_pool
from spendgate import handlers, ledger, logs, tokens
from spendgate.policy import load_policy
from spendgate.server import PolicyHolder, SpendGateServicer


def main() -> None:
    """Serve until SIGTERM or SIGINT, after printing the bound port as JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--policies", type=Path, required=True)
    parser.add_argument("--database", required=True, help="SQLAlchemy URL.")
    parser.add_argument("--address", default="127.0.0.1:0", help="HOST:PORT.")
    parser.add_argument("--workers", type=int, default=16, help="Worker threads.")
    args = parser.parse_args()

    logs.configure("info", json=True)
    policy = load_policy(args.policies)
    tokens.preload()
    engine = ledger.create_engine(args.database, pool_size=args.workers)
    ledger.check_schema(engine)
    servicer = SpendGateServicer(PolicyHolder(policy), ledger.Ledger(engine))
    serve_thread_pool(
        lambda server: handlers.add_servicer(servicer, server),
        args.address,
        args.workers,
        "spendgate-rpc",
    )
    engine.dispose()


if __name__ == "__main__":
    main()
