"""The durable claim every send takes before SMTP, and the campaign gate it passes (R29, B5).

Contract: `Claims.hold(command)` is an async context manager that yields
either a `Claim` (this process may hand the message to SMTP) or a `Refusal`
(it must not). While it is held, the send keeps a shared advisory lock on its
campaign; a pause or cancel takes the same lock exclusively before changing the
campaign's status (services/reconciler/projections.py), so it waits for sends
in flight and every send that starts after it sees the new status: once a
pause is acknowledged, nothing more of that campaign reaches SMTP.

In one call of the `claim_send` function (migration 0005, one round trip) it takes
the lock, reads the campaign's status (paused → `paused`,
cancelled → `cancelled`), its and its account's circuit breakers (open →
`breaker`), the suppression list (`suppressed`), and inserts the
claim row `(send_id, attempt)`; if that row exists (a redelivered, replayed or
rebalanced command) the answer is `duplicate` and nothing is sent; when that
claim finished, the refusal carries the outcome it produced, so the
redelivered command repeats it (its sender may have died before the broker had
it). The claim is committed before SMTP is spoken to, so it survives a crash
of any one component; `Claim.finish(result, outcome)` records both after it. A claim left
without a result becomes `unknown` after MAILER_CLAIM_TIMEOUT
(services/reconciler/stale_claims.py) and is never sent again by itself.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from services.pipeline import circuit_breaker
from services.pipeline.contract import Message
from services.pipeline.db import CAMPAIGN_LOCK
from services.pipeline.ids import normalize_email
from services.pipeline.retry import retry_transient

log = logging.getLogger(__name__)

RefusalReason = Literal["paused", "cancelled", "breaker", "suppressed", "duplicate"]
ClaimResult = Literal["sent", "failed", "deferred", "unknown"]

@dataclass(frozen=True)
class Refusal:
    """Why the send must not go to SMTP now (for a duplicate, the first claim's outcome if any)."""

    reason: RefusalReason
    detail: str
    outcome: bytes | None = None


class Claim:
    """The right, recorded in Postgres, to hand one (send, attempt) to SMTP once."""

    def __init__(self, conn: AsyncConnection, send_id: str, attempt: int, campaign_id: str) -> None:
        self._conn = conn
        self.send_id = send_id
        self.attempt = attempt
        self.campaign_id = campaign_id
        self.unlocked = False  # finish() released the campaign's shared lock already

    async def finish(
        self, result: ClaimResult, outcome: Message, payload: bytes, breaker_threshold: int
    ) -> None:
        """Record what SMTP said and the outcome message that says so (a redelivered command
        produces it again), and count it into the circuit breakers (R10): a transient error
        adds one, a success resets, `threshold` in a row opens; refused credentials open the
        account's at once. A success (the common case) is one statement that touches a
        breaker row only when it has something to reset, sent with the release of the
        campaign's lock in one round trip. These records are committed asynchronously
        (the claim itself is not): a Postgres crash may lose the last of them, which
        leaves those claims to the timeout, as any failure here does."""
        record = (
            "UPDATE send_claims SET result = %s, outcome = %s, finished_at = now()"
            " WHERE send_id = %s AND attempt = %s AND result IS NULL"
        )
        params = (result, payload, self.send_id, self.attempt)
        try:
            if circuit_breaker.is_transient(outcome) is False:
                async with self._conn.pipeline():
                    await self._conn.execute(
                        f"WITH claim AS ({record} RETURNING 1) {circuit_breaker.RESET_ON_SUCCESS}",
                        (*params, *circuit_breaker.reset_params(outcome)),
                    )
                    await self._conn.execute(
                        f"SELECT pg_advisory_unlock_shared({CAMPAIGN_LOCK})", (self.campaign_id,)
                    )
                self.unlocked = True
                return
            async with self._conn.transaction():
                await self._conn.execute(record, params)
                await circuit_breaker.update_breakers(self._conn, [outcome], breaker_threshold)
                if outcome.get("error_class") == "auth":
                    await circuit_breaker.open_now(self._conn, outcome["account"])
        except Exception as exc:  # the outcome still goes out; the projection has the truth
            log.warning("could not record the result of claim %s/%s: %s",
                        self.send_id, self.attempt, type(exc).__name__)


class Claims:
    """Claims of one sender process (`owner` names it in the claim rows)."""

    def __init__(self, pool: AsyncConnectionPool, owner: str) -> None:
        self.pool = pool
        self.owner = owner

    @contextlib.asynccontextmanager
    async def hold(self, command: Mapping[str, Any]) -> AsyncIterator[Claim | Refusal]:
        """Claim `command` for SMTP, holding the campaign's shared lock until the block ends.

        A Postgres outage is waited out (nothing can be claimed without it): the
        claim is retried with capped backoff until Postgres answers.
        """
        conn, verdict = await retry_transient(lambda: self._open(command), what="claiming a send")
        try:
            yield verdict
        finally:
            if not (isinstance(verdict, Claim) and verdict.unlocked):
                await _unlock(conn, command["campaign_id"])
            await self.pool.putconn(conn)

    async def _open(self, command: Mapping[str, Any]) -> tuple[AsyncConnection, Claim | Refusal]:
        conn = await self.pool.getconn()
        try:
            if not conn.autocommit:  # a new connection: claim_send commits before SMTP
                await conn.set_autocommit(True)
                await conn.execute("SET synchronous_commit = off")  # claim_send turns it on
            return conn, await self._take(conn, command)
        except BaseException:
            await _unlock(conn, command["campaign_id"])
            await self.pool.putconn(conn)
            raise

    async def _take(self, conn: AsyncConnection, command: Mapping[str, Any]) -> Claim | Refusal:
        """The campaign's shared lock, the checks and the claim row: one call of `claim_send`
        (migration 0005), committed when it returns."""
        send_id, attempt = command["send_id"], int(command["attempt"])
        recipient = command["recipient"]["email"]
        cur = await conn.execute(
            "SELECT verdict, detail, outcome FROM claim_send(%s, %s, %s, %s, %s, %s, %s, %s)",
            (command["campaign_id"], command["account"], send_id, attempt, recipient,
             normalize_email(recipient), command["is_test"], self.owner),
        )
        row = await cur.fetchone()
        if row is None:  # a function with OUT parameters always returns one row
            raise RuntimeError("claim_send returned no row")
        verdict, detail, outcome = row
        if verdict == "claimed":
            return Claim(conn, send_id, attempt, command["campaign_id"])
        return Refusal(verdict, detail, None if outcome is None else bytes(outcome))


async def _unlock(conn: AsyncConnection, campaign_id: str) -> None:
    """Release the campaign's shared lock; a connection that cannot is closed (which releases it)."""
    try:
        if not conn.autocommit:
            await conn.rollback()
        await conn.execute(f"SELECT pg_advisory_unlock_shared({CAMPAIGN_LOCK})", (campaign_id,))
    except Exception:
        with contextlib.suppress(Exception):
            await conn.close()
