"""Label noise on the embedded default: does filter + robust loss beat plain DPO on flipped labels?

One round of a loop config (configs/demo.yaml by default), built with the very stage calls and configs the
loop makes (:func:`noise_round`), so in a shared store the SFT model, the round-1 samples, labels, pairs and
the round-0 evaluation are the loop's own artifacts (benchmarks/fidelity.py relies on it). The verifier
labels the samples and ``construct`` pairs one correct with one wrong answer per prompt (clean labels:
the verifier is exact). Then, for each flip rate r:

1. **inject** — chosen and rejected swapped on a seeded random r of the pairs (the scores stay with
   their positions: a labeler that got it wrong claims the wrong answer is better); the true flip
   mask is kept here, never shown to a stage;
2. **reward-model ensemble** — ``train-rm`` trains k Bradley–Terry members (initialised from the SFT
   policy) on *clean* verifier pairs of prompts the loop never samples (:func:`reward_model_pairs`: the
   SFT model's samples on fresh prompts of the same task, any prompt of the loop's set removed), with the
   loop setting ``reward_model``'s own train-rm config, so benchmarks/fidelity.py's ``rm-ensemble`` rows
   reuse the same ensemble; ``label-rm`` scores every noisy pair with each member. The ensemble sees the
   pairs' texts only, never their (noisy) labels;
3. **filter** — the loop's filter plus the ensemble: strength s = mean member margin; pairs with
   s ≤ −t are dropped (or, arm ``flip-rdpo``, swapped back), t set so that only ``false_flip`` of the
   ensemble's own held-out *clean* pairs (train-rm's held-out split) fall below −t. The filter's ε̂
   (``estimated_flip_rate``) is made on the pairs as they arrive, before any action, calibrated with the
   ensemble's misranking rates on its clean held-out pairs (ε = (d − q)/(1 − 2q), Natarajan et al. 2013);
4. **train** from the SFT policy with the loop's train settings (β, learning rate, batch, epochs, the
   round-1 reference), the loss swapped: plain DPO (``sigmoid``, Rafailov et al. 2023) on the loop-filtered
   noisy pairs, against cDPO (Mitchell 2023) / rDPO (Chowdhury et al. 2024) on the ensemble-filtered pairs
   with ε = the filter's estimate (train ``label_flip_rate_source: filter_estimate``; rdpo clamps ε to
   ``max_label_flip_rate``);
5. **evaluate** every policy greedily on the held-out prompts (``evaluate``), paired with the SFT model's
   round-0 evaluation (accuracy gain = mean of d_i = correct_i − sft_i, SE std(d)/√n) and with plain DPO at
   the same flip rate.

Printed: the flip-rate estimates against the true rates, and held-out accuracy ± SE per flip rate and arm.
Every stage result is cached in ``--store``; ``--reuse-store`` copies artifacts that another store already
holds for the same stage, config and inputs (e.g. the demo's SFT model and round-1 samples in .prefloop/store).

Measured before this file was refactored into functions (2 loaded cores, one thread; ensemble then trained on
round 3's prompts): 18 min with the demo's SFT model and samples reused (SFT 42.2 %, clean DPO 45.6 %; at 40 %
flips plain DPO 41.4 %, drop + cdpo 46.0 %, rdpo 30.7 %: rdpo's loss is unbounded below and keeps pushing
margins at the demo's learning rate).

Over 400 lines: the benchmark's three small stages, its stage runner (compute or look up only), the loop's
starting point rebuilt stage for stage, and the measurement with its command line belong to one experiment.

Example (the full run uses the demo's round: 1024 prompts × 8 samples, 1000 held-out prompts):
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/noise_robustness.py --reuse-store .prefloop/store
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/noise_robustness.py --quick
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import Field

from prefloop.datasets_spec import PREFERENCES, PROMPTS
from prefloop.flows.loop import _seeded
from prefloop.flows.training import reference_and_train
from prefloop.orchestration import StageNotInStore, lookup_caller
from prefloop.stage import (
    StageConfig,
    StageContext,
    StageOutput,
    StageResult,
    StageSpec,
    execute,
    lookup,
    output_identity,
    parse_config,
    resolve_inputs,
)
from prefloop.storage import ArtifactRef, ArtifactStore
from prefloop.tasks import reward_model
from prefloop.tasks.common.ids import pair_id
from prefloop.tasks.common.statistics import paired_gain
from prefloop.tasks.filtering.noise import AGGREGATE_LABELER_PREFIX
from prefloop.tasks.registry import run_stage, stage_entry

# Arm → (label, ensemble filter action or None for the loop's filter alone, loss).
ARMS: dict[str, tuple[str, str | None, str]] = {
    "plain": ("plain DPO (loop filter)", None, "sigmoid"),
    "filter-cdpo": ("filter s≤−t + cDPO (calibrated ε)", "drop", "cdpo"),
    "filter-rdpo": ("filter s≤−t + rDPO (calibrated ε)", "drop", "rdpo"),
    "flip-rdpo": ("flip s≤−t + rDPO (calibrated ε)", "flip", "rdpo"),
}


# ---------------------------------------------------------------------------------------------
# The benchmark's own small stages: inject label flips, split pairs, prompts the loop never uses
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
    columns = {name: pairs.column(name).to_pylist() for name in pairs.column_names}
    # The sampled token ids move with their texts: training feeds them in place of the texts.
    swapped = [(a, b) for a, b in (("chosen", "rejected"), ("chosen_sample_id", "rejected_sample_id"),
                                   ("chosen_token_ids", "rejected_token_ids")) if a in columns]
    for index in np.flatnonzero(flags):
        for first, second in swapped:
            columns[first][index], columns[second][index] = columns[second][index], columns[first][index]
        columns["pair_id"][index] = pair_id(columns["prompt"][index], columns["chosen"][index],
                                            columns["rejected"][index])
    table = pa.Table.from_pydict(columns, schema=pairs.schema)
    return StageOutput(table=table, metrics={"pairs": pairs.num_rows, "flipped": int(flags.sum())})


INJECT_FLIPS = StageSpec("benchmark-inject-flips", "2", InjectFlipsConfig, "preferences",
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


class UnusedPromptsConfig(StageConfig):
    max_prompts: int = Field(ge=1, description="how many of the candidates' training prompts to keep")


def unused_prompts(ctx: StageContext) -> StageOutput:
    """The first ``max_prompts`` training prompts of ``candidates`` whose text is nowhere in ``prompts``."""
    used = set(ctx.read("prompts", PROMPTS).column("prompt").to_pylist())
    candidates = ctx.read("candidates", PROMPTS)
    keep = [split == "train" and prompt not in used for prompt, split in
            zip(candidates.column("prompt").to_pylist(), candidates.column("split").to_pylist(), strict=True)]
    fresh = candidates.filter(pa.array(keep))
    if fresh.num_rows < ctx.config.max_prompts:
        raise ValueError(f"only {fresh.num_rows} candidate prompts are unused by the loop, {ctx.config.max_prompts} "
                         "wanted: ask the candidates' prompts stage for more training prompts")
    return StageOutput(table=fresh.slice(0, ctx.config.max_prompts), metrics={"overlapping": keep.count(False)})


UNUSED_PROMPTS = StageSpec("benchmark-unused-prompts", "1", UnusedPromptsConfig, "prompts",
                           {"prompts": "prompts", "candidates": "prompts"}, PROMPTS,
                           description="Training prompts of a candidate set that a loop's prompt set lacks.")


# ---------------------------------------------------------------------------------------------
# Running stages: computed or only looked up, optionally copied from another store
# ---------------------------------------------------------------------------------------------
class Stages:
    """Runs the registry's stages and this benchmark's own, in one store. ``compute`` off: only stored
    results are returned and the first missing one raises :class:`StageNotInStore`. Every result is kept
    in ``results`` (its ``cached`` flag says whether it was a store hit)."""

    def __init__(self, store: str, compute: bool = True, reuse: str | None = None) -> None:
        self.store = ArtifactStore(store)
        self.compute, self.reuse = compute, ArtifactStore(reuse) if reuse else None
        self.results: list[StageResult] = []
        self.seconds: dict[str, float] = {}

    def _adopt(self, spec: StageSpec, inputs: dict[str, str], config: Any) -> None:
        """Copy this stage's output from the reuse store when it holds it (same spec, config, inputs)."""
        try:
            found = lookup(spec, inputs, config, self.reuse)
        except Exception:  # noqa: BLE001 - an input the other store lacks: nothing to reuse
            return
        if found is not None and not self.store.exists(found.ref):
            shutil.copytree(self.reuse._artifact_dir(found.ref), self.store._artifact_dir(found.ref))
            self.store.verify(found.ref)

    def _timed(self, phase: str, run: Callable[[], StageResult]) -> StageResult:
        started = time.perf_counter()
        result = run()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - started
        self.results.append(result)
        return result

    def __call__(self, stage: str, inputs: dict[str, str], config: Any, name: str) -> StageResult:
        if not self.compute:
            return self._timed(stage, lambda: lookup_caller(stage, inputs, config, self.store.uri, name))
        if self.reuse is not None:
            self._adopt(stage_entry(stage).spec, inputs, config)
        return self._timed(stage, lambda: run_stage(stage, inputs, config, self.store, name))

    def caller(self, stage: str, inputs: dict[str, str], config: dict[str, Any], store: str,
               name: str) -> StageResult:
        """The :data:`~prefloop.stage.StageCaller` form (``store`` is this object's)."""
        return self(stage, inputs, config, name)

    def own(self, spec: StageSpec, compute: Callable[[StageContext], StageOutput], inputs: dict[str, str],
            config: dict[str, Any], name: str) -> StageResult:
        if self.compute:
            return self._timed(spec.name, lambda: execute(spec, compute, inputs, config, self.store, name))
        # A stage outside the project is identified by its compute function too (prefloop.code_identity).
        ref = output_identity(spec, resolve_inputs(spec, inputs, self.store), parse_config(spec, config), self.store,
                              compute).ref
        if not self.store.exists(ref):
            raise StageNotInStore(spec.name, name)
        manifest = self.store.read_manifest(ref)
        self.store.set_ref(name, ref, note=f"{spec.name} (cached)")
        return self._timed(spec.name, lambda: StageResult(stage=spec.name, output=str(ref), cached=True,
                                                          rows=manifest.rows, drops=manifest.drops,
                                                          metrics=manifest.metrics, name=name))


# ---------------------------------------------------------------------------------------------
# The loop's starting point and round-1 pairs, and the reward model's clean pairs
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Start:
    prompts: StageResult  # the task prompts (RUN/prompts)
    sft: StageResult  # the starting policy (RUN/round-0/policy)
    sft_eval: StageResult  # its evaluation (RUN/round-0/metrics)


def starting_point(config: Any, stages: Stages) -> Start:
    """What the loop's :func:`~prefloop.flows.loop.run_loop` makes before round 1 (without a reward model):
    same stages, configs and inputs, hence the same ids."""
    name = config.name
    task_prompts = stages("prompts", {}, _seeded(config.prompts, config, 0), f"{name}/prompts")
    sft_prompts = stages("prompts", {}, _seeded(config.sft_prompts, config, 0), f"{name}/sft-prompts")
    sft = stages("sft", {"prompts": sft_prompts.output}, _seeded(config.sft, config, 0), f"{name}/round-0/policy")
    base = stages("evaluate", {"policy": sft.output, "prompts": task_prompts.output, "reference": sft.output},
                  _seeded(config.evaluation, config, 0), f"{name}/round-0/metrics")
    return Start(task_prompts, sft, base)


def verified_pairs(config: Any, stages: Stages, policy: str, prompts: str, round_index: int,
                   prefix: str) -> list[StageResult]:
    """sample → label (the label section's verifier) → construct, as a loop round builds its pairs."""
    samples = stages("sample", {"policy": policy, "prompts": prompts}, _seeded(config.sampling, config, round_index),
                     f"{prefix}/samples")
    labels = stages("label", {"samples": samples.output, "prompts": prompts}, config.label.model_dump(),
                    f"{prefix}/labels")
    pairs = stages("construct", {"samples": samples.output, "labels": labels.output},
                   _seeded(config.construction, config, round_index), f"{prefix}/preferences")
    return [samples, labels, pairs]


def reward_model_pairs(config: Any, stages: Stages, start: Start, rm_prompts: int) -> StageResult:
    """Clean verifier pairs from the SFT model's samples on ``rm_prompts`` prompts of the task that the
    loop's prompt set (train and held-out) does not contain: candidates drawn with another seed (4× as
    many as needed, so overlaps can be removed), then ``benchmark-unused-prompts``. Sampled as round 0
    with the loop's sampling settings (every prompt of the set: ``max_prompts`` = ``rm_prompts``)."""
    name = f"{config.name}/reward-data"
    section = config.prompts.model_dump()
    candidates = stages("prompts", {}, section | {"seed": section["seed"] + config.seed + 7_000_003,
                                                  "n_train": 4 * rm_prompts, "n_heldout": 0, "mix_in": []},
                        f"{name}/candidate-prompts")
    fresh = stages.own(UNUSED_PROMPTS, unused_prompts, {"prompts": start.prompts.output,
                                                        "candidates": candidates.output},
                       {"max_prompts": rm_prompts}, f"{name}/prompts")
    sampling = config.model_copy(update={"sampling": config.sampling.model_copy(update={"max_prompts": rm_prompts})})
    return verified_pairs(sampling, stages, start.sft.output, fresh.output, 0, name)[-1]


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


def correct_by_prompt(store: ArtifactStore, evaluation: ArtifactRef) -> dict[str, bool]:
    """An evaluation's verifier outcome per held-out prompt; prompts it could not verify (a reference answer the
    task's checker cannot read: ``correct`` is null) are left out, as the evaluation stage leaves them out."""
    table = store.read_table(evaluation, "eval_results")
    return {p: c for p, c in zip(table.column("prompt_id").to_pylist(), table.column("correct").to_pylist(),
                                 strict=True) if c is not None}


@dataclass(frozen=True)
class NoiseSettings:
    flip_rates: tuple[float, ...] = (0.0, 0.2, 0.4)
    arms: tuple[str, ...] = ("plain", "filter-cdpo", "filter-rdpo")
    false_flip: float = 0.05  # share of the ensemble's clean held-out pairs the threshold t may catch
    flip_seed: int = 0  # the loop seed is added
    heldout: int | None = None  # held-out prompts of the arms' evaluations (None: the evaluation section's)


def noise_round(config: Any, stages: Stages, settings: NoiseSettings, rm_train: dict[str, Any],
                rm_prompts: int) -> dict:
    """Round 1 of ``config`` under injected flips (module docstring). ``rm_train`` is train-rm's config for
    the ensemble (e.g. :meth:`prefloop.config.RewardModelSetting.train_config`, as the loop makes it), trained
    on the clean pairs of ``rm_prompts`` prompts the loop never uses. Returns the figures per flip rate and arm."""
    name, store = config.name, stages.store
    start = starting_point(config, stages)
    *_, pairs = verified_pairs(config, stages, start.sft.output, start.prompts.output, 1, f"{name}/round-1")
    clean = orientation(store.read_table(pairs.ref))
    rm_pairs = reward_model_pairs(config, stages, start, rm_prompts)
    ensemble = stages("train-rm", {"preferences": rm_pairs.output, "policy": start.sft.output},
                      rm_train, f"{name}/reward-model")
    heldout = stages.own(SPLIT, split_pairs, {"preferences": rm_pairs.output},
                         {"part": "heldout", "heldout_fraction": rm_train["heldout_fraction"]}, f"{name}/reward-heldout")
    heldout_labels = stages("label-rm", {"reward_model": ensemble.output, "preferences": heldout.output}, {},
                            f"{name}/reward-heldout-labels")
    strengths = member_strengths(store.read_table(heldout_labels.ref))
    if len(strengths) == 0:
        raise ValueError(f"the reward model's held-out split of {rm_pairs.output} is empty, so the strength "
                         "threshold t cannot be set: use more reward-model prompts or a larger heldout_fraction")
    threshold = max(0.0, -float(np.quantile(strengths, settings.false_flip)))
    sft_correct = correct_by_prompt(store, start.sft_eval.ref)
    eval_config = _seeded(config.evaluation, config, 0) | {"samples_per_prompt": 0}
    if settings.heldout is not None:
        eval_config["max_prompts"] = settings.heldout

    def train_and_evaluate(arm: str, kept: StageResult, loss: str, source: str | None, prefix: str) -> dict:
        policy, epsilon = start.sft.output, None
        if kept.rows:  # an empty set trains nothing, as in the loop: the SFT model is carried over
            train_config = _seeded(config.train, config, 1, reference_policy=config.reference_policy)
            train_config["training"] = _seeded(config.train.training, config, 1) | {"loss": loss}
            if source is not None:
                train_config["label_flip_rate_source"] = source
            *_, trained = reference_and_train(stages.caller, train_config, prefix, 1, kept.output,
                                              start.sft.output, start.sft.output, store.uri)
            policy, epsilon = trained.output, trained.metrics.get("label_flip_rate")
        evaluated = stages("evaluate", {"policy": policy, "prompts": start.prompts.output,
                                        "baseline": start.sft_eval.output}, eval_config, f"{prefix}/metrics")
        metrics = evaluated.metrics
        return {"arm": arm, "loss": loss, "pairs": kept.rows, "epsilon": epsilon if loss != "sigmoid" else None,
                "accuracy": metrics["accuracy"], "accuracy_stderr": metrics["accuracy_stderr"],
                "gain": metrics["accuracy_gain"], "gain_stderr": metrics.get("accuracy_gain_stderr"),
                "correct": correct_by_prompt(store, evaluated.ref)}

    rates = []
    for rate in settings.flip_rates:
        tag = f"{name}/noise-{round(rate * 100)}"
        noisy = stages.own(INJECT_FLIPS, inject_flips, {"preferences": pairs.output},
                           {"flip_rate": rate, "seed": settings.flip_seed + config.seed}, f"{tag}/preferences")
        loop_filtered = stages("filter", {"preferences": noisy.output, "eval_prompts": start.prompts.output},
                               config.filter.model_dump(), f"{tag}/filtered")
        labels = stages("label-rm", {"reward_model": ensemble.output, "preferences": noisy.output}, {},
                        f"{tag}/ensemble-labels")
        filtered = {action: stages("filter", {"preferences": noisy.output, "eval_prompts": start.prompts.output,
                                              "ensemble_labels": labels.output},
                                   config.filter.model_dump() | {"strong_negative_strength": threshold,
                                                                 "negative_strength_action": action},
                                   f"{tag}/filtered-ensemble-{action}")
                    for action in sorted({ARMS[arm][1] for arm in settings.arms} - {None})}
        estimate = next(iter(filtered.values()), None)
        record = {"rate": rate, "pairs": noisy.rows, "true_flip_rate": true_flip_rate(store.read_table(noisy.ref), clean),
                  "estimated_flip_rate": estimate.metrics.get("estimated_flip_rate") if estimate else None,
                  "estimator": estimate.metrics.get("flip_rate_estimator") if estimate else None,
                  "filtered": {action: {"kept": result.rows, "true": true_flip_rate(store.read_table(result.ref), clean),
                                        "estimate_kept": result.metrics.get("estimated_flip_rate_kept")}
                               for action, result in filtered.items()},
                  "arms": {}}
        for arm in settings.arms:
            _, action, loss = ARMS[arm]
            kept = loop_filtered if action is None else filtered[action]
            source = None if action is None else "filter_estimate"
            record["arms"][arm] = train_and_evaluate(arm, kept, loss, source, f"{tag}-{arm}")
        plain = record["arms"].get("plain")
        for result in record["arms"].values():
            if plain is not None and result is not plain:
                difference, stderr, _ = paired_gain(result["correct"], plain["correct"])
                result |= {"vs_plain": difference, "vs_plain_stderr": stderr}
        rates.append(record)
    for record in rates:
        for result in record["arms"].values():
            del result["correct"]
    sft_metrics = start.sft_eval.metrics
    return {"sft": {"accuracy": sft_metrics["accuracy"], "accuracy_stderr": sft_metrics["accuracy_stderr"],
                    "correct_prompts": sum(sft_correct.values())},
            "reward_model": {"members": rm_train["ensemble_size"], "pairs": rm_pairs.rows, "threshold": threshold,
                             "heldout_pairwise_accuracy": ensemble.metrics.get("heldout_pairwise_accuracy"),
                             "heldout_pairwise_accuracy_stderr": ensemble.metrics.get(
                                 "heldout_pairwise_accuracy_stderr")},
            "rates": rates}


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------
def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--seed", type=int, default=None, help="the loop seed (default: the config's)")
    parser.add_argument("--store", default="/tmp/prefloop-noise-robustness/store")
    parser.add_argument("--reuse-store", default=None, help="copy cached stage outputs from this store (read only)")
    parser.add_argument("--flip-rates", type=float, nargs="+", default=[0.0, 0.2, 0.4])
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--rm-prompts", type=int, default=1024, help="prompts whose clean pairs train the ensemble")
    parser.add_argument("--rm-heldout-fraction", type=float, default=0.25,
                        help="share of the ensemble's pairs held out: its accuracy, calibration and the threshold t")
    parser.add_argument("--members", type=int, default=3, help="reward-model ensemble size")
    parser.add_argument("--rm-learning-rate", type=float, default=1e-3)
    parser.add_argument("--rm-epochs", type=float, default=2.0)
    parser.add_argument("--false-flip", type=float, default=0.05,
                        help="share of clean held-out pairs the strength threshold may catch (sets t)")
    parser.add_argument("--heldout", type=int, default=None, help="held-out prompts evaluated (default: the config's)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true",
                        help="ensemble on 512 prompts, 500 held-out prompts, no flip-rdpo arm (round 1 stays the loop's)")
    arguments = parser.parse_args(argv)
    if arguments.quick:
        arguments.rm_prompts, arguments.heldout = 512, arguments.heldout or 500
        arguments.arms = [arm for arm in arguments.arms if arm != "flip-rdpo"]
    return arguments


def main(argv: list[str] | None = None) -> None:
    import torch

    from prefloop.config import load_loop_config

    arguments = parse_arguments(argv)
    torch.set_num_threads(arguments.threads)
    started = time.perf_counter()
    config = load_loop_config(arguments.config, seed=arguments.seed, name="noise")
    Path(arguments.store).mkdir(parents=True, exist_ok=True)
    stages = Stages(arguments.store, reuse=arguments.reuse_store)
    rm_train = {"ensemble_size": arguments.members, "seed": config.seed,
                "heldout_fraction": arguments.rm_heldout_fraction,
                "training": {"learning_rate": arguments.rm_learning_rate, "epochs": arguments.rm_epochs}}
    settings = NoiseSettings(tuple(arguments.flip_rates), tuple(arguments.arms), arguments.false_flip,
                             heldout=arguments.heldout)
    print(f"$ OMP_NUM_THREADS=1 {shlex.join([sys.executable, *sys.argv])}", flush=True)
    result = noise_round(config, stages, settings, rm_train, arguments.rm_prompts)
    rm = result["reward_model"]
    print(f"ensemble: {rm['members']} members on clean pairs of {arguments.rm_prompts} prompts the loop never uses "
          f"({rm['pairs']} pairs); held-out pairwise accuracy {rm['heldout_pairwise_accuracy']:.1%}; threshold t = "
          f"{rm['threshold']:.3f}")
    print("\nFlip-rate estimate ε̂ (filter, before any action) vs the true share of flipped pairs; pairs kept "
          "after the ensemble filter and their true flip rate")
    for record in result["rates"]:
        kept = ", ".join(f"{action}: {f['kept']} kept, true {f['true']:.3f}" for action, f in record["filtered"].items())
        estimate = record["estimated_flip_rate"]
        print(f"{record['rate']:>5.0%}  {record['pairs']} pairs, true {record['true_flip_rate']:.3f}, ε̂ "
              f"{'–' if estimate is None else f'{estimate:.3f}'} ({record['estimator']}); {kept}")
    sft = result["sft"]
    print(f"\nHeld-out accuracy, greedy, ± binomial SE; gains paired on the same prompts. SFT "
          f"{sft['accuracy']:.1%} ± {sft['accuracy_stderr']:.1%}")
    print(f"{'flips':>5}  {'arm':<36} {'pairs':>5} {'ε':>6}  {'accuracy':>15}  {'vs SFT':>15}  {'vs plain DPO':>15}")
    for record in result["rates"]:
        for arm, value in record["arms"].items():
            epsilon = "" if value["epsilon"] is None else f"{value['epsilon']:.3f}"
            versus = f"{value['vs_plain']:+7.1%} ± {value['vs_plain_stderr']:.1%}" if "vs_plain" in value else ""
            print(f"{record['rate']:>5.0%}  {ARMS[arm][0]:<36} {value['pairs']:>5} {epsilon:>6}  "
                  f"{value['accuracy']:>7.1%} ± {value['accuracy_stderr']:.1%}  "
                  f"{value['gain']:+7.1%} ± {value['gain_stderr'] or 0:.1%}  {versus:>15}")
    phases = ", ".join(f"{name} {seconds:.0f}s" for name, seconds in sorted(stages.seconds.items(), key=lambda x: -x[1]))
    print(f"\nwall {time.perf_counter() - started:.0f}s ({phases}); store {stages.store.uri}")


if __name__ == "__main__":
    main()
