"""A consumer group that consumes nothing is named stalled, from one reading and over time
(issue 14, defect 18)."""

from __future__ import annotations

from services.pipeline.consumer_lag import (
    STALLED,
    GroupLag,
    PartitionLag,
    ProgressWatch,
    export,
    lag_lines,
    stall_reason,
)


def group(state: str, *lags: tuple[int, int], name: str = "g-sender") -> GroupLag:
    """A reading: (committed, lag) per partition."""
    return GroupLag(name, state, 2, [
        PartitionLag("t.send-commands", i, committed, committed + lag, lag, 5.0 if lag else 0.0)
        for i, (committed, lag) in enumerate(lags)])


def test_nothing_waiting_is_never_stalled() -> None:
    assert stall_reason(group("empty", (10, 0), (4, 0))) is None
    assert stall_reason(group("preparingrebalance", (10, 0))) is None


def test_one_reading_names_an_empty_group_and_a_rebalance() -> None:
    assert stall_reason(group("empty", (10, 3), (4, 2))) == (
        "5 message(s) waiting and no member in the group: is the service running?")
    assert stall_reason(group("completingrebalance", (10, 3))) == (
        "3 message(s) waiting while the group rebalances (completingrebalance)")
    assert stall_reason(group("stable", (10, 3))) is None  # one reading cannot tell


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_offsets_that_stand_still_while_messages_wait_are_flagged_after_the_threshold() -> None:
    clock = Clock()
    watch = ProgressWatch(stall_seconds=60, clock=clock)
    assert watch.observe([group("stable", (10, 3))]) == set()
    clock.now += 59
    assert watch.observe([group("stable", (10, 5))]) == set()
    clock.now += 1
    reading = group("stable", (10, 7))
    assert watch.observe([reading]) == {"g-sender"}
    assert reading.stalled == ("7 message(s) waiting and nothing consumed for 60 s (group stable): "
                               "its members hold no partition, or read nothing")
    assert "  STALLED: 7 message(s) waiting" in "\n".join(lag_lines([reading]))


def test_a_group_that_moves_or_catches_up_starts_counting_again() -> None:
    clock = Clock()
    watch = ProgressWatch(stall_seconds=60, clock=clock)
    watch.observe([group("stable", (10, 3))])
    clock.now += 50
    watch.observe([group("stable", (11, 3))])  # moved: counts from here
    clock.now += 50
    assert watch.observe([group("stable", (11, 3))]) == set()
    clock.now += 10
    assert watch.observe([group("stable", (11, 0))]) == set()  # caught up
    clock.now += 15
    assert watch.observe([group("stable", (11, 2))]) == set()  # new messages: counting from 0
    clock.now += 60
    assert watch.observe([group("stable", (11, 2))]) == {"g-sender"}


def test_the_reason_of_one_reading_is_kept_in_the_flag_and_the_gauge_follows_the_watch() -> None:
    clock = Clock()
    watch = ProgressWatch(stall_seconds=10, clock=clock)
    watch.observe([group("preparingrebalance", (3, 4), name="g-x")])
    clock.now += 10
    reading = group("preparingrebalance", (3, 4), name="g-x")
    reading.stalled = stall_reason(reading)
    stalled = watch.observe([reading])
    assert reading.stalled is not None and reading.stalled.endswith(
        "(group preparingrebalance): 4 message(s) waiting while the group rebalances "
        "(preparingrebalance)")
    export([reading], stalled)
    assert STALLED.labels("g-x")._value.get() == 1
    export([group("stable", (5, 0), name="g-x")], set())
    assert STALLED.labels("g-x")._value.get() == 0


def test_a_partition_never_committed_on_prints_a_dash() -> None:
    reading = GroupLag("g", "empty", 0, [PartitionLag("t", 0, 0, 12, 12, 3.0, uncommitted=True)])
    assert "  t[0]  committed=-  high=12  lag=12  lag_seconds=3.0" in lag_lines([reading])
