"""How many limiter decisions Redis gives per second, against a plain EVALSHA baseline.

Run: ``.venv/bin/python -m benchmarks.limiter [--seconds 5] [--processes 1 3] [--tasks 32]``.
For each process count, every process runs `--tasks` concurrent loops of
`Limiter.reserve` on one account with a limit high enough that nearly every
call is granted, for `--seconds`; then the same loops of EVALSHA of a trivial
``return 1`` script. Prints both rates and their ratio, and deletes every key
it wrote (its own key prefix). Redis comes from ``REDIS_URL`` (or `--redis-url`).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import time
import uuid
from typing import Any

import redis.asyncio as aioredis

from services.pipeline.limiter_keys import LimiterKeys
from services.pipeline.settings import Settings
from services.sender.rate_limit import Limiter, LimitRequest

TRIVIAL = "return 1"
HIGH = 1_000_000_000


def _worker(kind: str, url: str, prefix: str, seconds: float, tasks: int, start: Any, results: Any) -> None:
    results.put(asyncio.run(_run(kind, url, prefix, seconds, tasks, start)))


async def _run(kind: str, url: str, prefix: str, seconds: float, tasks: int, start: Any) -> tuple[int, int]:
    """(calls, granted) made by `tasks` loops in this process during `seconds`."""
    client = aioredis.Redis.from_url(url, max_connections=tasks + 4)
    limiter = Limiter(client, keys=LimiterKeys(prefix))
    sha = await client.script_load(TRIVIAL)
    pid = os.getpid()

    def request(task: int, n: int) -> LimitRequest:
        now = time.time()
        return LimitRequest(
            token_id=f"{pid}:{task}:{n}", account="bench", account_rate=HIGH, manager_id="m1",
            daily_limit=HIGH, day="2000-01-01", next_day_at=now + 3600, campaign_id="c1", now=now,
        )

    async def loop(task: int, deadline: float) -> tuple[int, int]:
        calls = granted = 0
        while time.monotonic() < deadline:
            if kind == "reserve":
                granted += (await limiter.reserve(request(task, calls))).granted
            else:
                granted += await client.evalsha(sha, 0)
            calls += 1
        return calls, granted

    await asyncio.gather(*(client.ping() for _ in range(tasks)))  # open the connections
    await limiter.reserve(request(-1, 0))  # load the limiter's script
    await asyncio.to_thread(start.wait)
    deadline = time.monotonic() + seconds
    counts = await asyncio.gather(*(loop(t, deadline) for t in range(tasks)))
    await limiter.close()
    return sum(c for c, _ in counts), sum(g for _, g in counts)


def measure(kind: str, url: str, prefix: str, seconds: float, tasks: int,
            processes: int) -> tuple[float, int]:
    """Calls per second of `processes` processes together, and how many were granted."""
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Barrier(processes), ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(kind, url, prefix, seconds, tasks, start, results))
        for _ in range(processes)
    ]
    for proc in procs:
        proc.start()
    counts = [results.get(timeout=seconds + 120) for _ in procs]
    for proc in procs:
        proc.join(30)
    return sum(c for c, _ in counts) / seconds, sum(g for _, g in counts)


async def _init(url: str, keys: LimiterKeys) -> None:
    limiter = Limiter(aioredis.Redis.from_url(url), keys=keys)
    await limiter.init_epoch()
    await limiter.close()


async def _cleanup(url: str, keys: LimiterKeys) -> int:
    client = aioredis.Redis.from_url(url)
    deleted = 0
    async for key in client.scan_iter(match="{" + keys.prefix + "}:*", count=5000):
        deleted += await client.unlink(key)
    await client.aclose()
    return deleted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.limiter", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each measurement")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 3], help="process counts to measure")
    parser.add_argument("--tasks", type=int, default=32, help="concurrent loops per process")
    parser.add_argument("--redis-url", default=Settings.from_env().redis_url)
    args = parser.parse_args(argv)

    keys = LimiterKeys(f"bench-{uuid.uuid4().hex[:8]}")
    print(f"{'processes':>9} {'tasks':>5} {'reserve/s':>11} {'granted':>9} "
          f"{'EVALSHA return 1/s':>19} {'ratio':>6}")
    try:
        asyncio.run(_init(args.redis_url, keys))
        for processes in args.processes:
            run = (args.redis_url, keys.prefix, args.seconds, args.tasks, processes)
            reserve, granted = measure("reserve", *run)
            baseline, _ = measure("evalsha", *run)
            share = granted / (reserve * args.seconds) if reserve else 0.0
            print(f"{processes:>9} {args.tasks:>5} {reserve:>11,.0f} {share:>8.1%} {baseline:>19,.0f} "
                  f"{reserve / baseline:>6.2f}")
    finally:
        deleted = asyncio.run(_cleanup(args.redis_url, keys))
        print(f"deleted {deleted} keys under {{{keys.prefix}}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
