"""Pools of reusable SMTP connections, one pool per sending account.

Contract: `SmtpPool.connection()` is an async context manager that lends one
connected (TLS-upgraded and logged-in as configured) `PooledSMTP`; at most
`size` connections exist per pool, connected lazily. A connection is given
back for reuse when the block ends normally and it is still connected; when
an exception leaves the block it is closed and discarded. An idle connection
is checked with NOOP before reuse once it has been idle for
`idle_check_after` seconds, and replaced when that fails. A failure to
connect raises `SmtpConnectError` whose `error_class` is `connection`,
`timeout`, `tls` or `auth`. The password is read from the settings only when
logging in; it never appears in a log record or exception text.

`PooledSMTP.data()` records whether the message payload went out
(`payload_sent`) and the DATA reply (`data_reply`), so the caller can tell a
failure before DATA from a lost reply after it. `SmtpPools` maps account
names to pools.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import aiosmtplib
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings
from aiosmtplib.response import SMTPResponse
from aiosmtplib.typing import Default

from services.pipeline.accounts import load_accounts
from services.pipeline.settings import Settings

log = logging.getLogger(__name__)

ErrorClass = Literal["connection", "timeout", "tls", "auth"]


class UnknownAccount(KeyError):
    """No SMTP pool is configured for the command's account."""


class SmtpConnectError(Exception):
    """A connection could not be opened, secured or authenticated (no secrets inside)."""

    def __init__(
        self, error_class: ErrorClass, reason: str, code: int | None = None, reply: str = ""
    ) -> None:
        super().__init__(reason)
        self.error_class: ErrorClass = error_class
        self.reason = reason
        self.code = code
        self.reply = reply


@dataclass(frozen=True)
class SmtpAccount:
    """Where and how one sending account connects; the password is fetched on login."""

    name: str
    host: str
    port: int
    tls: str
    username: str
    timeout: float
    validate_certs: bool
    password: Callable[[], str] = field(repr=False, compare=False)
    local_hostname: str | None = None


class PooledSMTP(aiosmtplib.SMTP):
    """An aiosmtplib client that tells whether the DATA payload was sent."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.payload_sent = False
        self.data_reply: SMTPResponse | None = None
        self.last_used = time.monotonic()
        self.messages = 0

    def begin_transaction(self) -> None:
        """Forget what the previous transaction on this connection recorded."""
        self.payload_sent = False
        self.data_reply = None

    async def data(
        self,
        message: str | bytes,
        /,
        *,
        timeout: float | Default | None = Default.token,
    ) -> SMTPResponse:
        """DATA, then the payload; like aiosmtplib's, but accepts any 2xx and records phases."""
        if self.protocol is None:
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        await self._ehlo_or_helo_if_needed()
        wait = self.timeout if timeout is Default.token else timeout
        if isinstance(message, str):
            message = message.encode("ascii")
        start = await self.execute_command(b"DATA", timeout=wait)
        if start.code != 354:
            raise aiosmtplib.SMTPDataError(start.code, start.message)
        payload = PERIOD_REGEX.sub(b"..", normalize_message_line_endings(message)) + b".\r\n"
        protocol = self.protocol
        if protocol is None:
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        try:
            protocol.write(payload)
            # From here on the server may hold the message: no reply means "unknown".
            self.payload_sent = True
            response = await protocol.read_response(timeout=wait)
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError):
            self.close()
            raise
        self.data_reply = response
        if not 200 <= response.code < 300:
            raise aiosmtplib.SMTPDataError(response.code, response.message)
        return response


class SmtpPool:
    """Up to `size` reusable connections of one account."""

    def __init__(
        self, account: SmtpAccount, size: int, *, idle_check_after: float = 10.0
    ) -> None:
        self.account = account
        self.size = size
        self.idle_check_after = idle_check_after
        self._idle: asyncio.Queue[PooledSMTP] = asyncio.Queue()
        self._slots = asyncio.Semaphore(size)
        self._closed = False
        #: Connections opened over the pool's life (tests and metrics).
        self.opened = 0

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[PooledSMTP]:
        """Lend one ready connection for one transaction."""
        if self._closed:
            raise SmtpConnectError("connection", "SMTP pool is closed")
        async with self._slots:
            conn = await self._checkout()
            reusable = False
            try:
                conn.begin_transaction()
                yield conn
                reusable = True
            finally:
                if reusable and conn.is_connected and not self._closed:
                    conn.last_used = time.monotonic()
                    conn.messages += 1
                    self._idle.put_nowait(conn)
                else:
                    conn.close()

    async def _checkout(self) -> PooledSMTP:
        while True:
            try:
                conn = self._idle.get_nowait()
            except asyncio.QueueEmpty:
                return await self._connect()
            if not conn.is_connected:
                conn.close()
                continue
            if time.monotonic() - conn.last_used >= self.idle_check_after:
                try:
                    await conn.noop(timeout=min(5.0, self.account.timeout))
                except (TimeoutError, aiosmtplib.SMTPException, OSError):
                    conn.close()
                    continue
            return conn

    async def _connect(self) -> PooledSMTP:
        account = self.account
        conn = PooledSMTP(
            hostname=account.host,
            port=account.port,
            timeout=account.timeout,
            use_tls=account.tls == "tls",
            start_tls=False,
            validate_certs=account.validate_certs,
            local_hostname=account.local_hostname,
        )
        try:
            await self._open(conn)
        except SmtpConnectError as exc:
            conn.close()
            log.warning(
                "SMTP account %s: cannot connect to %s:%s (%s): %s",
                account.name, account.host, account.port, exc.error_class, exc.reason,
            )
            raise
        except BaseException:
            conn.close()
            raise
        self.opened += 1
        return conn

    async def _open(self, conn: PooledSMTP) -> None:
        account = self.account
        tls_wanted = account.tls in ("tls", "starttls")
        try:
            await conn.connect()
        except aiosmtplib.SMTPTimeoutError:
            raise SmtpConnectError("timeout", "timed out connecting") from None
        except aiosmtplib.SMTPConnectResponseError as exc:
            raise SmtpConnectError(
                "connection", f"server refused the session ({exc.code})", exc.code, exc.message
            ) from None
        except aiosmtplib.SMTPConnectError as exc:
            is_tls = isinstance(exc.__cause__, ssl.SSLError)
            if is_tls and tls_wanted:
                raise SmtpConnectError("tls", f"TLS handshake failed: {exc.__cause__}") from None
            raise SmtpConnectError("connection", exc.message) from None
        except ssl.SSLError as exc:
            raise SmtpConnectError("tls", f"TLS handshake failed: {exc}") from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise SmtpConnectError("connection", _describe(exc)) from None
        await self._greet(conn)
        if account.tls == "starttls":
            await _step("STARTTLS", conn.starttls, refused="tls", failed="tls")
            await self._greet(conn)  # RFC 3207: extensions are learnt again over TLS
        if account.username:
            await self._login(conn)

    @staticmethod
    async def _greet(conn: PooledSMTP) -> None:
        """EHLO (HELO as a fallback) now, so a refusal is a connection failure."""
        await _step("EHLO", conn._ehlo_or_helo_if_needed, refused="connection", failed="connection")

    async def _login(self, conn: PooledSMTP) -> None:
        account = self.account
        try:
            secret = account.password()
        except Exception as exc:
            raise SmtpConnectError("auth", f"SMTP password unavailable: {_describe(exc)}") from None
        try:
            await conn.login(account.username, secret)
        except aiosmtplib.SMTPTimeoutError:
            raise SmtpConnectError("timeout", "timed out during AUTH") from None
        except aiosmtplib.SMTPResponseException as exc:
            raise SmtpConnectError(
                "auth",
                f"authentication failed ({exc.code})",
                exc.code,
                _scrub(exc.message, account.username, secret),
            ) from None
        except aiosmtplib.SMTPServerDisconnected:
            raise SmtpConnectError("connection", "connection lost during AUTH") from None
        except Exception as exc:  # encoding errors and the like may carry the secret
            raise SmtpConnectError(
                "auth", f"authentication failed ({type(exc).__name__})"
            ) from None
        finally:
            del secret

    async def close(self) -> None:
        """Say QUIT to every idle connection and refuse new loans; lent ones close on return."""
        self._closed = True
        while True:
            try:
                conn = self._idle.get_nowait()
            except asyncio.QueueEmpty:
                break
            try:
                await conn.quit(timeout=2.0)
            except (TimeoutError, aiosmtplib.SMTPException, OSError):
                pass
            finally:
                conn.close()


class SmtpPools:
    """The SMTP pool of every configured account, by account name."""

    def __init__(self, pools: Mapping[str, SmtpPool]) -> None:
        self._pools = dict(pools)

    @classmethod
    def from_settings(cls, settings: Settings) -> SmtpPools:
        """One pool per configured account (`load_accounts`)."""
        pools = {}
        for account in load_accounts(settings).by_name.values():
            smtp = SmtpAccount(
                name=account.name, host=account.host, port=account.port, tls=account.tls,
                username=account.username, timeout=settings.smtp_timeout,
                validate_certs=settings.smtp_validate_certs, password=account.password,
            )
            pools[account.name] = SmtpPool(smtp, settings.smtp_pool_size)
        return cls(pools)

    def get(self, account: str) -> SmtpPool:
        """The pool of `account`; `UnknownAccount` when none is configured."""
        try:
            return self._pools[account]
        except KeyError:
            raise UnknownAccount(account) from None

    def accounts(self) -> list[str]:
        """Names of the configured accounts."""
        return sorted(self._pools)

    async def close(self) -> None:
        """Close every pool."""
        for pool in self._pools.values():
            await pool.close()


async def _step(
    name: str, call: Callable[[], Awaitable[Any]], *, refused: ErrorClass, failed: ErrorClass
) -> None:
    """Run one session-opening SMTP step, turning its errors into `SmtpConnectError`."""
    try:
        await call()
    except aiosmtplib.SMTPTimeoutError:
        raise SmtpConnectError("timeout", f"timed out during {name}") from None
    except aiosmtplib.SMTPResponseException as exc:
        raise SmtpConnectError(refused, f"{name} refused ({exc.code})", exc.code, exc.message) from None
    except (aiosmtplib.SMTPException, OSError) as exc:
        raise SmtpConnectError(failed, f"{name} failed: {_describe(exc)}") from None


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text[:500]


def _scrub(text: str, *secrets: str) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text[:500]
