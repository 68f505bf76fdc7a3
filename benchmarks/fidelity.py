"""Which paper claims prefloop reproduces on the embedded default: one table over ≥ 3 seeds.

Each *row* is a loop config (a shipped config plus a few overrides) run with every seed in
``--seeds``; the seed changes the SFT warm start, the prompts and every sample. Per row and round the
table gives held-out greedy accuracy as mean ± standard deviation across seeds, and the paired gain
vs the row's own SFT model (same held-out prompts, d_i = correct_i − sft_i) per seed with its standard
error. Next to each claim: the paper, what it says, and whether this table reproduces its direction —
decided by the rule printed with it from the measured numbers, never by hand.

Rows (``--rows``, default all that are defined):

- ``bon-fixed`` — best-vs-worst pairs from n = 8 verified samples, DPO + NLL (Iterative RPO), the
  reference fixed at the SFT model (configs/demo.yaml's setting before this table chose ``previous_round``);
- ``bon-previous`` — the same with ``reference_policy: previous_round`` (iterative DPO: RLHFlow, SPIN;
  configs/demo.yaml as shipped);
- ``bon-previous-half-lr`` — the same at half the learning rate (5e-5): the third setting declared for
  choosing the demo's, before any result was seen;
- ``rso`` — statistical rejection sampling (configs/rso.yaml);
- ``mcts-dpo`` — MCTS step-level pairs trained with conservative DPO and the per-pair ε from the
  decision-time visit counts (configs/mcts_dpo.yaml, loss cdpo, ``label_flip_rate_source: confidence``).

Runs share whatever their configs share: every row of one seed uses the same SFT model and the same
round-0 evaluation, and rows whose round-1 sampling coincides share it (the store is content-addressed).
Everything lands in ``--store``, so an interrupted table resumes where it stopped and ``--report-only``
re-reads finished runs without computing anything.

``--quick`` runs every row on the smoke config (configs/smoke.yaml, tiny model, 1 round, 2 seeds): it
checks that each row's wiring runs end to end (``make test`` runs it, tests/test_fidelity.py); its
accuracies mean nothing.

Writes ``--out``/fidelity.md, fidelity.json and fidelity.png. Figures vary by CPU (training floats
differ across machines): compare directions and gains across seeds, not single figures.

Examples:
    .venv/bin/python benchmarks/fidelity.py --rows bon-fixed bon-previous --seeds 0 1 2
    .venv/bin/python benchmarks/fidelity.py --report-only
    .venv/bin/python benchmarks/fidelity.py --quick --store /tmp/fidelity-quick --out /tmp/fidelity-quick
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Row:
    name: str
    label: str
    config: str  # shipped config, relative to the repository
    overrides: dict[str, Any] = field(default_factory=dict)
    # On the smoke config (--quick): the overrides that select this row's method at smoke size.
    quick_overrides: dict[str, Any] = field(default_factory=dict)


# --quick: the smoke config with a warm start just good enough that rounds build pairs and train.
QUICK: dict[str, Any] = {"rounds": 1, "sampling": {"n": 8}, "sft": {
    "model": {"hidden_size": 64, "intermediate_size": 128}, "training": {"max_steps": 500, "batch_size": 32}}}

ROWS: dict[str, Row] = {row.name: row for row in (
    Row("bon-fixed", "best-of-n DPO, fixed reference (SFT)", "configs/demo.yaml",
        {"reference_policy": "fixed"}, {"reference_policy": "fixed"}),
    Row("bon-previous", "best-of-n DPO, previous-round reference", "configs/demo.yaml",
        {"reference_policy": "previous_round"}, {"reference_policy": "previous_round"}),
    # Declared before any result of it was seen: the third demo setting tried if previous_round alone does not
    # rise in every round on every seed (a smaller step per round: half the learning rate).
    Row("bon-previous-half-lr", "best-of-n DPO, previous-round reference, learning rate 5e-5", "configs/demo.yaml",
        {"reference_policy": "previous_round", "train": {"training": {"learning_rate": 0.00005}}},
        {"reference_policy": "previous_round", "train": {"training": {"learning_rate": 0.0000015}}}),
    Row("rso", "RSO (rejection-sampled pairs)", "configs/rso.yaml", {},
        {"sampling": {"n": 8}, "construction": {"method": "rso", "rso": {"num_accepted": 4}}}),
    Row("mcts-dpo", "MCTS-DPO (cDPO, per-pair ε at decision time)", "configs/mcts_dpo.yaml",
        {"train": {"label_flip_rate_source": "confidence", "training": {"loss": "cdpo"}}},
        {"reference_policy": "previous_round", "construction": {"method": "mcts"},
         "mcts": {"max_prompts": 8, "simulations": 2, "root_simulations": 4, "max_depth": 3, "lookahead_depth": 3,
                  "max_step_tokens": 8},
         "train": {"label_flip_rate_source": "confidence", "training": {"loss": "cdpo"}}}),
)}


@dataclass(frozen=True)
class Claim:
    paper: str
    says: str
    rule: str  # how "reproduced" is decided from the table, printed next to the verdict
    check: Callable[[dict[str, dict]], bool | None]


def _final(results: dict[str, dict], row: str) -> float | None:
    """A row's mean accuracy after its last round (None when the row was not run)."""
    rounds = results.get(row, {}).get("rounds")
    return rounds[-1]["accuracy_mean"] if rounds else None


def _sft(results: dict[str, dict]) -> float | None:
    for row in results.values():
        if row.get("rounds"):
            return row["rounds"][0]["accuracy_mean"]
    return None


def _greater(*values: float | None) -> bool | None:
    if any(v is None for v in values):
        return None
    return all(a > b for a, b in zip(values, values[1:], strict=False))


CLAIMS = (
    Claim("MCTS-DPO (Xie et al. 2024)", "step-level MCTS pairs beat instance-level best-of-n pairs, both beat SFT",
          "final-round mean accuracy: mcts-dpo > bon-fixed > SFT",
          lambda r: _greater(_final(r, "mcts-dpo"), _final(r, "bon-fixed"), _sft(r))),
    Claim("RSO (Liu et al. 2024)", "rejection-sampled pairs do at least as well as DPO's pairs on the same budget",
          "final-round mean accuracy: rso ≥ bon-fixed",
          lambda r: None if None in (_final(r, "rso"), _final(r, "bon-fixed"))
          else _final(r, "rso") >= _final(r, "bon-fixed")),
    Claim("Iterative DPO (Xiong et al. 2024; Tülu 3)", "each on-policy round improves on the last",
          "bon-previous: accuracy rises in every round for every seed",
          lambda r: r.get("bon-previous", {}).get("rises_every_round")),
    Claim("Iterative DPO, fixed reference", "each on-policy round improves on the last",
          "bon-fixed: accuracy rises in every round for every seed",
          lambda r: r.get("bon-fixed", {}).get("rises_every_round")),
)


def deep_merge(base: dict[str, Any], updates: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def row_config(row: Row, seed: int, quick: bool) -> Any:
    from prefloop.config import LoopConfig, read_yaml

    if quick:
        data = deep_merge(deep_merge(read_yaml(REPO / "configs/smoke.yaml"), QUICK), row.quick_overrides)
    else:
        data = deep_merge(read_yaml(REPO / row.config), row.overrides)
    return LoopConfig.model_validate(data | {"seed": seed, "name": f"fidelity-{row.name}-seed{seed}"})


def run_row(row: Row, seed: int, store: str, quick: bool, compute: bool) -> list[dict[str, Any]] | None:
    """Per round of one (row, seed): accuracy ± SE and the paired gain vs SFT ± SE. None when the run is
    not finished and ``compute`` is off."""
    from prefloop.flows.loop import lookup_loop, run_loop
    from prefloop.orchestration import StageNotInStore
    from prefloop.storage import ArtifactStore

    config = row_config(row, seed, quick)
    try:
        summary = lookup_loop(config, store)
    except StageNotInStore:
        if not compute:
            return None
        started = time.perf_counter()
        print(f"[fidelity] {row.name} seed {seed}: running", flush=True)
        summary = run_loop(config, store)
        print(f"[fidelity] {row.name} seed {seed}: done in {time.perf_counter() - started:.0f} s", flush=True)
    target = ArtifactStore(store)
    rounds = []
    for summary_round in summary.rounds:
        values = {row_["metric"]: row_ for row_ in target.read_table(target.resolve(summary_round.metrics)).to_pylist()}
        gain = values.get("accuracy_gain")
        rounds.append({
            "round": summary_round.round,
            "accuracy": values["accuracy"]["value"], "accuracy_stderr": values["accuracy"]["stderr"],
            "gain": 0.0 if summary_round.round == 0 else (gain or {}).get("value"),
            "gain_stderr": 0.0 if summary_round.round == 0 else (gain or {}).get("stderr"),
            "pairs_kept": (values.get("pairs_kept") or {}).get("value"),
        })
    return rounds


def _mean_sd(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def aggregate(per_seed: dict[int, list[dict[str, Any]]]) -> dict[str, Any]:
    """Across seeds, per round: accuracy and gain mean ± sd, the per-seed gains ± SE, and whether every
    seed rose in every round."""
    seeds = sorted(per_seed)
    count = min(len(per_seed[s]) for s in seeds)
    rounds = []
    for index in range(count):
        accuracies = [per_seed[s][index]["accuracy"] for s in seeds]
        gains = [per_seed[s][index]["gain"] for s in seeds]
        accuracy_mean, accuracy_sd = _mean_sd(accuracies)
        gain_mean, gain_sd = _mean_sd([g for g in gains if g is not None] or [math.nan])
        rounds.append({"round": index, "accuracy_mean": accuracy_mean, "accuracy_sd": accuracy_sd,
                       "gain_mean": gain_mean, "gain_sd": gain_sd,
                       "per_seed": {s: per_seed[s][index] for s in seeds}})
    rises = {s: all(b["accuracy"] > a["accuracy"] for a, b in zip(per_seed[s], per_seed[s][1:], strict=False))
             for s in seeds}
    return {"seeds": seeds, "rounds": rounds, "rises_per_seed": rises, "rises_every_round": all(rises.values())}


def _pct(value: float | None, sd: float | None = None, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    text = f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"
    return text + (f" ± {100 * sd:.1f}" if sd is not None else "")


def render_markdown(results: dict[str, dict], seeds: list[int], quick: bool, machine: str) -> str:
    lines = [f"Held-out greedy accuracy (%), mean ± sd across seeds {seeds}"
             + (" — QUICK (smoke config: wiring only, numbers meaningless)" if quick else "")
             + f"; {machine}. Gain: paired vs the seed's SFT model on the same prompts, mean ± sd across seeds;"
             " per seed: gain ± paired SE.", ""]
    count = max((len(r["rounds"]) for r in results.values() if r.get("rounds")), default=0)
    header = "| row | " + " | ".join(["SFT"] + [f"round {k}" for k in range(1, count)]) \
        + " | gain after last round | per seed: gain ± SE | rises every round (per seed) |"
    lines += [header, "|" + "---|" * (count + 4)]
    for name, result in results.items():
        if not result.get("rounds"):
            lines.append(f"| {ROWS[name].label} | " + " | ".join(["not run"] * count) + " | – | – | – |")
            continue
        cells = [_pct(r["accuracy_mean"], r["accuracy_sd"]) for r in result["rounds"]]
        cells += ["–"] * (count - len(cells))
        last = result["rounds"][-1]
        per_seed = ", ".join(f"{_pct(v['gain'], None, True)} ± {_pct(v['gain_stderr'])}"
                             for v in last["per_seed"].values())
        rises = ", ".join(f"seed {s}: {'yes' if ok else 'no'}" for s, ok in result["rises_per_seed"].items())
        lines.append(f"| {ROWS[name].label} | " + " | ".join(cells)
                     + f" | {_pct(last['gain_mean'], last['gain_sd'], True)} | {per_seed} | {rises} |")
    lines += ["", "| paper | claim | rule (from this table) | reproduced? |", "|---|---|---|---|"]
    for claim in CLAIMS:
        verdict = claim.check(results)
        lines.append(f"| {claim.paper} | {claim.says} | {claim.rule} | "
                     f"{'not measured' if verdict is None else 'yes' if verdict else 'no'} |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for name, result in results.items():
        if not result.get("rounds"):
            continue
        rounds = result["rounds"]
        axis.errorbar([r["round"] for r in rounds], [100 * r["accuracy_mean"] for r in rounds],
                      yerr=[100 * (r["accuracy_sd"] or 0.0) for r in rounds], label=ROWS[name].label, capsize=3,
                      marker="o")
    axis.set_xlabel("round (0 = SFT)")
    axis.set_ylabel("held-out accuracy, % (mean ± sd over seeds)")
    axis.legend(fontsize=7)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="default 0 1 2 (quick: 0 1)")
    parser.add_argument("--store", default=None, help="default .prefloop/fidelity (quick: .prefloop/fidelity-quick)")
    parser.add_argument("--out", default=None, help="where the table goes (default: the store's parent)")
    parser.add_argument("--quick", action="store_true", help="every row on the smoke config, 1 round, 2 seeds")
    parser.add_argument("--report-only", action="store_true", help="tabulate finished runs, compute nothing")
    parser.add_argument("--machine", default="2-core CPU development machine",
                        help="named in the table: figures vary by CPU")
    arguments = parser.parse_args(argv)
    from prefloop.environment import apply_offline_defaults

    apply_offline_defaults()
    seeds = arguments.seeds or ([0, 1] if arguments.quick else [0, 1, 2])
    store = arguments.store or str(REPO / (".prefloop/fidelity-quick" if arguments.quick else ".prefloop/fidelity"))
    out = Path(arguments.out or Path(store).parent)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    # Seed-major: every row of seed 0 first (they share its SFT model), so a partial table has whole seeds.
    per_row: dict[str, dict[int, list[dict]]] = {name: {} for name in arguments.rows}
    for seed in seeds:
        for name in arguments.rows:
            rounds = run_row(ROWS[name], seed, store, arguments.quick, compute=not arguments.report_only)
            if rounds is not None:
                per_row[name][seed] = rounds
    for name in arguments.rows:
        finished = per_row[name]
        results[name] = aggregate(finished) if finished else {}
    markdown = render_markdown(results, seeds, arguments.quick, arguments.machine)
    (out / "fidelity.md").write_text(markdown, encoding="utf-8")
    (out / "fidelity.json").write_text(json.dumps({"seeds": seeds, "quick": arguments.quick, "rows": results,
                                                   "claims": {c.rule: c.check(results) for c in CLAIMS}},
                                                  indent=1, default=str), encoding="utf-8")
    plot(results, out / "fidelity.png")
    print(markdown)
    print(f"written: {out / 'fidelity.md'}, fidelity.json, fidelity.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
