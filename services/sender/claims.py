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
it). The claim is taken before the limiter is asked (a refused or redelivered
command never moves the limiter) and committed before SMTP is spoken to, so it
survives a crash of any one component; `Claim.release()` gives it up when the
gate parks the send (nothing went to SMTP), and `Claim.finish(result, outcome)`
records both after SMTP, waiting out a Postgres outage before the outcome is
published, so a published outcome always has its claim settled. A claim left
without a result becomes `unknown` after MAILER_CLAIM_TIMEOUT
(services/reconciler/stale_claims.py) and is never sent again by itself; if the
sweep settled it first, `finish` returns `Superseded` with the sweep's outcome,
which the sender repeats instead of its own: one terminal outcome per send, ever.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

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
T = TypeVar("T")

@dataclass(frozen=True)
class Refusal:
    """Why the send must not go to SMTP now (for a duplicate, the first claim's outcome if any)."""

    reason: RefusalReason
    detail: str
    outcome: bytes | None = None


@dataclass(frozen=True)
class Superseded:
    """The claim was settled before its sender could record its result: the stale-claim sweep
    gave up on it (services/reconciler/stale_claims.py) while Postgres was away. `outcome` is
    the outcome recorded then, the one the send has on the topic; the sender publishes it
    again instead of its own, so a send never has two terminal outcomes."""

    outcome: bytes | None


class Claim:
    """The right, recorded in Postgres, to hand one (send, attempt) to SMTP once."""

    def __init__(
        self, conn: AsyncConnection, send_id: str, attempt: int, campaign_id: str,
        pool: AsyncConnectionPool | None = None,
    ) -> None:
        self._conn = conn
        self._pool = pool
        self.send_id = send_id
        self.attempt = attempt
        self.campaign_id = campaign_id
        self.unlocked = False  # finish() released the campaign's shared lock already

    async def release(self) -> None:
        """Give the claim up before anything went to SMTP (the gate parked the send): its row
        is deleted, so the parked command, coming back with the same attempt, can claim it,
        and a breaker probe it held is free for the next send.
        A Postgres outage is waited out (on a new connection)."""
        delete = (  # committed synchronously, as the claim was: a crash must not bring it back
            "WITH sync AS (SELECT set_config('synchronous_commit', 'on', true)),"
            # a half-open breaker's probe that was parked: the next send may probe at once
            " unprobe AS (UPDATE circuit_breakers SET probe_send = NULL, probe_at = NULL"
            "             WHERE probe_send = %s::uuid)"
            " DELETE FROM send_claims WHERE send_id = %s AND attempt = %s AND result IS NULL"
            " AND EXISTS (SELECT 1 FROM sync)"
        )
        params = (self.send_id, self.send_id, self.attempt)
        try:
            await self._conn.execute(delete, params)
            return
        except Exception as exc:
            log.warning("could not release claim %s/%s (%s); retrying once Postgres answers",
                        self.send_id, self.attempt, type(exc).__name__)

        async def again(conn: AsyncConnection) -> bool:
            await conn.execute(delete, params)
            return True

        await retry_transient(lambda: self._on_new_connection(again), what="releasing a claim")

    async def finish(
        self, result: ClaimResult, outcome: Message, payload: bytes, breaker_threshold: int
    ) -> Superseded | None:
        """Record what SMTP said and the outcome message that says so (a redelivered command
        produces it again), and count it into the circuit breakers (R10): a transient error
        adds one, a success resets, `threshold` in a row opens; refused credentials open the
        account's at once. A success (the common case) is one statement that touches a
        breaker row only when it has something to reset, sent with the release of the
        campaign's lock in one round trip.

        The caller publishes the outcome only after this returned: when Postgres is away
        the record is retried on a new connection until it answers (the outcome waits),
        so a published outcome always has its claim settled and the stale-claim sweep
        never declares it unknown afterwards. Returns None when the result recorded is
        this one, or `Superseded` when the claim had been settled before (the sweep
        gave up on it first): the caller publishes that outcome instead of its own.
        These records are committed asynchronously (the claim itself is not): only a
        Postgres crash, not an outage, may lose the last of them; the sweep then finds
        the outcome in send_log and settles the claim without a second outcome."""
        try:
            recorded = await self._record(self._conn, result, outcome, payload, breaker_threshold,
                                          unlock=True)
        except Exception as exc:
            log.warning("could not record the result of claim %s/%s (%s); retrying once "
                        "Postgres answers, its outcome waits", self.send_id, self.attempt,
                        type(exc).__name__)
            try:
                recorded = await retry_transient(
                    lambda: self._on_new_connection(lambda conn: self._record(
                        conn, result, outcome, payload, breaker_threshold, unlock=False)),
                    what="recording the result of a claim",
                )
            except Exception as final:  # not an outage: the sweep consults send_log first
                log.error("could not record the result of claim %s/%s: %s", self.send_id,
                          self.attempt, type(final).__name__)
                return None
        return None if recorded else Superseded(await self._recorded_outcome())

    async def _record(
        self, conn: AsyncConnection, result: ClaimResult, outcome: Message, payload: bytes,
        breaker_threshold: int, *, unlock: bool,
    ) -> bool:
        """Write the result on `conn`; True when it was this claim's (not settled before)."""
        record = (
            "UPDATE send_claims SET result = %s, outcome = %s, finished_at = now()"
            " WHERE send_id = %s AND attempt = %s AND result IS NULL"
        )
        params = (result, payload, self.send_id, self.attempt)
        if circuit_breaker.is_transient(outcome) is False:
            statement = (f"WITH claim AS ({record} RETURNING 1),"
                         f" reset AS ({circuit_breaker.RESET_ON_SUCCESS})"
                         " SELECT count(*) FROM claim")
            params_all = (*params, *circuit_breaker.reset_params(outcome))
            if not unlock:
                cur = await conn.execute(statement, params_all)
                row = await cur.fetchone()
                return bool(row and row[0])
            async with conn.pipeline():
                cur = await conn.execute(statement, params_all)
                await conn.execute(
                    f"SELECT pg_advisory_unlock_shared({CAMPAIGN_LOCK})", (self.campaign_id,)
                )
            self.unlocked = True
            row = await cur.fetchone()
            return bool(row and row[0])
        async with conn.transaction():
            cur = await conn.execute(record, params)
            recorded = cur.rowcount == 1
            await circuit_breaker.update_breakers(conn, [outcome], breaker_threshold)
            if outcome.get("error_class") == "auth":
                await circuit_breaker.open_now(conn, outcome["account"])
        return recorded

    async def _recorded_outcome(self) -> bytes | None:
        """The outcome the claim holds (recorded by whoever settled it first)."""

        async def read(conn: AsyncConnection) -> bytes | None:
            cur = await conn.execute(
                "SELECT outcome FROM send_claims WHERE send_id = %s AND attempt = %s",
                (self.send_id, self.attempt),
            )
            row = await cur.fetchone()
            return None if row is None or row[0] is None else bytes(row[0])

        try:
            return await read(self._conn)
        except Exception:
            return await retry_transient(lambda: self._on_new_connection(read),
                                         what="reading a settled claim")

    async def _on_new_connection(self, work: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        """Run `work` on a connection of the pool other than the claim's own (which was lost)."""
        if self._pool is None:
            raise RuntimeError("no pool to reconnect to")
        conn = await self._pool.getconn()
        try:
            if not conn.autocommit:
                await conn.set_autocommit(True)
            return await work(conn)
        except BaseException:
            with contextlib.suppress(Exception):
                await conn.close()
            raise
        finally:
            await self._pool.putconn(conn)


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
            return Claim(conn, send_id, attempt, command["campaign_id"], self.pool)
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
