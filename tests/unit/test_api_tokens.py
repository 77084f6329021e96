"""API tokens (R16): the tokens file, its errors, the constant-time lookup, `mailer api-token`."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest

from services.pipeline import api_tokens
from services.pipeline.api_tokens import (
    ApiToken,
    ApiTokens,
    ApiTokensError,
    hash_token,
    load_api_tokens,
    new_token,
    parse_api_tokens,
    token_entry,
)
from services.pipeline.cli import main
from services.pipeline.settings import Settings

MANAGER_TOKEN = "t0ken-of-manager-7-do-not-leak"
OPS_TOKEN = "t0ken-of-oncall-do-not-leak"
ROOT = Path(__file__).resolve().parents[2]


def document() -> dict[str, Any]:
    return {"tokens": [
        {"sha256": hash_token(MANAGER_TOKEN), "actor_id": "manager-7", "role": "manager"},
        {"sha256": hash_token(OPS_TOKEN).upper(), "actor_id": "oncall", "role": "ops",
         "note": "hex digits in either case"},
        {"sha256": hash_token("admin-token"), "actor_id": "crm", "role": "admin"},
    ]}


def write(tmp_path: Path, content: Any) -> Settings:
    path = tmp_path / "api_tokens.json"
    path.write_bytes(content if isinstance(content, bytes) else orjson.dumps(content))
    return replace(Settings(), api_tokens_file=str(path))


def test_no_file_configured_means_no_tokens() -> None:
    tokens = load_api_tokens(Settings())
    assert tokens == ApiTokens() and not tokens.configured
    assert tokens.lookup(MANAGER_TOKEN) is None


def test_file_maps_each_hash_to_actor_and_role(tmp_path: Path) -> None:
    tokens = load_api_tokens(write(tmp_path, document()))
    assert tokens.configured and len(tokens.entries) == 3
    manager = tokens.lookup(MANAGER_TOKEN)
    assert manager is not None and (manager.actor_id, manager.role) == ("manager-7", "manager")
    ops = tokens.lookup(OPS_TOKEN)
    assert ops is not None and (ops.actor_id, ops.role) == ("oncall", "ops")
    admin = tokens.lookup("admin-token")
    assert admin is not None and admin.role == "admin"
    assert tokens.lookup("unknown") is None
    assert tokens.lookup("") is None
    assert tokens.lookup(hash_token(MANAGER_TOKEN)) is None  # the hash itself is no token


def test_roles_decide_what_a_token_sees(tmp_path: Path) -> None:
    tokens = load_api_tokens(write(tmp_path, document()))
    manager, ops, admin = (tokens.lookup(t) for t in (MANAGER_TOKEN, OPS_TOKEN, "admin-token"))
    assert manager is not None and ops is not None and admin is not None
    assert manager.may_see("manager-7") and not manager.sees_all
    assert not manager.may_see("manager-8") and not manager.may_see(None)
    assert ops.sees_all and ops.may_see("manager-8") and admin.may_see("anyone")


def test_the_example_file_loads() -> None:
    settings = replace(Settings(), api_tokens_file=str(ROOT / "docs/examples/api_tokens.json"))
    tokens = load_api_tokens(settings)
    assert {t.role for t in tokens.entries} == {"manager", "ops", "admin"}
    entry = tokens.lookup("EXAMPLE-manager-7-token-not-a-secret")
    assert entry is not None and entry.actor_id == "manager-7"


def test_a_token_is_stored_only_as_its_hash_and_never_shown() -> None:
    entry = token_entry(MANAGER_TOKEN, "manager-7", "manager")
    assert entry == {"sha256": hashlib.sha256(MANAGER_TOKEN.encode()).hexdigest(),
                     "actor_id": "manager-7", "role": "manager"}
    loaded = parse_api_tokens({"tokens": [entry]})
    assert MANAGER_TOKEN not in repr(loaded) and entry["sha256"] not in repr(loaded)
    assert "digest" not in repr(loaded.entries[0])


def test_new_tokens_are_long_and_random() -> None:
    made = {new_token() for _ in range(50)}
    assert len(made) == 50
    assert all(len(t) >= 43 and " " not in t for t in made)


@pytest.mark.parametrize(("content", "reason"), [
    (b"{not json", "is not valid JSON"),
    ([], "expected"),
    ({"tokens": {}}, "expected"),
    ({"tokens": [], "extra": 1}, "unknown top-level field 'extra'"),
    ({"tokens": ["abc"]}, "tokens[0]: expected an object"),
    ({"tokens": [{"sha256": hash_token("a"), "actor_id": "x"}]}, "tokens[0]: missing role"),
    ({"tokens": [{"sha256": hash_token("a"), "actor_id": "x", "role": "root"}]},
     "role must be one of manager, ops, admin, not 'root'"),
    ({"tokens": [{"sha256": "zz" * 32, "actor_id": "x", "role": "ops"}]}, "64 hex digits"),
    ({"tokens": [{"sha256": hash_token("a")[:60], "actor_id": "x", "role": "ops"}]}, "64 hex digits"),
    ({"tokens": [{"sha256": 12, "actor_id": "x", "role": "ops"}]}, "64 hex digits"),
    ({"tokens": [{"sha256": hash_token("a"), "actor_id": "has space", "role": "ops"}]},
     "actor_id must match"),
    ({"tokens": [{"sha256": hash_token("a"), "actor_id": "x", "role": "ops", "note": 1}]},
     "note must be a string"),
    ({"tokens": [{"sha256": hash_token("a"), "actor_id": "x", "role": "ops"},
                 {"sha256": hash_token("b"), "actor_id": "y", "role": "ops"},
                 {"sha256": hash_token("a").upper(), "actor_id": "z", "role": "admin"}]},
     "tokens[2]: the same sha256 as tokens[0]"),
    ({"tokens": [{"token": "plain-secret", "actor_id": "x", "role": "ops"}]},
     "unknown field 'token' (store only the sha256"),
])
def test_bad_files_are_configuration_errors(tmp_path: Path, content: Any, reason: str) -> None:
    with pytest.raises(ApiTokensError) as err:
        load_api_tokens(write(tmp_path, content))
    assert reason in str(err.value) and str(err.value).startswith("MAILER_API_TOKENS_FILE")
    assert "plain-secret" not in str(err.value)


def test_unreadable_file_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ApiTokensError, match="MAILER_API_TOKENS_FILE cannot be read"):
        load_api_tokens(replace(Settings(), api_tokens_file=str(tmp_path / "missing.json")))


def test_lookup_compares_every_entry_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    tokens = parse_api_tokens({"tokens": [
        {"sha256": hash_token(f"token-{i}"), "actor_id": f"a{i}", "role": "ops"} for i in range(5)
    ]})
    calls: list[tuple[bytes, bytes]] = []
    real_compare = hmac.compare_digest

    def compare(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real_compare(a, b)

    monkeypatch.setattr(api_tokens.hmac, "compare_digest", compare)
    for presented in ("token-0", "token-4", "nobody"):
        calls.clear()
        found = tokens.lookup(presented)
        # every entry is compared, as digests, whether and wherever it matches: no early exit
        assert [b for _, b in calls] == [e.digest for e in tokens.entries]
        assert all(a == hashlib.sha256(presented.encode()).digest() for a, _ in calls)
        assert (found.actor_id if found else None) == {"token-0": "a0", "token-4": "a4"}.get(presented)


def test_token_entry_checks_actor_and_role() -> None:
    with pytest.raises(ApiTokensError, match="actor id"):
        token_entry("t", "bad id", "ops")
    with pytest.raises(ApiTokensError, match="role"):
        token_entry("t", "ok", "root")
    assert "digest" not in repr(ApiToken("a", "ops", b"x" * 32))


def test_a_bad_tokens_file_stops_every_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "api_tokens.json"
    path.write_text('{"tokens": [{"sha256": "nope", "actor_id": "x", "role": "ops"}]}')
    monkeypatch.setenv("MAILER_API_TOKENS_FILE", str(path))
    assert main(["settings"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mailer: configuration error: MAILER_API_TOKENS_FILE: tokens[0]: sha256")


def test_api_token_command_prints_the_token_once_and_its_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("MAILER_API_TOKENS_FILE", raising=False)
    assert main(["api-token", "--actor", "manager-7", "--role", "manager"]) == 0
    out, err = capsys.readouterr()
    token = out.strip()
    assert out == token + "\n" and len(token) >= 43  # stdout: the token alone
    assert token not in err
    entry = orjson.loads(err.strip().splitlines()[-1])
    assert entry == token_entry(token, "manager-7", "manager")
    # the entry, put in a tokens file, makes the token valid for that actor
    found = parse_api_tokens({"tokens": [entry]}).lookup(token)
    assert found is not None and (found.actor_id, found.role) == ("manager-7", "manager")


def test_api_token_command_refuses_bad_input(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("MAILER_API_TOKENS_FILE", raising=False)
    assert main(["api-token", "--actor", "bad id", "--role", "ops"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "actor id" in err
    with pytest.raises(SystemExit):
        main(["api-token", "--actor", "x", "--role", "root"])
