"""The benchmark runner's arithmetic and report (benchmarks/__main__.py, benchmarks/common.py)."""

from __future__ import annotations

import os

import pytest

from benchmarks.__main__ import apply_sizes, build_parser, check_sizes, main
from benchmarks.common import Figure, TopicSpan, figures_table, peak_rss_mib


def test_ratio_and_targets() -> None:
    fast = Figure("planner", 60.0, "msg/s", "raw", 100.0, target=0.5)
    slow = Figure("planner", 40.0, "msg/s", "raw", 100.0, target=0.5)
    grown = Figure("rss", 130.0, "MiB", "small", 100.0, target_max=1.2)
    flat = Figure("rss", 110.0, "MiB", "small", 100.0, target_max=1.2)
    untargeted = Figure("e2e", 5.0, "msg/s", "raw", 10.0)
    assert (fast.ratio, fast.met) == (0.6, True)
    assert (slow.ratio, slow.met) == (0.4, False)
    assert (grown.met, flat.met, untargeted.met) == (False, True, None)
    assert Figure("x", 1.0, "s", "raw", 0.0).ratio == 0.0


def test_table_prints_every_figure_with_its_baseline_ratio_and_verdict() -> None:
    table = figures_table([
        Figure("sender: emails/s, 1 process", 700.0, "emails/s", "raw aiosmtplib", 7000.0,
               target=0.8),
        Figure("peak RSS planner", 95.0, "MiB", "same, 10,000", 90.0, target_max=1.2),
    ])
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["figure", "value", "raw"]
    sender, rss = lines[2], lines[3]
    assert "700 emails/s" in sender and "7,000 emails/s" in sender and "0.10" in sender
    assert ">= 0.80" in sender and sender.endswith("MISSED")
    assert "95.0 MiB" in rss and "1.06" in rss and "<= 1.20" in rss and rss.endswith("met")


def test_sizes_default_full_or_quick_and_explicit_ones_win() -> None:
    full = apply_sizes(build_parser().parse_args([]))
    quick = apply_sizes(build_parser().parse_args(["--quick", "--sender-emails", "42"]))
    assert (full.planner_recipients, full.e2e_recipients) == (200_000, [10_000, 100_000])
    assert (quick.planner_recipients, quick.sender_emails) == (5_000, 42)


@pytest.mark.parametrize("argv, problem", [
    (["--sender-emails", "0"], "--sender-emails must be at least 1"),
    (["--e2e-recipients", "100", "10"], "--e2e-recipients needs 1 <= SMALL < LARGE"),
])
def test_bad_sizes_are_refused_with_a_reason(argv: list[str], problem: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert check_sizes(apply_sizes(build_parser().parse_args(argv))) == problem
    assert main(argv) == 2
    assert problem in capsys.readouterr().err


def test_span_rate_and_peak_rss() -> None:
    span = TopicSpan(count=1000, first=10.0, last=12.0)
    assert (span.seconds, span.rate) == (2.0, 500.0)
    assert TopicSpan(5, 3.0, 3.0).seconds > 0  # one timestamp: no division by zero
    assert 1.0 < peak_rss_mib(os.getpid()) < 100_000
