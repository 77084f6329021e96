"""The arguments of `mailer ops …`, apart from the commands so building the parser stays cheap.

Contract: `add_ops_arguments(parser)` adds one subcommand per on-call command
(`services.ops.commands` runs them); each takes `--json` (`breaker reset ACCOUNT` too).
"""

from __future__ import annotations

import argparse


def add_ops_arguments(parser: argparse.ArgumentParser) -> None:
    """The subcommands of `mailer ops`."""
    sub = parser.add_subparsers(dest="ops_command", required=True, metavar="WHAT")

    def add(name: str, help_text: str, *, campaign: bool = False) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        if campaign:
            p.add_argument("campaign_id")
        p.add_argument("--json", action="store_true", help="print JSON instead of text")
        return p

    add("campaign", "explain one campaign: status and why, next run, counts, breakers, parked sends, "
        "latest errors, audit", campaign=True)
    audit = add("audit", "a campaign's audit trail: every status change and deferral, who, when, why",
                campaign=True)
    audit.add_argument("--limit", type=int, default=1000, help="newest N rows (default 1000)")
    add("stuck", "sending campaigns with no progress that no deferral explains").add_argument(
        "--minutes", type=float, default=30.0, help="no progress for N minutes (default 30)")
    add("deferred", "campaigns waiting on purpose: deferred (reason, until) or paused")
    limiter = add("limiter", "Redis, the limiter and the provider quota per account; breakers; parked sends")
    limiter.add_argument("--account", default=None, help="one account only")
    add("lag", "consumer groups: state, members, offset and time lag per partition")
    dead = add("dead-letters", "the newest dead letters: service, error, source, reason")
    dead.add_argument("--limit", type=int, default=20, help="newest N (default 20)")
    dead.add_argument("--payload", action="store_true", help="include the rejected message itself")
    reconcile = add("reconcile", "run the reconcile job now (as the reconciler does every 5 minutes)")
    reconcile.add_argument("--dry-run", action="store_true", help="report only, change nothing")
    reconcile.add_argument("--stuck-minutes", type=float, default=30.0, metavar="N")
    breaker = sub.add_parser(
        "breaker", help="close an account's circuit breaker by hand (audited)",
        description="close an account's circuit breaker by hand (audited); it also closes by "
                    "itself after a half-open probe delivered (MAILER_BREAKER_COOLDOWN)")
    breaker_sub = breaker.add_subparsers(dest="breaker_command", required=True, metavar="ACTION")
    reset = breaker_sub.add_parser("reset", help="close ACCOUNT's breaker; the campaigns it paused "
                                   "send again", description="close ACCOUNT's breaker; the campaigns "
                                   "it paused send again (the reconciler resumes them)")
    reset.add_argument("account")
    reset.add_argument("--actor", required=True, help="who asks (recorded in breaker_audit)")
    reset.add_argument("--reason", default=None, help="why (audited)")
    reset.add_argument("--json", action="store_true", help="print JSON instead of text")
    for kind in ("pause", "resume"):
        p = add(kind, f"{kind} a campaign and wait until the reconciler has applied it", campaign=True)
        p.add_argument("--actor", required=True, help="who asks (recorded in the audit log)")
        p.add_argument("--reason", default=None, help="why (shown to the manager, audited)")
        p.add_argument("--no-wait", action="store_true", help="return once the command is published")
