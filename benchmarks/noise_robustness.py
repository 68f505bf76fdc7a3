"""Label noise on the embedded default: does filter + robust loss beat plain DPO on flipped labels?

One round of the demo (configs/demo.yaml) built through the stages' ``run`` functions: the SFT
model samples the round's prompts, the verifier labels them, ``construct`` pairs one correct with one
wrong answer per prompt (clean labels: the verifier is exact). Then, for each flip rate r:

1. **inject** — chosen and rejected swapped on a seeded random r of the pairs (the scores stay with
   their positions: a labeler that got it wrong claims the wrong answer is better); the true flip
   mask is kept here, never shown to a stage;
2. **reward-model ensemble** — ``train-rm`` trains k Bradley–Terry members (initialised from the SFT
   policy) on *clean* pairs of other prompts (sampled by the same SFT policy from a disjoint block of
   the round's prompt split); ``label-rm`` scores every noisy pair with each member. The ensemble sees
   the pairs' texts only, never their (noisy) labels;
3. **filter** — the demo's filter plus the ensemble: strength s = mean member margin; pairs with
   s ≤ −t are dropped (or, the variant ``flip``, swapped back), t set so that only ``--false-flip``
   of the ensemble's own held-out *clean* pairs fall below −t. The filter reports its estimate ε̂ of
   the flip rate (``estimated_flip_rate`` on the pairs as they arrive, before any action, calibrated on the
   ensemble's clean held-out misranking; ``estimated_flip_rate_kept`` on the kept ones);
4. **train** from the SFT policy with the demo's train settings (β, learning rate, batch, epochs),
   the loss swapped: plain DPO (``sigmoid``) on the demo-filtered noisy pairs, against rdpo / cdpo on
   the ensemble-filtered pairs with ε = the filter's estimate (train ``label_flip_rate_source:
   filter_estimate``; rdpo clamps ε to ``max_label_flip_rate``);
5. **evaluate** every policy greedily on the same held-out prompts (``evaluate``; no sampling).

Printed: the flip-rate estimates against the true rates, and held-out accuracy ± SE for the SFT
model, DPO on the clean pairs, and per flip rate plain DPO vs filter + robust loss, with the paired
difference to plain DPO on the same prompts (mean of d_i = correct_i − plain_i, SE std(d)/√n).

Every stage result is cached in ``--store``; ``--reuse-store`` copies artifacts that another store
already holds for the same stage, config and inputs (e.g. the demo's SFT model and round-1 samples
in .prefloop/store) instead of recomputing them.

Measured (2 loaded cores, one thread): the full run takes 18 min with the demo's SFT model and samples
reused (SFT 42.2 %, clean DPO 45.6 %; at 40 % flips plain DPO 41.4 %, drop + cdpo 46.0 %, rdpo 30.7 %:
rdpo's loss is unbounded below and keeps pushing margins at the demo's learning rate); ``--quick``
10 min, but its ensemble (about 240 training pairs) is at chance, so its ε̂ is mostly bias.

Example (the full run uses the demo's round: 1024 prompts × 8 samples, 1000 held-out prompts):
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/noise_robustness.py --reuse-store .prefloop/store
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/noise_robustness.py --quick
"""

from __future__ import annotations

import argparse
import math
import shlex
import shutil
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from pydantic import Field

from prefloop.config import load_loop_config
from prefloop.datasets_spec import PREFERENCES
from prefloop.flows.loop import _seeded
from prefloop.stage import StageConfig, StageContext, StageOutput, StageResult, StageSpec, execute, lookup
from prefloop.storage import ArtifactStore
from prefloop.tasks import (
    construct,
    evaluation,
    labeling,
    prompts,
    reward_labels,
    reward_model,
    sampling,
)
from prefloop.tasks.common.ids import pair_id
from prefloop.tasks.common.statistics import paired_gain
from prefloop.tasks.filtering import stage as filtering
from prefloop.tasks.filtering.noise import AGGREGATE_LABELER_PREFIX
from prefloop.tasks.registry import run_stage
from prefloop.tasks.training import preference, reference, sft


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--store", default="/tmp/prefloop-noise-robustness/store")
    parser.add_argument("--reuse-store", default=None, help="copy cached stage outputs from this store (read only)")
    parser.add_argument("--flip-rates", type=float, nargs="+", default=[0.2, 0.4])
    parser.add_argument("--prompts", type=int, default=None, help="prompts of the round (default: the demo's)")
    parser.add_argument("--rm-prompts", type=int, default=512, help="prompts whose clean pairs train the ensemble")
    parser.add_argument("--rm-heldout-fraction", type=float, default=0.25,
                        help="share of the ensemble's pairs held out: its accuracy and the threshold t")
    parser.add_argument("--members", type=int, default=3, help="reward-model ensemble size")
    parser.add_argument("--rm-learning-rate", type=float, default=1e-3)
    parser.add_argument("--rm-epochs", type=float, default=2.0)
    parser.add_argument("--false-flip", type=float, default=0.05,
                        help="share of clean held-out pairs the strength threshold may catch (sets t)")
    parser.add_argument("--heldout", type=int, default=None, help="held-out prompts evaluated (default: the demo's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the flip injection")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true",
                        help="512 round prompts (the demo: 1024), 500 held-out prompts, no flip-rdpo arm")
    arguments = parser.parse_args()
    if arguments.quick:
        arguments.prompts = arguments.prompts or 512
        arguments.rm_prompts = 512
        arguments.heldout = arguments.heldout or 500
    return arguments


# ---------------------------------------------------------------------------------------------
# Two small stages of this benchmark: inject label flips, split pairs by prompt
# ---------------------------------------------------------------------------------------------
class InjectFlipsConfig(StageConfig):
    flip_rate: float = Field(ge=0.0, le=1.0, description="share of the pairs whose chosen and rejected are swapped")
    seed: int = Field(0, description="which pairs: a seeded random subset of exactly round(rate · n)")


def inject_flips(ctx: StageContext) -> StageOutput:
    pairs = ctx.read("preferences", PREFERENCES)
    config: InjectFlipsConfig = ctx.config
    rows = np.random.default_rng(config.seed).choice(pairs.num_rows, round(config.flip_rate * pairs.num_rows),
                                                     replace=False)
    flags = np.zeros(pairs.num_rows, dtype=bool)
    flags[rows] = True
    columns = {name: np.array(pairs.column(name).to_pylist(), dtype=object) for name in pairs.column_names}
    for first, second in (("chosen", "rejected"), ("chosen_sample_id", "rejected_sample_id")):
        columns[first][flags], columns[second][flags] = columns[second][flags], columns[first][flags].copy()
    columns["pair_id"][flags] = [pair_id(*texts) for texts in
                                 zip(columns["prompt"][flags], columns["chosen"][flags], columns["rejected"][flags],
                                     strict=True)]
    table = pa.Table.from_pydict({name: list(values) for name, values in columns.items()}, schema=pairs.schema)
    return StageOutput(table=table, metrics={"pairs": pairs.num_rows, "flipped": int(flags.sum())})


INJECT_FLIPS = StageSpec("benchmark-inject-flips", "1", InjectFlipsConfig, "preferences",
                         {"preferences": "preferences"}, PREFERENCES,
                         description="Swap chosen and rejected on a seeded random share of the pairs.")


class SplitConfig(StageConfig):
    part: str = Field(description="train or heldout")
    heldout_fraction: float = Field(gt=0.0, lt=1.0)


def split_pairs(ctx: StageContext) -> StageOutput:
    pairs = ctx.read("preferences", PREFERENCES)
    config: SplitConfig = ctx.config
    keys = [pid or prompt for pid, prompt in zip(pairs.column("prompt_id").to_pylist(),
                                                   pairs.column("prompt").to_pylist(), strict=True)]
    held = [reward_model.heldout_prompt(key, config.heldout_fraction) for key in keys]
    keep = [h if config.part == "heldout" else not h for h in held]
    return StageOutput(table=pairs.filter(pa.array(keep)))


SPLIT = StageSpec("benchmark-split-pairs", "1", SplitConfig, "preferences", {"preferences": "preferences"},
                  PREFERENCES, description="Pairs of a prompt-hash share (train-rm's own split rule).")


# ---------------------------------------------------------------------------------------------
# Running stages (cached in the store; optionally copied from another store)
# ---------------------------------------------------------------------------------------------
class Runner:
    def __init__(self, store: ArtifactStore, reuse: ArtifactStore | None) -> None:
        self.store, self.reuse = store, reuse
        self.seconds: dict[str, float] = {}

    def adopt(self, spec: StageSpec, inputs: dict[str, str], config: Any) -> None:
        """Copy this stage's output from the reuse store when it holds it (same spec, config, inputs)."""
        if self.reuse is None:
            return
        try:
            found = lookup(spec, inputs, config, self.reuse)
        except Exception:  # an input the other store lacks: nothing to reuse
            return
        if found is not None and not self.store.exists(found.ref):
            shutil.copytree(self.reuse._artifact_dir(found.ref), self.store._artifact_dir(found.ref))
            self.store.verify(found.ref)

    def __call__(self, module: ModuleType, inputs: dict[str, str], config: Any, name: str,
                 phase: str | None = None) -> StageResult:
        self.adopt(module.SPEC, inputs, config)
        started = time.perf_counter()
        result = run_stage(module.SPEC.name, inputs, config, self.store, name)
        key = phase or module.SPEC.name
        self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - started
        return result

    def own(self, spec: StageSpec, compute, inputs: dict[str, str], config: dict, name: str) -> StageResult:
        return execute(spec, compute, inputs, config, self.store, name)


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------
def orientation(table: pa.Table) -> set[tuple[str, str, str]]:
    return set(zip(*(table.column(c).to_pylist() for c in ("prompt", "chosen", "rejected")), strict=True))


def true_flip_rate(table: pa.Table, clean: set[tuple[str, str, str]]) -> float:
    """Share of rows whose (chosen, rejected) is the reverse of the verifier's."""
    rows = list(zip(*(table.column(c).to_pylist() for c in ("prompt", "chosen", "rejected")), strict=True))
    wrong = [row not in clean for row in rows]
    assert all(row in clean or (row[0], row[2], row[1]) in clean for row in rows), "a pair the round never built"
    return sum(wrong) / max(len(rows), 1)


def member_strengths(labels: pa.Table) -> np.ndarray:
    """s = mean over ensemble members of each pair's margin (label-rm's pair rows)."""
    per_pair: dict[str, list[float]] = {}
    for target, labeler, score in zip(*(labels.column(c).to_pylist() for c in ("target_id", "labeler", "score")),
                                      strict=True):
        if not labeler.startswith(AGGREGATE_LABELER_PREFIX):
            per_pair.setdefault(target, []).append(score)
    return np.array([np.mean(scores) for scores in per_pair.values()])


def correct_by_prompt(store: ArtifactStore, result: StageResult) -> dict[str, bool]:
    table = store.read_table(result.ref, "eval_results")
    return dict(zip(table.column("prompt_id").to_pylist(), table.column("correct").to_pylist(), strict=True))


def paired(after: dict[str, bool], before: dict[str, bool]) -> tuple[float, float]:
    gain, stderr, _ = paired_gain(after, before)
    return gain, stderr


def main() -> None:
    arguments = parse_arguments()
    torch.set_num_threads(arguments.threads)
    started = time.perf_counter()
    config = load_loop_config(arguments.config)
    Path(arguments.store).mkdir(parents=True, exist_ok=True)
    store = ArtifactStore(arguments.store)
    run = Runner(store, ArtifactStore(arguments.reuse_store) if arguments.reuse_store else None)
    round_prompts = arguments.prompts or config.sampling.max_prompts
    heldout = arguments.heldout or config.evaluation.max_prompts
    print(f"$ OMP_NUM_THREADS=1 {shlex.join([sys.executable, *sys.argv])}")
    print(f"round: {round_prompts} prompts × {config.sampling.n} samples (demo: {config.sampling.max_prompts}); "
          f"ensemble: {arguments.members} RMs on clean pairs of {arguments.rm_prompts} other prompts; "
          f"held-out: {heldout} prompts, greedy; flip seed {arguments.seed}; {arguments.threads} thread(s)")
    print("the ensemble never sees the injected labels: it learns from verifier-labelled pairs of other prompts and "
          "scores the round's pair texts; the flip mask is known only to this script", flush=True)

    # --- SFT and the round's clean pairs, as the demo builds them --------------------------------
    sft_prompts = run(prompts, {}, _seeded(config.sft_prompts, config, 0), "noise/sft-prompts")
    task_prompts = run(prompts, {}, _seeded(config.prompts, config, 0), "noise/prompts")
    sft_model = run(sft, {"prompts": sft_prompts.output}, _seeded(config.sft, config, 0), "noise/sft")

    def clean_pairs(round_index: int, max_prompts: int, name: str) -> StageResult:
        sampled = run(sampling, {"policy": sft_model.output, "prompts": task_prompts.output},
                      _seeded(config.sampling, config, round_index) | {"max_prompts": max_prompts}, f"noise/{name}/samples",
                      phase="sample")
        labels = run(labeling, {"samples": sampled.output, "prompts": task_prompts.output}, config.label.model_dump(),
                     f"noise/{name}/labels")
        return run(construct, {"samples": sampled.output, "labels": labels.output},
                   _seeded(config.construction, config, round_index), f"noise/{name}/preferences")

    pairs = clean_pairs(1, round_prompts, "round")
    clean = orientation(store.read_table(pairs.ref))
    # The ensemble's prompts: the block of the train split right after the round's (sampling takes the
    # (round − 1)-th run of max_prompts prompts), so no prompt is shared.
    rm_round = math.ceil(round_prompts / arguments.rm_prompts) + 1
    rm_pairs = clean_pairs(rm_round, arguments.rm_prompts, "rm-data")
    split = {"heldout_fraction": arguments.rm_heldout_fraction}
    rm_train = run.own(SPLIT, split_pairs, {"preferences": rm_pairs.output}, split | {"part": "train"},
                       "noise/rm-data/train")
    rm_heldout = run.own(SPLIT, split_pairs, {"preferences": rm_pairs.output}, split | {"part": "heldout"},
                         "noise/rm-data/heldout")
    ensemble = run(reward_model, {"preferences": rm_train.output, "heldout": rm_heldout.output,
                                  "policy": sft_model.output},
                   {"ensemble_size": arguments.members, "seed": arguments.seed,
                    "training": {"learning_rate": arguments.rm_learning_rate, "epochs": arguments.rm_epochs}},
                   "noise/ensemble", phase="train-rm")
    heldout_labels = run(reward_labels, {"reward_model": ensemble.output, "preferences": rm_heldout.output}, {},
                         "noise/rm-data/heldout-labels", phase="label-rm")
    strengths = member_strengths(store.read_table(heldout_labels.ref))
    threshold = max(0.0, -float(np.quantile(strengths, arguments.false_flip)))
    print(f"ensemble: {rm_train.rows} train / {rm_heldout.rows} held-out clean pairs; held-out pairwise accuracy "
          f"(mean of members) {ensemble.metrics['heldout_pairwise_accuracy']:.1%} ± "
          f"{ensemble.metrics['heldout_pairwise_accuracy_stderr']:.1%}; strength < 0 on "
          f"{np.mean(strengths < 0):.1%} of its clean held-out pairs; threshold t = {threshold:.3f} "
          f"(s ≤ −t on {np.mean(strengths <= -threshold):.1%} of them)", flush=True)

    # --- evaluation and training helpers ----------------------------------------------------------
    eval_config = _seeded(config.evaluation, config, 0) | {"samples_per_prompt": 0, "max_prompts": heldout}
    sft_eval = run(evaluation, {"policy": sft_model.output, "prompts": task_prompts.output}, eval_config,
                   "noise/sft/eval")
    filter_base = config.filter.model_dump()

    def train_and_evaluate(name: str, preferences: StageResult, loss: str, source: str = "config") -> dict:
        train_config = _seeded(config.train, config, 1, reference_policy=config.reference_policy)
        train_config["training"] = _seeded(config.train.training, config, 1) | {"loss": loss}
        train_config["label_flip_rate_source"] = source
        logps = run(reference, {"preferences": preferences.output, "reference": sft_model.output},
                    {"max_length": config.train.training.max_length}, f"noise/{name}/reference-logps")
        trained = run(preference, {"preferences": preferences.output, "policy": sft_model.output,
                                   "reference": sft_model.output, "reference_logps": logps.output},
                      train_config, f"noise/{name}/policy")
        evaluated = run(evaluation, {"policy": trained.output, "prompts": task_prompts.output,
                                     "baseline": sft_eval.output}, eval_config, f"noise/{name}/eval")
        print(f"  {name}: {trained.metrics['pairs']} pairs, {loss}, accuracy {evaluated.metrics['accuracy']:.1%}",
              flush=True)
        return {"name": name, "loss": loss, "pairs": trained.metrics["pairs"],
                "epsilon": trained.metrics.get("label_flip_rate"), "eval": evaluated}

    # --- clean DPO, then each flip rate -------------------------------------------------------------
    results: list[dict] = []
    estimates: list[dict] = []
    for rate in [0.0, *arguments.flip_rates]:
        tag = f"flip-{round(rate * 100)}"
        noisy = run.own(INJECT_FLIPS, inject_flips, {"preferences": pairs.output},
                        {"flip_rate": rate, "seed": arguments.seed}, f"noise/{tag}/preferences")
        noisy_table = store.read_table(noisy.ref)
        demo_filtered = run(filtering, {"preferences": noisy.output, "eval_prompts": task_prompts.output}, filter_base,
                            f"noise/{tag}/filtered")
        labels = run(reward_labels, {"reward_model": ensemble.output, "preferences": noisy.output}, {},
                     f"noise/{tag}/ensemble-labels", phase="label-rm")
        ensemble_filtered = {}
        for action in ("drop", "flip"):
            ensemble_filtered[action] = run(
                filtering, {"preferences": noisy.output, "eval_prompts": task_prompts.output,
                            "ensemble_labels": labels.output},
                filter_base | {"strong_negative_strength": threshold, "negative_strength_action": action},
                f"noise/{tag}/filtered-ensemble-{action}")
        row = {"rate": rate, "true_input": true_flip_rate(noisy_table, clean),
               "estimate_input": ensemble_filtered["drop"].metrics.get("estimated_flip_rate")}
        for action, result in ensemble_filtered.items():
            row[action] = {"kept": result.rows, "true": true_flip_rate(store.read_table(result.ref), clean),
                           "estimate": result.metrics.get("estimated_flip_rate_kept"),
                           "changed": result.drops.get("strength_negative", 0) + result.metrics.get("pairs_flipped", 0)}
        row["pairs"] = noisy_table.num_rows
        estimates.append(row)
        print(f"{tag}: {noisy_table.num_rows} pairs, true flip rate {row['true_input']:.3f}, ensemble estimate "
              f"{row['estimate_input']:.3f}", flush=True)
        variants = [("DPO on clean pairs" if rate == 0 else "plain DPO (demo filter)", "plain", demo_filtered,
                     "sigmoid", "config"),
                    ("drop s≤−t + rdpo(filter ε)", "drop-rdpo", ensemble_filtered["drop"], "rdpo", "filter_estimate"),
                    ("drop s≤−t + cdpo(filter ε)", "drop-cdpo", ensemble_filtered["drop"], "cdpo", "filter_estimate"),
                    ("flip s≤−t + rdpo(filter ε)", "flip-rdpo", ensemble_filtered["flip"], "rdpo", "filter_estimate")]
        if rate == 0.0:  # the cost of the robust pipeline when there is no noise
            variants = variants[:1] if arguments.quick else variants[:2]
        elif arguments.quick:
            variants = [v for v in variants if v[1] != "flip-rdpo"]
        for label, key, kept, loss, source in variants:
            results.append({**train_and_evaluate(f"{tag}/{key}", kept, loss, source), "rate": rate, "label": label,
                            "baseline": key == "plain"})

    # --- report -------------------------------------------------------------------------------------
    print("\nFlip-rate estimate ε̂ of the filter stage (est.) vs the true share of flipped pairs (true): all pairs, "
          "then the pairs kept after dropping s ≤ −t, or after flipping them")
    print(f"{'injected':>8} {'pairs':>6} {'true':>6} {'est.':>7} | {'drop: kept':>10} {'true':>6} {'est.':>7} |"
          f" {'flip: flipped':>13} {'true':>6} {'est.':>7}")
    for row in estimates:
        drop, flip = row["drop"], row["flip"]
        print(f"{row['rate']:>8.0%} {row['pairs']:>6} {row['true_input']:>6.3f} {row['estimate_input']:>7.3f} |"
              f" {drop['kept']:>10} {drop['true']:>6.3f} {drop['estimate']:>7.3f} |"
              f" {flip['changed']:>13} {flip['true']:>6.3f} {flip['estimate']:>7.3f}")

    sft_correct = correct_by_prompt(store, sft_eval)
    print(f"\nHeld-out accuracy ({heldout} prompts, greedy), ± binomial SE; gains paired on the same prompts")
    print(f"{'flips':>5}  {'policy':<26} {'loss':<7} {'pairs':>5} {'ε':>6}  {'accuracy':>15}  {'vs SFT':>15}"
          f"  {'vs plain DPO':>15}")
    print("(vs plain DPO: against the DPO run on the same pairs before the ensemble filter — the clean pairs at 0 %)")
    sft_accuracy = sft_eval.metrics
    print(f"{'':>5}  {'SFT':<26} {'':<7} {'':>5} {'':>6}  {sft_accuracy['accuracy']:>7.1%} ± {sft_accuracy['accuracy_stderr']:.1%}")
    plain: dict[float, dict[str, bool]] = {}
    for result in results:
        correct = correct_by_prompt(store, result["eval"])
        metrics = result["eval"].metrics
        gain, gain_se = paired(correct, sft_correct)
        versus = ""
        if result["baseline"]:
            plain[result["rate"]] = correct
        else:
            difference, difference_se = paired(correct, plain[result["rate"]])
            versus = f"{difference:+7.1%} ± {difference_se:.1%}"
        epsilon = f"{result['epsilon']:.3f}" if result["epsilon"] is not None and result["loss"] != "sigmoid" else ""
        print(f"{result['rate']:>5.0%}  {result['label']:<26} {result['loss']:<7} {result['pairs']:>5} {epsilon:>6}  "
              f"{metrics['accuracy']:>7.1%} ± {metrics['accuracy_stderr']:.1%}  {gain:+7.1%} ± {gain_se:.1%}  {versus:>15}")
    total = time.perf_counter() - started
    phases = ", ".join(f"{name} {seconds:.0f}s" for name, seconds in sorted(run.seconds.items(), key=lambda x: -x[1]))
    print(f"\nwall {total:.0f}s ({phases}); store {store.uri}")


if __name__ == "__main__":
    main()
