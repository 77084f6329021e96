"""Bearer tokens of the reconciler's HTTP API, each mapped to an actor and a role (R16).

Contract: `load_api_tokens(settings)` reads MAILER_API_TOKENS_FILE, a JSON
document `{"tokens": [{"sha256": "<hex>", "actor_id": "manager-7", "role":
"manager"}, ...]}` (an optional `note` string per entry is allowed, nothing
else), and returns `ApiTokens`; a file that cannot be read or parsed, an
unknown role, a hash that is not 64 hex digits, a bad actor id or the same
hash twice raises `ApiTokensError` with the reason. Without the setting there
are no tokens and `ApiTokens.configured` is False: the API refuses every
request. Only hashes are stored: `ApiTokens.lookup(token)` hashes the
presented token with SHA-256 and compares it with every entry in constant
time (`hmac.compare_digest`, no early exit). Roles: `manager` sees only the
campaigns whose `manager_id` is its actor id; `ops` and `admin` see all.
`new_token()` makes a token, `token_entry()` the file entry for it. A token
is never part of a repr, an error message or a log line; the actor id is.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from services.pipeline.json_file import read_json_file
from services.pipeline.settings import Settings

ROLES = ("manager", "ops", "admin")
#: Roles that see every campaign; a `manager` sees only its own.
SEE_ALL_ROLES = frozenset({"ops", "admin"})
#: The event contract's id syntax (docs/ARCHITECTURE.md), for actor ids.
ACTOR_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
_ENTRY_FIELDS = frozenset({"sha256", "actor_id", "role", "note"})
_VAR = "MAILER_API_TOKENS_FILE"


class ApiTokensError(ValueError):
    """The API tokens configuration cannot be used."""


def hash_token(token: str) -> str:
    """The hex SHA-256 of a token: what the tokens file stores."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    """A fresh random token (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def token_entry(token: str, actor_id: str, role: str) -> dict[str, str]:
    """The tokens-file entry of `token` for `actor_id` with `role` (the token itself is not in it)."""
    if not ACTOR_ID.match(actor_id):
        raise ApiTokensError(f"actor id {actor_id!r} must match {ACTOR_ID.pattern}")
    if role not in ROLES:
        raise ApiTokensError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    return {"sha256": hash_token(token), "actor_id": actor_id, "role": role}


@dataclass(frozen=True)
class ApiToken:
    """One configured token: who presents it and what it may see (its hash only)."""

    actor_id: str
    role: str
    digest: bytes = field(repr=False)

    @property
    def sees_all(self) -> bool:
        """Whether this token sees every campaign (ops, admin)."""
        return self.role in SEE_ALL_ROLES

    def may_see(self, manager_id: str | None) -> bool:
        """Whether this token may see a campaign of `manager_id`."""
        return self.sees_all or manager_id == self.actor_id


@dataclass(frozen=True)
class ApiTokens:
    """Every configured token; empty when MAILER_API_TOKENS_FILE is not set."""

    entries: tuple[ApiToken, ...] = ()

    @property
    def configured(self) -> bool:
        """Whether any token is configured (without one the API refuses every request)."""
        return bool(self.entries)

    def lookup(self, token: str) -> ApiToken | None:
        """The entry of `token`, or None; compares with every entry in constant time."""
        digest = hashlib.sha256(token.encode("utf-8")).digest()
        found: ApiToken | None = None
        for entry in self.entries:  # no early exit: the time does not depend on which one matched
            if hmac.compare_digest(digest, entry.digest):
                found = entry
        return found


def load_api_tokens(settings: Settings) -> ApiTokens:
    """The tokens of MAILER_API_TOKENS_FILE; none when it is not set."""
    if not settings.api_tokens_file:
        return ApiTokens()
    return parse_api_tokens(read_json_file(settings.api_tokens_file, _VAR, ApiTokensError))


def parse_api_tokens(document: Any) -> ApiTokens:
    """ApiTokens from the JSON document of MAILER_API_TOKENS_FILE."""
    if not isinstance(document, dict) or not isinstance(document.get("tokens"), list):
        raise ApiTokensError(
            f'{_VAR}: expected {{"tokens": [{{"sha256": ..., "actor_id": ..., "role": ...}}]}}'
        )
    extra = sorted(set(document) - {"tokens"})
    if extra:
        raise ApiTokensError(f"{_VAR}: unknown top-level field {extra[0]!r}")
    entries: list[ApiToken] = []
    seen: dict[bytes, int] = {}
    for i, raw in enumerate(document["tokens"]):
        where = f"{_VAR}: tokens[{i}]"
        entry = _parse_entry(raw, where)
        if entry.digest in seen:
            raise ApiTokensError(f"{where}: the same sha256 as tokens[{seen[entry.digest]}]")
        seen[entry.digest] = i
        entries.append(entry)
    return ApiTokens(tuple(entries))


def _parse_entry(raw: Any, where: str) -> ApiToken:
    if not isinstance(raw, dict):
        raise ApiTokensError(f"{where}: expected an object with sha256, actor_id and role")
    unknown = sorted(set(raw) - _ENTRY_FIELDS)
    if unknown:
        hint = " (store only the sha256 of a token, never the token)" if "token" in unknown else ""
        raise ApiTokensError(f"{where}: unknown field {unknown[0]!r}{hint}")
    missing = [name for name in ("sha256", "actor_id", "role") if name not in raw]
    if missing:
        raise ApiTokensError(f"{where}: missing {', '.join(missing)}")
    sha, actor, role = raw["sha256"], raw["actor_id"], raw["role"]
    if not isinstance(sha, str) or not _HEX64.match(sha):
        raise ApiTokensError(f"{where}: sha256 must be 64 hex digits (the SHA-256 of the token)")
    if not isinstance(actor, str) or not ACTOR_ID.match(actor):
        raise ApiTokensError(f"{where}: actor_id must match {ACTOR_ID.pattern}")
    if role not in ROLES:
        raise ApiTokensError(f"{where}: role must be one of {', '.join(ROLES)}, not {role!r}")
    if "note" in raw and not isinstance(raw["note"], str):
        raise ApiTokensError(f"{where}: note must be a string")
    return ApiToken(actor_id=actor, role=role, digest=bytes.fromhex(sha))
