"""`mailer`: the one command line of the pipeline.

Contract: every service, tool and the demo is a subcommand; `build_parser()`
is the single source of the subcommand names (docker-compose.yml and the
tests check against it). Each subcommand imports its module lazily so a tool
never pays for a service it does not run. Exit status 2 means bad input, with
a one-line error on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
from collections.abc import Callable, Sequence

from services.pipeline.accounts import AccountsError, load_accounts
from services.pipeline.api_tokens import ROLES, ApiTokensError, load_api_tokens
from services.pipeline.settings import Settings, SettingsError, markdown_table


def _with_metrics_port(args: argparse.Namespace, settings: Settings) -> Settings:
    """The settings with `--metrics-port`, when given, as MAILER_METRICS_PORT."""
    if args.metrics_port is None:
        return settings
    return dataclasses.replace(settings, metrics_port=args.metrics_port)


def _run_planner(args: argparse.Namespace, settings: Settings) -> int:
    from services.planner.app import run

    run(_with_metrics_port(args, settings))
    return 0


def _run_sender(args: argparse.Namespace, settings: Settings) -> int:
    from services.sender.app import run

    run(_with_metrics_port(args, settings))
    return 0


def _run_reconciler(args: argparse.Namespace, settings: Settings) -> int:
    from services.reconciler.app import run

    run(_with_metrics_port(args, settings))
    return 0


def _migrate(args: argparse.Namespace, settings: Settings) -> int:
    from redis.exceptions import RedisError

    from services.pipeline.migrations import migrate
    from services.reconciler.limiter_state import restore_limiter

    for name in migrate(settings.database_url):
        print(f"applied {name}")
    try:
        restored = asyncio.run(restore_limiter(settings))
    except (RedisError, OSError) as exc:
        print(f"limiter state not checked, Redis unreachable ({type(exc).__name__}); "
              "the reconciler restores it when Redis answers")
    else:
        print("limiter state restored from the claims and send_log" if restored else "limiter state present")
    return 0


def _topics(args: argparse.Namespace, settings: Settings) -> int:
    from services.pipeline.topics_command import topics_command

    return topics_command(args, settings)


def _publish(args: argparse.Namespace, settings: Settings) -> int:
    from services.pipeline.publish import publish_command

    return publish_command(args, settings)


def _lag(args: argparse.Namespace, settings: Settings) -> int:
    from services.pipeline.consumer_lag import lag_lines, measure

    print("\n".join(lag_lines(measure(settings))))
    return 0


def _ops(args: argparse.Namespace, settings: Settings) -> int:
    from services.ops.commands import ops_command

    return ops_command(args, settings)


def _show(args: argparse.Namespace, settings: Settings) -> int:
    from services.reconciler.campaign_view import show_command

    try:
        return show_command(args, settings)
    except BrokenPipeError:  # `mailer show ID | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _reconcile(args: argparse.Namespace, settings: Settings) -> int:
    from services.reconciler.reconcile_job import reconcile_command

    return asyncio.run(reconcile_command(args, settings))


def _demo(args: argparse.Namespace, settings: Settings) -> int:
    from services.pipeline.demo import run_demo

    return run_demo(args, settings)


def _smtp_sink(args: argparse.Namespace, settings: Settings) -> int:
    from services.pipeline.smtp_sink import run_sink

    return run_sink(args)


def _settings(args: argparse.Namespace, settings: Settings) -> int:
    print(markdown_table())
    return 0


def _api_token(args: argparse.Namespace, settings: Settings) -> int:
    import orjson

    from services.pipeline.api_tokens import new_token, token_entry

    token = new_token()
    try:
        entry = token_entry(token, args.actor, args.role)
    except ApiTokensError as exc:
        print(f"mailer: api-token: {exc}", file=sys.stderr)
        return 2
    print(token, flush=True)  # stdout holds the token alone: TOKEN=$(mailer api-token ...)
    print(f"the token (on stdout) is shown once and stored nowhere: give it to {args.actor}; "
          'add this entry to the "tokens" list of MAILER_API_TOKENS_FILE and restart the '
          "reconciler:", file=sys.stderr)
    print(orjson.dumps(entry).decode(), file=sys.stderr)
    return 0


Handler = Callable[[argparse.Namespace, Settings], int]


def build_parser() -> argparse.ArgumentParser:
    """The parser of every `mailer` subcommand."""
    parser = argparse.ArgumentParser(prog="mailer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(handler=handler)
        return p

    for service in (add("planner", _run_planner, "run the planner service (faust worker)"),
                    add("sender", _run_sender, "run a sender service (faust worker)"),
                    add("reconciler", _run_reconciler,
                        "run the reconciler service and its poll endpoint")):
        service.add_argument("--metrics-port", type=int, default=None,
                             help="serve /metrics on this port (overrides MAILER_METRICS_PORT)")
    add("migrate", _migrate,
        "apply the ordered SQL migrations to DATABASE_URL; restore the limiter's Redis state if lost")
    topics = add("topics", _topics,
                 "create the registry's missing topics (MAILER_TOPICS=create), check them "
                 "(--check), or print their specs for a platform team (--print)")
    from services.pipeline.topics_command import add_topics_arguments

    add_topics_arguments(topics)
    add("lag", _lag, "print each consumer group's state, members and lag per partition")

    ops = add("ops", _ops, "on-call commands: campaign, audit, stuck, deferred, limiter, lag, "
              "dead-letters, reconcile, pause, resume (docs/ONCALL_PLAYBOOK.md)")
    from services.ops.arguments import add_ops_arguments

    add_ops_arguments(ops)

    publish = add("publish", _publish, "publish CRM campaign commands to the broker")
    from services.pipeline.publish import add_publish_arguments

    add_publish_arguments(publish)

    show = add("show", _show, "show a campaign's status, counts and failed recipients")
    show.add_argument("campaign_id")
    show.add_argument("--json", action="store_true", help="print the poll endpoint's JSON")

    reconcile = add("reconcile", _reconcile,
                    "check campaigns, queue state, recipients and send log; repair what is safe")
    reconcile.add_argument("--dry-run", action="store_true", help="report only, change nothing")
    reconcile.add_argument("--json", action="store_true", help="print the report as JSON")
    reconcile.add_argument("--stuck-minutes", type=float, default=30.0, metavar="N",
                           help="a sending campaign with no progress for N minutes is stuck")

    demo = add("demo", _demo, "run the whole pipeline on embedded parts with a demo campaign")
    demo.add_argument("--recipients", type=int, default=2000, help="demo campaign size")
    demo.add_argument("--chunk-size", type=int, default=1000, help="recipients per chunk")
    demo.add_argument("--senders", type=int, default=1, help="sender processes to start")
    demo.add_argument("--timeout", type=float, default=600.0, help="give up after this many s")
    demo.add_argument("--no-progress", action="store_true", help="print lines, not a bar")

    sink = add("smtp-sink", _smtp_sink, "run an SMTP sink that accepts and counts every message")
    sink.add_argument("--host", default="127.0.0.1")
    sink.add_argument("--port", type=int, default=2525)
    sink.add_argument(
        "--reject", action="append", default=[], metavar="ADDRESS",
        help="answer 550 to RCPT TO for this address (repeatable)",
    )
    sink.add_argument("--no-smtputf8", action="store_true",
                      help="do not offer SMTPUTF8 (only ASCII local parts can be sent)")

    add("settings", _settings, "print every setting: variable, default, meaning")

    api_token = add("api-token", _api_token,
                    "make an HTTP API bearer token: the token on stdout (shown once), "
                    "the MAILER_API_TOKENS_FILE entry (its SHA-256) on stderr")
    api_token.add_argument("--actor", required=True, metavar="ID",
                           help="who presents the token (a manager's id for --role manager)")
    api_token.add_argument("--role", required=True, choices=ROLES,
                           help="manager: own campaigns only; ops, admin: every campaign")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `mailer` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
        load_accounts(settings)  # a bad accounts file stops every command here, with its reason
        load_api_tokens(settings)  # so does a bad API tokens file
    except (SettingsError, AccountsError, ApiTokensError) as exc:
        print(f"mailer: configuration error: {exc}", file=sys.stderr)
        return 2
    handler: Handler = args.handler
    return handler(args, settings)


if __name__ == "__main__":
    sys.exit(main())
