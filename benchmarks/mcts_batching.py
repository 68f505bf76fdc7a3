"""Batched MCTS vs one tree at a time, with and without the prefix KV cache, in one process.

Goal (issue 19, item 4): batched with the prefix cache ≥ 8× one tree at a time at the default 32 trees.

A small SFT policy is trained first (or ``--policy DIR`` loads a model directory), then the same
search config runs twice on the same prompts — all trees advancing together (every round of
expansions one ``generate`` call, every round of self-evaluations one ``score_logprobs`` call) and
one tree at a time (``trees_per_batch: 1``) — and the ratio of their wall times is printed.

Same trees? At temperature 0 the two runs must build identical trees (node for node: step texts,
visits, committed paths, statuses; values up to float rounding of batched vs single forward passes):
that is checked and printed. At temperature 1 they differ in the sampled texts only, because the
backend draws a batch's samples from one random stream, so a tree's draws depend on which other trees
share its batch; the printed per-run statistics (committed accuracy, nodes per tree) show that the
two searches are the same algorithm on the same budget.

Prefix cache (``prefix_cache_mib``, on by default): the HF backend keeps the KV cache of every generated
step, so an expansion or self-evaluation feeds only the tokens after the longest cached prefix instead of
the whole path. Both sides run with it (the same code, only ``trees_per_batch`` differs); the searches
without it are timed too, and the trees with and without it are checked to be the same at temperature 0.

Both wall time and this process's CPU time are printed: on a machine shared with other work, wall time
swings with the load, while CPU time (one torch thread) measures the work each search did.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/mcts_batching.py [--trees 32] [--policy DIR] [--repeats 3]
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

from prefloop.backends.hf import HFBackend
from prefloop.datasets_spec import PROMPTS
from prefloop.environment import apply_offline_defaults
from prefloop.storage import ArtifactStore
from prefloop.tasks.common.prompts import select_prompts
from prefloop.tasks.common.search_trees import SearchTree
from prefloop.tasks.mcts.search import TreeSearch, answer_line
from prefloop.tasks.mcts.stage import MCTSConfig
from prefloop.tasks.registry import run_stage

GOAL = 8.0
NO_CACHE = {"prefix_cache_mib": 0}
SEARCH = {
    "children_per_node": 2, "root_simulations": 8, "simulations": 4, "lookahead_depth": 4, "max_depth": 6,
    "max_step_tokens": 12, "self_eval_weight": 0.5, "self_eval_template": "{prompt}{steps}?",
    "self_eval_yes": "A", "self_eval_no": "?", "seed": 0,
}


def train_policy(work: Path, steps: int) -> tuple[Path, list[dict]]:
    """A quick SFT policy on 1-3-operation problems, and held-out-free training prompts to search."""
    store = ArtifactStore(work / "store")
    task = {"min_ops": 1, "max_ops": 3}
    sft_prompts = run_stage("prompts", {}, {"n_train": 2000, "n_heldout": 0, "task": task}, store)
    search_prompts = run_stage("prompts", {}, {"n_train": 256, "n_heldout": 0, "task": task, "seed": 1}, store)
    policy = run_stage("sft", {"prompts": sft_prompts.output}, {
        "model": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128,
                  "max_position_embeddings": 96},
        "training": {"max_steps": steps, "batch_size": 32, "learning_rate": 0.003, "warmup_steps": 20},
    }, store)
    rows = select_prompts(store.read_table(search_prompts.ref), "train", None)
    rows = rows.select([c for c in ("prompt_id", "prompt", "reference_answer") if c in PROMPTS.column_names])
    return store.local_files(policy.ref), rows.to_pylist()


def search(backend: HFBackend, rows: list[dict], settings: dict
           ) -> tuple[tuple[float, float], list[SearchTree], TreeSearch]:
    """Search one tree per row; returns (wall seconds, CPU seconds), the trees and the runner."""
    config = MCTSConfig(**settings)
    trees = [SearchTree(tree_id=f"t{i}", prompt_id=r["prompt_id"], prompt=r["prompt"],
                        reference_answer=r["reference_answer"]) for i, r in enumerate(rows)]
    runner = TreeSearch(backend, config, answer_line(config.answer_prefix))
    started, cpu_started = time.perf_counter(), time.process_time()
    runner.run(trees)
    return (time.perf_counter() - started, time.process_time() - cpu_started), trees, runner


def same_trees(left: list[SearchTree], right: list[SearchTree]) -> tuple[bool, str]:
    """Node for node: structure, texts, visits and statuses exactly; values to 1e-5 (float32 forward passes
    over different batch layouts, or a cached prefix, differ in the last bits)."""
    for a, b in zip(left, right, strict=True):
        if a.status != b.status or len(a.nodes) != len(b.nodes):
            return False, f"tree {a.tree_id}: status {a.status} vs {b.status}, {len(a.nodes)} vs {len(b.nodes)} nodes"
        for x, y in zip(a.nodes, b.nodes, strict=True):
            exact = (x.parent, x.step, x.visits, x.committed, x.terminal, x.correct, x.invalid_reason)
            if exact != (y.parent, y.step, y.visits, y.committed, y.terminal, y.correct, y.invalid_reason):
                return False, f"tree {a.tree_id} node {x.index}: {exact} vs " \
                              f"{(y.parent, y.step, y.visits, y.committed, y.terminal, y.correct, y.invalid_reason)}"
            for name in ("q_value", "value", "prior", "evaluation"):
                if not math.isclose(getattr(x, name), getattr(y, name), rel_tol=1e-5, abs_tol=1e-5):
                    return False, f"tree {a.tree_id} node {x.index}: {name} {getattr(x, name)} vs {getattr(y, name)}"
    return True, "identical"


def describe(trees: list[SearchTree], runner: TreeSearch) -> str:
    correct = sum(t.status == "correct" for t in trees) / len(trees)
    nodes = sum(len(t.nodes) for t in trees) / len(trees)
    return (f"committed accuracy {correct:5.1%}, {nodes:5.1f} nodes/tree, {runner.counters.simulations} simulations, "
            f"{runner.counters.generate_calls} generate + {runner.counters.score_calls} score calls")


def main() -> None:
    apply_offline_defaults()  # the settings real runs use (e.g. no tokenizer thread pool on 2 cores)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trees", type=int, default=32, help="prompts searched (one tree each)")
    parser.add_argument("--sft-steps", type=int, default=300, help="SFT steps of the policy trained first")
    parser.add_argument("--policy", type=Path, default=None, help="a model directory to search with instead")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs of each side, alternating; the best of each is compared (the same search "
                        "took 2.6-4.3 s on one quiet machine from run to run, so one run each is not enough)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="prefloop-mcts-bench-") as work:
        began = time.perf_counter()
        policy_dir, rows = train_policy(Path(work), args.sft_steps)
        policy_dir = args.policy or policy_dir
        print(f"policy: {policy_dir} (ready in {time.perf_counter() - began:.0f}s); {args.trees} trees, search {SEARCH}")
        rows = rows[: args.trees]
        backend = HFBackend.from_directory(policy_dir, batch_size=max(64, 2 * args.trees))
        search(backend, rows[:2], SEARCH)  # warm-up: imports, kernels

        identical_settings = SEARCH | {"temperature": 0.0}
        _, greedy_batched, _ = search(backend, rows, identical_settings)
        _, greedy_single, _ = search(backend, rows, identical_settings | {"trees_per_batch": 1})
        _, greedy_uncached, _ = search(backend, rows, identical_settings | NO_CACHE)
        same = same_trees(greedy_batched, greedy_single)
        same_uncached = same_trees(greedy_batched, greedy_uncached)

        sides = {"batched": SEARCH, "one at a time": SEARCH | {"trees_per_batch": 1},
                 "batched, no cache": SEARCH | NO_CACHE, "one at a time, no cache": SEARCH | {"trees_per_batch": 1} | NO_CACHE}
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
        last: dict[str, tuple[list[SearchTree], TreeSearch]] = {}
        for _ in range(args.repeats):
            for name, settings in sides.items():
                took, trees, runner = search(backend, rows, settings)
                times[name].append(took)
                last[name] = trees, runner
    best = {name: min(runs) for name, runs in times.items()}
    print(f"best of {args.repeats} runs each, alternating (load average now: {os.getloadavg()[0]:.1f})")
    for name, (wall, cpu) in best.items():
        counters = last[name][1].counters
        reused = (f"; prefix cache: {counters.prefix_tokens_reused} of {counters.prefix_tokens_asked} tokens reused"
                  if counters.prefix_tokens_asked else "")
        print(f"{name:24s} {wall:7.2f}s (CPU {cpu:6.2f}s)  {describe(*last[name])}{reused}"
              f"  (all: {', '.join(f'{w:.2f}s/CPU {c:.2f}s' for w, c in times[name])})")
    print(f"same trees at temperature 0: batched vs one at a time: {same[0]} ({same[1]}); "
          f"with vs without the prefix cache: {same_uncached[0]} ({same_uncached[1]})")
    ratio = best["one at a time"][0] / best["batched"][0]
    print(f"speed-up of batched MCTS (prefix cache on both sides): {ratio:.1f}x (CPU time: "
          f"{best['one at a time'][1] / best['batched'][1]:.1f}x; goal >= {GOAL:.0f}x: {'met' if ratio >= GOAL else 'NOT met'})")
    print(f"vs one at a time without the cache: {best['one at a time, no cache'][0] / best['batched'][0]:.1f}x "
          f"(CPU {best['one at a time, no cache'][1] / best['batched'][1]:.1f}x); the cache alone, batched: "
          f"{best['batched, no cache'][0] / best['batched'][0]:.2f}x (CPU {best['batched, no cache'][1] / best['batched'][1]:.2f}x)")


if __name__ == "__main__":
    main()
