"""Prefect's overhead on a smoke round: the loop as a Prefect flow vs the same stage cores called
directly, in one process, on fresh stores (so both sides compute everything).

Goal (issue 19, item 5): the ratio of the MEDIANS flow / direct over >= 5 alternating repeats is
<= 1.10x. Printed: every repeat, median and best of each side, the ratio of medians against the
goal (and of bests), and the load average before and after (the machine may be shared).

The Prefect API server is started once, before timing (a deployed loop talks to a running
server; the ephemeral server's start-up is printed apart). Sides alternate, and which side goes
first alternates too, to spread machine noise.

"flow" is what ``prefloop run`` does (``run_flow_locally``): the flow, then the wait until the local
server has recorded every task run (its artifacts are written meanwhile), timed together. After every
flow side the server is let finish its own background work (event persistence) before the next side.

``--with-heartbeats`` adds a side with Prefect's default flow-run heartbeats, as a deployment against a
real server runs (``run_flow_locally`` switches them off for the throw-away local server).

``--profile DIR`` then runs one more flow side and one more direct side under cProfile (DIR/flow.prof,
DIR/direct.prof; ``python -m pstats``) and prints the Prefect API requests the flow side made, by
endpoint. Call counts and cumulative times are robust to a busy machine, wall times are not.

    .venv/bin/python benchmarks/prefect_overhead.py [--config configs/smoke.yaml] [--rounds 1] [--repeats 5]
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import os
import re
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefloop.environment import apply_offline_defaults

apply_offline_defaults()  # before Prefect is imported: offline, PREFECT_HOME under the project

from prefect import flow  # noqa: E402

from prefloop.config import load_loop_config  # noqa: E402
from prefloop.flows.loop import loop_flow, run_loop  # noqa: E402
from prefloop.orchestration import run_flow_locally, wait_until_recorded  # noqa: E402

GOAL = 1.10  # flow / direct, ratio of the medians
SETTLE_SECONDS = 1.0  # after a flow side: the server's own background work ends before the next side


@flow(name="prefloop-warm-up")
def warm_up() -> int:
    return 1


def as_prefloop_run(config, store):
    """The flow, then the wait until the local server recorded it (``prefloop run``)."""
    return run_flow_locally(loop_flow, config, store, expected_task_runs=lambda result: len(result.stages))


def with_heartbeats(config, store):
    """Prefect's defaults, as a deployment against a server runs; the recording wait is untimed."""
    state = loop_flow(config, store, return_state=True)
    return state.result(), state.state_details.flow_run_id


@contextmanager
def api_requests() -> Iterator[collections.Counter]:
    """Count the Prefect API requests made meanwhile, by method and path (ids replaced by {id})."""
    import httpx

    counts: collections.Counter = collections.Counter()
    sync_send, async_send = httpx.Client.send, httpx.AsyncClient.send

    def key(request: httpx.Request) -> str:
        return f"{request.method} {re.sub(r'[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}', '{id}', request.url.path)}"

    def counted_sync(self, request, *args, **kwargs):
        counts[key(request)] += 1
        return sync_send(self, request, *args, **kwargs)

    async def counted_async(self, request, *args, **kwargs):
        counts[key(request)] += 1
        return await async_send(self, request, *args, **kwargs)

    httpx.Client.send, httpx.AsyncClient.send = counted_sync, counted_async
    try:
        yield counts
    finally:
        httpx.Client.send, httpx.AsyncClient.send = sync_send, async_send


def profile_sides(config, work: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for side, runner in (("direct", run_loop), ("flow", as_prefloop_run)):
        profiler = cProfile.Profile()
        with api_requests() as counts:
            began = time.perf_counter()
            profiler.runcall(runner, config, str(work / f"profile-{side}"))
            seconds = time.perf_counter() - began
        profiler.dump_stats(out / f"{side}.prof")
        print(f"profiled {side}: {seconds:.2f} s (under cProfile) -> {out / f'{side}.prof'}")
        if counts:
            print(f"  Prefect API requests of the {side} side ({sum(counts.values())}; events and task-run "
                  "states go over the events websocket, not counted):")
            for endpoint, count in counts.most_common():
                print(f"    {count:4d}  {endpoint}")
        time.sleep(SETTLE_SECONDS)


def summarise(times: dict[str, list[float]]) -> dict[str, tuple[float, float]]:
    return {side: (statistics.median(values), min(values)) for side, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/smoke.yaml")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5, help="alternating repeats of each side (>= 5 for the goal)")
    parser.add_argument("--with-heartbeats", action="store_true", help="also time Prefect's default heartbeats")
    parser.add_argument("--profile", type=Path, default=None, metavar="DIR",
                        help="afterwards, profile one flow and one direct side into DIR")
    args = parser.parse_args()
    config = load_loop_config(args.config, rounds=args.rounds)
    work = Path(tempfile.mkdtemp(prefix="prefloop-overhead-"))
    load_before = os.getloadavg()

    started = time.perf_counter()
    warm_up()
    server_start = time.perf_counter() - started
    # One untimed direct run warms imports, the contract engine and torch kernels for both sides.
    run_loop(config, str(work / "warm"))

    sides: list[tuple[str, Callable[..., Any]]] = [("direct", run_loop), ("flow", as_prefloop_run)]
    if args.with_heartbeats:
        sides.append(("flow+heartbeats", with_heartbeats))
    times: dict[str, list[float]] = {side: [] for side, _ in sides}
    for repeat in range(args.repeats):
        for side, runner in sides if repeat % 2 == 0 else sides[::-1]:
            store = work / f"{side}-{repeat}"
            began = time.perf_counter()
            summary = runner(config, str(store))
            times[side].append(time.perf_counter() - began)
            if side == "flow+heartbeats":
                summary, flow_run_id = summary
                wait_until_recorded(flow_run_id, len(summary.stages))  # untimed, before the next side
            if side != "direct":
                time.sleep(SETTLE_SECONDS)
            assert not any(s.cached for s in summary.stages), "a fresh store must compute every stage"
    if args.profile is not None:
        profile_sides(config, work, args.profile)
    shutil.rmtree(work, ignore_errors=True)
    load_after = os.getloadavg()

    stats = summarise(times)
    print(f"config {args.config}, rounds {args.rounds}, {args.repeats} alternating repeats; "
          f"load average (1, 5, 15 min) before {', '.join(f'{x:.1f}' for x in load_before)}, "
          f"after {', '.join(f'{x:.1f}' for x in load_after)} on {os.cpu_count()} CPUs")
    print(f"ephemeral Prefect server start (once, untimed below): {server_start:.1f} s")
    for side, values in times.items():
        median, best = stats[side]
        print(f"{side:<16} median {median:.2f} s, best {best:.2f} s   (all: {', '.join(f'{t:.2f}' for t in values)})")
    ratio = stats["flow"][0] / stats["direct"][0]
    verdict = "met" if ratio <= GOAL and args.repeats >= 5 else "NOT met" if ratio > GOAL else "needs >= 5 repeats"
    print(f"ratio flow / direct, medians: {ratio:.3f}x (goal <= {GOAL:.2f}x: {verdict}); "
          f"bests: {stats['flow'][1] / stats['direct'][1]:.3f}x")
    if args.with_heartbeats:
        print(f"with heartbeats, medians: {stats['flow+heartbeats'][0] / stats['direct'][0]:.3f}x")


if __name__ == "__main__":
    main()
