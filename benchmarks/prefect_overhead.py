"""Prefect's overhead on a smoke round: the loop as a Prefect flow vs the same stage cores called
directly, in one process, on fresh stores (so both sides compute everything).

The Prefect API server is started once, before timing (a deployed loop talks to a running
server; the ephemeral server's start-up is printed apart). Sides alternate to spread machine noise.

"flow" is what ``prefloop run`` does (``run_flow_locally``): the flow, then the wait until the local
server has recorded every task run, timed together. After every flow side the server is also let
record everything before the next side starts: Prefect's SQLite server answers a write that collides
with its own recording of the previous run's events with a 503, and the client retries after 2 s, so
back-to-back runs in one process would otherwise time that collision rather than either side.

    .venv/bin/python benchmarks/prefect_overhead.py [--config configs/smoke.yaml] [--rounds 1] [--repeats 2]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from prefloop.environment import apply_offline_defaults

apply_offline_defaults()  # before Prefect is imported: offline, PREFECT_HOME under the project

from prefect import flow  # noqa: E402

from prefloop.config import load_loop_config  # noqa: E402
from prefloop.flows.loop import loop_flow, run_loop  # noqa: E402
from prefloop.orchestration import run_flow_locally, wait_until_recorded  # noqa: E402


@flow(name="prefloop-warm-up")
def warm_up() -> int:
    return 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/smoke.yaml")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    config = load_loop_config(args.config, rounds=args.rounds)
    work = Path(tempfile.mkdtemp(prefix="prefloop-overhead-"))

    started = time.perf_counter()
    warm_up()
    server_start = time.perf_counter() - started
    # One untimed direct run warms imports, the contract engine and torch kernels for both sides.
    run_loop(config, str(work / "warm"))

    def as_prefloop_run(config, store):  # the flow, then the wait until the server recorded it
        return run_flow_locally(loop_flow, config, store, expected_task_runs=lambda result: len(result.stages))

    def with_heartbeats(config, store):  # Prefect's defaults, as a deployment against a server runs
        state = loop_flow(config, store, return_state=True)
        return state.result(), state.state_details.flow_run_id

    sides = (("direct", run_loop), ("flow", as_prefloop_run), ("flow+heartbeats", with_heartbeats))
    times: dict[str, list[float]] = {side: [] for side, _ in sides}
    for repeat in range(args.repeats):
        for side, runner in sides:
            store = work / f"{side}-{repeat}"
            began = time.perf_counter()
            summary = runner(config, str(store))
            times[side].append(time.perf_counter() - began)
            if side == "flow+heartbeats":
                summary, flow_run_id = summary
                wait_until_recorded(flow_run_id, len(summary.stages))  # untimed, before the next side
            assert not any(s.cached for s in summary.stages), "a fresh store must compute every stage"
    shutil.rmtree(work, ignore_errors=True)
    best = {side: min(values) for side, values in times.items()}
    print(f"config {args.config}, rounds {args.rounds}, best of {args.repeats}")
    print(f"ephemeral Prefect server start (once, untimed below): {server_start:.1f} s")
    for side, values in times.items():
        print(f"{side:<16} {best[side]:.2f} s   (all: {', '.join(f'{t:.2f}' for t in values)})")
    print(f"ratio flow / direct: {best['flow'] / best['direct']:.3f}x (target <= 1.10x); "
          f"with heartbeats: {best['flow+heartbeats'] / best['direct']:.3f}x")


if __name__ == "__main__":
    main()
