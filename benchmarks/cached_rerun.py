"""A cached rerun of a finished run, as a newcomer types it (``make demo`` a second time), against the goal.

Each side is ``prefloop run --config CONFIG`` in a fresh process, with the Makefile's environment and
no Prefect server running (``PREFECT_API_URL`` removed), on a store that already holds the finished
run: "prefect" is the default command (it looks every stage up before Prefect, and starts Prefect's
throw-away server only if something must compute), "no-prefect" adds ``--no-prefect`` (the stages
called directly). The sides alternate; every run must report 0 computed stages. Printed: every time,
the best of each side, and the ratios best prefect / 10 s (issue 19, goal 6: < 10 s on the demo) and
best prefect / best no-prefect.

    .venv/bin/python benchmarks/cached_rerun.py                # configs/demo.yaml --name demo, ./.prefloop/store
    .venv/bin/python benchmarks/cached_rerun.py --quick        # configs/smoke.yaml in a scratch store

The demo's store must hold the finished demo (``make demo`` once): a first, untimed run makes sure of
it, and would compute whatever is missing (the whole demo on an empty store). ``--quick`` first runs
the smoke loop into a scratch store with ``--no-prefect`` (about 15 s on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from prefloop.environment import offline_defaults

ROOT = Path(__file__).resolve().parents[1]
GOAL_SECONDS = 10.0
SUMMARY = re.compile(r"(\d+) stages: (\d+) computed, (\d+) cached")


def prefloop_command() -> list[str]:
    """The ``prefloop`` console script beside this interpreter (what ``make demo`` runs), else the CLI module."""
    script = Path(sys.executable).with_name("prefloop")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from prefloop.cli import main; main()"]


def newcomer_environment() -> dict[str, str]:
    """The Makefile's exports over this process's environment, and no Prefect server to talk to."""
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    return env | offline_defaults(ROOT)


def run_once(arguments: list[str], env: dict[str, str]) -> tuple[float, int, int]:
    """Seconds, stages and computed stages of one ``prefloop run``; a failure stops the benchmark."""
    started = time.perf_counter()
    result = subprocess.run([*prefloop_command(), "run", *arguments], cwd=ROOT, env=env, capture_output=True,
                            text=True)
    seconds = time.perf_counter() - started
    found = SUMMARY.search(result.stdout)
    if result.returncode != 0 or found is None:
        sys.exit(f"prefloop run {' '.join(arguments)} failed (exit {result.returncode}):\n"
                 f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return seconds, int(found.group(1)), int(found.group(2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="configs/smoke.yaml in a scratch store")
    parser.add_argument("--config", default=None, help="default configs/demo.yaml (configs/smoke.yaml with --quick)")
    parser.add_argument("--name", default=None, help="run name (default: demo; the config's with --quick)")
    parser.add_argument("--store", default=None, help="store holding the finished run (default ./.prefloop/store)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side (at least 3)")
    args = parser.parse_args()
    repeats = max(3, args.repeats)
    config = args.config or ("configs/smoke.yaml" if args.quick else "configs/demo.yaml")
    name = args.name or (None if args.quick else "demo")
    scratch = Path(tempfile.mkdtemp(prefix="prefloop-cached-rerun-")) if args.quick else None
    store = args.store or (str(scratch / "store") if scratch else None)
    env = newcomer_environment()
    if scratch is not None:
        env["PREFECT_HOME"] = str(scratch / "prefect")  # a scratch run leaves the project's Prefect database alone
    base = ["--config", config, *(["--name", name] if name else []), *(["--store", store] if store else [])]
    try:
        seconds, stages, computed = run_once([*base, "--no-prefect"] if scratch else base, env)
        print(f"prepare (untimed): {stages} stages, {computed} computed in {seconds:.1f} s")
        sides = {"prefect": base, "no-prefect": [*base, "--no-prefect"]}
        times: dict[str, list[float]] = {side: [] for side in sides}
        for _ in range(repeats):
            for side, arguments in sides.items():
                seconds, stages, computed = run_once(arguments, env)
                if computed:
                    sys.exit(f"side {side}: {computed} of {stages} stages computed; a cached rerun must compute none")
                times[side].append(seconds)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    best = {side: min(values) for side, values in times.items()}
    print(f"cached rerun of {config} ({stages} stages, 0 computed), no Prefect server running, best of {repeats} "
          "alternating runs per side")
    for side, values in times.items():
        print(f"{side:<11} {best[side]:6.2f} s   (all: {', '.join(f'{t:.2f}' for t in values)})")
    print(f"ratio prefect / goal {GOAL_SECONDS:.0f} s: {best['prefect'] / GOAL_SECONDS:.3f}x (target < 1.0x); "
          f"prefect / no-prefect: {best['prefect'] / best['no-prefect']:.3f}x")


if __name__ == "__main__":
    main()
