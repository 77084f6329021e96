"""`make bench` / `python -m benchmarks`: every throughput benchmark against its raw baseline.

Contract: runs the chosen benchmarks (default: all, in the order planner,
sender, reconciler, end-to-end) in one `BenchRun` (a fresh broker — tansu, or
Apache Kafka with `--broker kafka` — and smtp-sink, a fresh Postgres database per
benchmark), printing progress, then
one table of every figure with the raw baseline measured in the same run, the
ratio and the target. Writes the figures to `.bench/<stamp>/results.json`.
Exit status 0 when every benchmark ran (missed targets are reported, not
failed: `--strict` makes a missed target exit 3), 1 when one could not run,
2 on bad arguments. Not part of the test command.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import secrets
import sys
import time
import traceback
from pathlib import Path

import orjson

from benchmarks.common import BenchError, BenchRun, Figure, figures_table, say
from services.pipeline.embedded import EmbeddedError
from services.pipeline.kafka_local import KafkaLocalError
from services.pipeline.local_servers import LocalServerError
from services.pipeline.settings import Settings, SettingsError

#: benchmark name -> module with `run(bench, args) -> list[Figure]`
BENCHMARKS = {
    "planner": "benchmarks.planner",
    "sender": "benchmarks.sender",
    "reconciler": "benchmarks.reconciler",
    "end-to-end": "benchmarks.end_to_end",
}


def build_parser() -> argparse.ArgumentParser:
    """The command line of the benchmark suite."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    parser.add_argument("--only", action="append", choices=sorted(BENCHMARKS), default=None,
                        help="run only this benchmark (repeatable)")
    parser.add_argument("--broker", choices=("tansu", "kafka"), default="tansu",
                        help="the broker to start: the embedded tansu (default) or Apache Kafka")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes (a smoke run: minutes less, figures noisier)")
    parser.add_argument("--strict", action="store_true", help="exit 3 when a target is missed")
    parser.add_argument("--planner-recipients", type=int, default=None,
                        help="recipients of the planner's campaign (default 200000; quick 5000)")
    parser.add_argument("--sender-emails", type=int, default=None,
                        help="emails per sender measurement (default 20000; quick 500)")
    parser.add_argument("--reconciler-outcomes", type=int, default=None,
                        help="outcomes the reconciler applies (default 100000; quick 3000)")
    parser.add_argument("--e2e-recipients", type=int, nargs=2, default=None, metavar=("SMALL", "LARGE"),
                        help="recipients of the two end-to-end campaigns (default 10000 100000; "
                             "quick 300 1500)")
    parser.add_argument("--timeout", type=float, default=3600.0,
                        help="longest wait for one measurement (s)")
    return parser


def apply_sizes(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the sizes left unset with the full (or, with --quick, the small) defaults."""
    full = {"planner_recipients": 200_000, "sender_emails": 20_000,
            "reconciler_outcomes": 100_000, "e2e_recipients": [10_000, 100_000]}
    quick = {"planner_recipients": 5_000, "sender_emails": 500,
             "reconciler_outcomes": 3_000, "e2e_recipients": [300, 1_500]}
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def check_sizes(args: argparse.Namespace) -> str | None:
    """Why the sizes are unusable, or None."""
    for name in ("planner_recipients", "sender_emails", "reconciler_outcomes"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be at least 1"
    small, large = args.e2e_recipients
    if not 1 <= small < large:
        return "--e2e-recipients needs 1 <= SMALL < LARGE"
    return None


def machine() -> dict[str, str]:
    """What the figures were measured on."""
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return {"cpu": cpu, "cores": str(os.cpu_count()), "python": platform.python_version(),
            "system": platform.platform()}


def main(argv: list[str] | None = None) -> int:
    """Run the suite; see the module docstring."""
    args = apply_sizes(build_parser().parse_args(argv))
    if (problem := check_sizes(args)) is not None:
        print(f"benchmarks: {problem}", file=sys.stderr)
        return 2
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"benchmarks: {exc}", file=sys.stderr)
        return 2
    names = [n for n in BENCHMARKS if args.only is None or n in args.only]
    stamp = time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)
    run_dir = Path(".bench") / stamp
    say(f"benchmark run {stamp} on {args.broker}: {', '.join(names)}; logs in {run_dir}")
    info = machine()
    say(f"machine: {info['cpu']}, {info['cores']} cores, Python {info['python']}")
    figures: list[Figure] = []
    failed: list[str] = []
    started = time.monotonic()
    try:
        with BenchRun(settings, run_dir, args.broker) as bench:
            for name in names:
                bench.settle()
                say(f"\n== {name} ==")
                module = importlib.import_module(BENCHMARKS[name])
                try:
                    figures.extend(module.run(bench, args))
                except (BenchError, EmbeddedError) as exc:
                    say(f"{name}: could not run: {exc}")
                    failed.append(name)
                except Exception:
                    traceback.print_exc()
                    failed.append(name)
    except (BenchError, EmbeddedError, KafkaLocalError, LocalServerError) as exc:
        print(f"benchmarks: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("benchmarks: interrupted", file=sys.stderr)
        return 130
    say(f"\n== figures ({time.monotonic() - started:.0f} s in all) ==")
    say(figures_table(figures))
    results = {"stamp": stamp, "machine": info, "args": vars(args),
               "figures": [f.as_dict() for f in figures], "failed": failed}
    (run_dir / "results.json").write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    say(f"results: {run_dir / 'results.json'}")
    if failed:
        say(f"could not run: {', '.join(failed)}")
        return 1
    if args.strict and any(f.met is False for f in figures):
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
