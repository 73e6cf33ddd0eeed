"""Background threads of a server: reservation expiry and database health."""

from __future__ import annotations

import threading
from typing import Protocol

import structlog
from grpc_health.v1 import health_pb2
from sqlalchemy.exc import SQLAlchemyError

from spendgate.ledger import Ledger
from spendgate.ledger._spool import AuditSpool
from spendgate.runtime import Clock, PolicyHolder, utc_now

log = structlog.get_logger("spendgate.background")


class HealthStatus(Protocol):
    """A health service that DatabaseMonitor can set from any thread."""

    def set(
        self, service: str, status: health_pb2.HealthCheckResponse.ServingStatus
    ) -> None:
        """Report `status` for `service`."""


class ExpirySweeper(threading.Thread):
    """Background thread settling reservations that outlived their TTL."""

    def __init__(
        self,
        policies: PolicyHolder,
        ledger: Ledger,
        interval: float,
        clock: Clock = utc_now,
    ) -> None:
        super().__init__(name="spendgate-expiry", daemon=True)
        self.policies = policies
        self.ledger = ledger
        self.interval = interval
        self.clock = clock
        self._stopped = threading.Event()

    def run(self) -> None:
        while not self._stopped.wait(self.interval):
            self.sweep()

    def sweep(self) -> int:
        """Settle expired reservations now; return how many were settled."""
        action = self.policies.current.organization.on_reservation_expiry
        try:
            settled = self.ledger.expire(action, now=self.clock())
        except SQLAlchemyError as error:
            log.error("expiry_sweep_failed", exc_info=error)
            return 0
        if settled:
            log.info("reservations_expired", count=settled, action=action.value)
        return settled

    def stop(self) -> None:
        """Stop the thread after its current sweep."""
        self._stopped.set()


class DatabaseMonitor(threading.Thread):
    """Report NOT_SERVING while the ledger database is down, SERVING once it is back.

    The thread pings the database every `interval` seconds; an RPC that hits
    a database error calls `mark_down` so health changes at once. When the
    database responds again, the spool of unverified audit rows is flushed.
    """

    def __init__(
        self,
        ledger: Ledger,
        health_servicer: HealthStatus,
        services: tuple[str, ...],
        *,
        interval: float = 1.0,
        spool: AuditSpool | None = None,
    ) -> None:
        super().__init__(name="spendgate-db-monitor", daemon=True)
        self.ledger = ledger
        self.health = health_servicer
        self.services = services
        self.interval = interval
        self.spool = spool
        self._healthy = True
        self._lock = threading.Lock()
        self._stopped = threading.Event()

    @property
    def healthy(self) -> bool:
        """True while the last ping or RPC reached the database."""
        return self._healthy

    def run(self) -> None:
        while not self._stopped.wait(self.interval):
            self.check()

    def check(self) -> bool:
        """Ping the database now and update health; return whether it responded."""
        try:
            self.ledger.ping()
        except SQLAlchemyError as error:
            self.mark_down(error)
            return False
        self._mark_up()
        self._flush_spool()
        return True

    def mark_down(self, error: BaseException) -> None:
        """Record a database failure and report NOT_SERVING."""
        with self._lock:
            if self._stopped.is_set() or not self._healthy:
                return
            self._healthy = False
            self._set(health_pb2.HealthCheckResponse.NOT_SERVING)
        log.error("database_unavailable", error=str(error).splitlines()[0])

    def _mark_up(self) -> None:
        with self._lock:
            if self._stopped.is_set() or self._healthy:
                return
            self._healthy = True
            self._set(health_pb2.HealthCheckResponse.SERVING)
        log.info("database_available")

    def _flush_spool(self) -> None:
        if self.spool is None:
            return
        try:
            flushed = self.spool.flush(self.ledger.engine)
        except SQLAlchemyError as error:
            log.error("audit_spool_flush_failed", exc_info=error)
            return
        if flushed:
            log.info("audit_spool_flushed", rows=flushed)

    def _set(self, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        for name in self.services:
            self.health.set(name, status)

    def stop(self) -> None:
        """Stop pinging; health is left as the shutdown sets it."""
        self._stopped.set()
