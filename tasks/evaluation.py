"""Stage ``evaluate``: how good a round's policy is, and what the round's data looked like.

On held-out prompts (the same prompts in every round, so rounds can be paired):

* ``accuracy`` — greedy decoding, verified exactly, ± sqrt(p(1 − p)/n), over the n prompts that have a
  reference answer (its ``count``; a note says how many lack one; None, never 0, when none has one —
  pass@k, the gain and verifier-judged wins likewise leave those prompts out);
* ``accuracy_gain`` against the ``baseline`` evaluation (the SFT model's): mean of
  d_i = correct_i − baseline_i with paired standard error std(d)/√n, the comparison that can
  separate a few points on 1000 prompts where unpaired errors cannot;
* ``pass@k`` — ``samples_per_prompt`` completions per prompt at ``temperature``, the unbiased
  estimator of Chen et al. (2021), averaged over prompts;
* ``kl_to_reference`` — KL(π ‖ π_ref) on the same samples (needs the ``reference`` model), and
  ``kl_to_start`` — KL(π ‖ π_0) to the starting (SFT / round-0) policy (optional input ``start``):
  under ``reference_policy: previous_round`` the reference moves every round, so only the KL to the
  start shows the total drift; the loop passes ``start`` whenever the round's reference is not it;
* ``mean_reward`` of the greedy completions under a ``reward_model`` (optional: without one the
  metric is absent and the manifest's ``notes`` say so); an ensemble's reward is ``reward_aggregation``
  (mean / min / uncertainty_weighted) of its standardised members, the aggregate the loop labels with;
* ``win_rate`` / ``tie_rate`` / ``loss_rate`` against the SFT model (``baseline``) and the
  previous round (``previous``), judged by the verifier or the reward model, ties counted apart;
* ``mean_length`` (completion tokens, ± SE) and ``truncated_rate``;
* data statistics of the round when its ``preferences`` are given: pairs built, kept, dropped
  (total and by reason), pairs by construction method and the estimated label-flip rate.

Every estimate is a pure function with its formula in :mod:`prefloop.tasks.common.statistics` (the
flip rate in :mod:`prefloop.tasks.common.confidence`); this module owns the stage: its config, the
scoring of samples with the policy, reference and reward models, and the metric rows. Per-prompt
outcomes go to the table ``eval_results`` so later rounds can be paired with this one. The model
backends and the forward code load where they are used, so importing this module (as
``prefloop.config`` does) loads no model code.

Data-parallel (``sharding``, :mod:`prefloop.sharding`): the prompts are cut into units of ``batch_size``
prompts (one greedy batch); a unit's sampled prompts are drawn in seed blocks of ``max(1, batch_size //
samples_per_prompt)`` prompts, each from its own random stream (:func:`~prefloop.sharding.block_seed` of
``seed`` and the block's first prompt id), and scored by the reference / start / reward models in the
same blocks. Units run in shards; every metric is computed once, from the merged per-prompt results, so
1 or 3 shards publish the same artifact. (Earlier code drew all samples from one stream: the metrics mean the
same, the samples behind pass@k and the KL differ, and the code fingerprint gives new ids.)

Over 400 lines: the per-unit work a shard runs (greedy decoding, sampling, KL and reward scoring) and the
metrics computed from the merged units are two halves of one computation and are read together.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator, model_validator

from prefloop.backends.base import Completion, GenerationParams
from prefloop.datasets_spec import EVAL_RESULTS, METRICS, PREFERENCES, PROMPTS
from prefloop.errors import UserError
from prefloop.lazy import deferred_import
from prefloop.sharding import (
    ShardedStageConfig,
    block_seed,
    blocks,
    model_loading,
    run_sharded,
    sharding_metrics,
)
from prefloop.stage import StageContext, StageOutput
from prefloop.storage import ArtifactRef
from prefloop.tasks.answers import TaskDefinition, resolve_task
from prefloop.tasks.common.confidence import estimated_flip_rate
from prefloop.tasks.common.ensembles import Aggregation, aggregation_name
from prefloop.tasks.common.prompts import select_prompts
from prefloop.tasks.common.statistics import (
    accuracy_with_stderr,
    group_means,
    kl_estimate,
    mean_pass_at_k,
    mean_with_stderr,
    paired_gain,
    win_rate,
)
from prefloop.tasks.registry import stage_spec

if TYPE_CHECKING:
    import torch

    from prefloop.backends.hf import HFBackend
else:
    torch = deferred_import("torch")


class EvaluationConfig(ShardedStageConfig):
    split: str = "heldout"
    max_prompts: int | None = Field(1000, ge=1)
    max_new_tokens: int = Field(64, ge=1)
    batch_size: int = Field(64, ge=1)
    round: int = Field(0, ge=0)
    samples_per_prompt: int = Field(
        8, ge=0, description="completions sampled per prompt for pass@k and the KL estimate (0: neither)")
    sampled_prompts: int | None = Field(
        256, ge=1, description="how many of the evaluated prompts (the first N) are also sampled (None: all)")
    pass_k: tuple[int, ...] = Field((1, 4, 8), description="k of the pass@k metrics; each k <= samples_per_prompt")
    temperature: float = Field(
        1.0, gt=0.0, description="sampling temperature of pass@k; the KL estimate needs 1.0 (else it is skipped)")
    seed: int = 0
    win_judge: Literal["verifier", "reward_model"] = Field(
        "verifier", description="who decides a win: the verifier (correct beats wrong) or the reward model")
    reward_aggregation: Aggregation = Field(
        "mean", description="how an ensemble reward model's standardised member rewards become the reward of "
        "mean_reward and reward-judged wins: mean, min or uncertainty_weighted (a loop takes its reward_model's "
        "aggregate unless set here); a single reward model ignores it")
    uncertainty_penalty: float = Field(0.5, ge=0.0, description="λ of reward_aggregation uncertainty_weighted")
    task: str | TaskDefinition = Field(
        "arithmetic", description="how answers are extracted and checked: a task preset (arithmetic, gsm8k, math, "
        "answer_line) or a definition, as in the label stage; a loop uses its label stage's task unless set here")

    @field_validator("task")
    @classmethod
    def _known_task(cls, task: str | TaskDefinition) -> str | TaskDefinition:
        resolve_task(task)  # an unknown preset fails here, with the list of presets
        return task

    @model_validator(mode="after")
    def _check_pass_k(self) -> EvaluationConfig:
        if self.samples_per_prompt and any(k < 1 or k > self.samples_per_prompt for k in self.pass_k):
            raise UserError(
                f"pass_k {list(self.pass_k)} must lie in 1..samples_per_prompt ({self.samples_per_prompt}): "
                "pass@k needs at least k samples per prompt; raise samples_per_prompt or drop the larger k")
        return self


SPEC = stage_spec(
    "evaluate",
    version="3",
    config_model=EvaluationConfig,
    output_table=METRICS,
    description="Held-out accuracy, pass@k, KL to the reference and to the starting policy, reward, win rates vs "
                "SFT and the previous round, lengths and the round's data statistics.",
)

NO_REWARD_MODEL = "no reward model configured: mean reward and reward-judged win rates are not measured"


# ----------------------------------------------------------------------------------------------
# Scoring with models
# ----------------------------------------------------------------------------------------------
def completion_sequence_logprobs(backend: HFBackend, prompts: Sequence[str],
                                 completions: Sequence[Completion], sampled_with: str | None = None) -> list[float]:
    """log π(y | x) of whole sampled sequences, the end-of-sequence token included when generation stopped.

    Counting eos makes r = log π − log π_ref the log-ratio of the *generation* distributions (a
    truncated sample has no eos and is scored as the prefix it is), so the KL estimate is unbiased.
    ``sampled_with`` is the fingerprint of the sampling tokenizer: when it equals the scorer's, the
    sampled ids are scored as they were generated (re-encoding a sampled text can give other ids with
    a BPE tokenizer); otherwise the text is re-encoded.
    """
    from prefloop.forward import (
        completion_logprobs,
        encode_completion,
        generated_ids,
        pad_right,
        tokenizer_fingerprint,
    )

    tokenizer, scores = backend.tokenizer, []
    same_ids = sampled_with is not None and sampled_with == tokenizer_fingerprint(tokenizer)
    for start in range(0, len(prompts), backend.batch_size):
        encoded = [encode_completion(tokenizer, prompt, completion.text, append_eos=completion.finish_reason == "stop",
                                     completion_ids=generated_ids(completion, tokenizer) if same_ids else None)
                   for prompt, completion in zip(prompts[start:start + backend.batch_size],
                                                 completions[start:start + backend.batch_size], strict=True)]
        batch = pad_right([ids for ids, _ in encoded], [length for _, length in encoded], int(tokenizer.pad_token_id))
        with torch.inference_mode():
            scores.extend(completion_logprobs(backend.model, *batch).tolist())
    return scores


def score_rewards(model_dir: str | Path, prompts: Sequence[str], completions: Sequence[str],
                  batch_size: int = 64, aggregation: Aggregation = "mean",
                  uncertainty_penalty: float = 0.5) -> list[float]:
    """Scalar reward r(x, y) of each (prompt, completion) under a reward-model artifact written by the
    ``train-rm`` stage (or any one-label sequence-classification model in that format): the label's
    logit, or for an ensemble ``aggregation`` of the members' standardised rewards z_i = (r_i − μ_i)/σ_i
    (:func:`prefloop.tasks.common.ensembles.aggregate_rewards`, with the μ_i, σ_i ``train-rm`` stored):
    z̄, min_i z_i, or z̄ − λ·var_i z_i. Loading and scoring are the reward-model stage's own
    (:func:`prefloop.tasks.training.recipes.reward_model.score_with_members`)."""
    from prefloop.tasks.training.recipes.reward_model import score_with_members

    rewards = score_with_members(model_dir, prompts, completions, batch_size)
    return combine_member_rewards(model_dir, rewards, aggregation, uncertainty_penalty)


def combine_member_rewards(model_dir: str | Path, rewards: np.ndarray, aggregation: Aggregation = "mean",
                           uncertainty_penalty: float = 0.5) -> list[float]:
    """One reward per completion from the members' raw rewards [members, n]: a single model's own, an
    ensemble's standardised aggregate — the same aggregate label-rm ranks the round's samples by, so the
    evaluation's mean reward measures what the rounds optimise."""
    from prefloop.tasks.common.ensembles import MemberStandardisation, aggregate_rewards

    if rewards.shape[0] == 1:
        return rewards[0].tolist()
    return aggregate_rewards(rewards, aggregation, uncertainty_penalty,
                             standardisation=MemberStandardisation.read(model_dir)).tolist()


# ----------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------
@dataclass
class _UnitResult:
    """Per-prompt results of one unit of prompts (greedy for all, sampled for its first ``sampled``)."""

    completions: list[Completion]
    correct: list[bool | None]  # None: the prompt has no reference answer to verify against
    samples_correct: list[int | None]
    policy_logprobs: list[float]  # one per sample of the sampled prompts (flat), when a KL is estimated
    other_logprobs: dict[str, list[float]]  # role -> the same samples under that role's model
    rewards: np.ndarray | None  # [members, prompts] raw rewards of the greedy completions


def _kl_roles(ctx: StageContext) -> list[str]:
    config: EvaluationConfig = ctx.config
    if config.samples_per_prompt == 0 or config.temperature != 1.0:
        return []
    return [role for role in ("reference", "start") if ctx.has(role)]


def compute(ctx: StageContext) -> StageOutput:
    config: EvaluationConfig = ctx.config
    prompts = select_prompts(ctx.read("prompts", PROMPTS), config.split, config.max_prompts)
    if config.win_judge == "reward_model" and not ctx.has("reward_model"):
        raise UserError("evaluate: win_judge is 'reward_model' but no reward model was given; pass the input "
                         "reward_model=REF (a sequence-classification model artifact) or set win_judge: verifier")
    resolve_task(config.task)
    texts = prompts.column("prompt").to_pylist()
    prompt_ids = prompts.column("prompt_id").to_pylist()
    count = min(len(texts), config.sampled_prompts or len(texts)) if config.samples_per_prompt else 0
    units = blocks(len(texts), config.batch_size)
    parts = [(prompts.slice(run.start, len(run)), max(0, min(count, run.stop) - run.start)) for run in units]
    roles = _kl_roles(ctx)
    weights = [part.num_rows + sampled * config.samples_per_prompt * (1 + len(roles)) for part, sampled in parts]
    results, shards = run_sharded(ctx, config.sharding, parts, evaluate_units, units=[p.num_rows for p, _ in parts],
                                  weights=weights, description="held-out prompts")
    completions = [c for unit in results for c in unit.completions]
    correct = [c for unit in results for c in unit.correct]
    notes: list[str] = []
    n = len(correct)
    length, length_stderr = mean_with_stderr([c.num_tokens for c in completions])
    rows: list[dict] = [
        verifier_accuracy_row(correct, notes),
        {"metric": "mean_length", "value": length, "stderr": length_stderr, "count": n},
        {"metric": "truncated_rate", "value": sum(c.finish_reason == "length" for c in completions) / n, "count": n},
    ]
    results_columns = {
        "prompt_id": prompt_ids,
        "completion": [c.text for c in completions],
        "correct": correct,
        "completion_tokens": pa.array([c.num_tokens for c in completions], pa.int32()),
        "finish_reason": [c.finish_reason for c in completions],
    }

    sampled = _sampled_metrics(ctx, results, prompt_ids, count, notes)
    rows.extend(sampled.rows)
    results_columns |= sampled.columns

    rewards: list[float] | None = None
    ensemble = False
    if ctx.has("reward_model"):
        member_rewards = np.concatenate([unit.rewards for unit in results], axis=1)
        ensemble = member_rewards.shape[0] > 1
        rewards = combine_member_rewards(ctx.model_dir("reward_model"), member_rewards,
                                         config.reward_aggregation, config.uncertainty_penalty)
        reward, reward_stderr = mean_with_stderr(rewards)
        rows.append({"metric": "mean_reward", "value": reward, "stderr": reward_stderr, "count": n})
        results_columns["reward"] = pa.array(rewards, pa.float64())
    else:
        notes.append(NO_REWARD_MODEL)

    # Prompts without a reference answer have no verifier outcome: they take no part in verifier-judged wins.
    judged = rewards if config.win_judge == "reward_model" else [None if c is None else float(c) for c in correct]
    own_scores = {p: score for p, score in zip(prompt_ids, judged, strict=True) if score is not None}
    if ctx.has("baseline"):
        baseline = ctx.store.read_table(ctx.inputs["baseline"], "eval_results")
        baseline_correct = {p: c for p, c in zip(baseline.column("prompt_id").to_pylist(),
                                                  baseline.column("correct").to_pylist(), strict=True) if c is not None}
        verified = {p: c for p, c in zip(prompt_ids, correct, strict=True) if c is not None}
        if verified and baseline_correct:
            gain, stderr, shared = paired_gain(verified, baseline_correct)
            rows.append({"metric": "accuracy_gain", "value": gain, "stderr": stderr, "count": shared})
        else:
            notes.append("no prompt has a verifier outcome in both this and the baseline evaluation: the accuracy "
                         "gain is not measured")
        rows.extend(_win_rows("sft", own_scores, _judged_scores(ctx, "baseline", baseline, config.win_judge, ensemble),
                              notes))
    else:
        notes.append("no baseline evaluation given (round 0 is the SFT model itself): "
                     "accuracy gain and win rate vs SFT are not measured")
    if ctx.has("previous"):
        previous = ctx.store.read_table(ctx.inputs["previous"], "eval_results")
        rows.extend(_win_rows("previous", own_scores,
                              _judged_scores(ctx, "previous", previous, config.win_judge, ensemble), notes))
    else:
        notes.append("no previous round: win rate vs the previous round is not measured")

    data_notes: dict[str, str] = {}
    if ctx.has("preferences"):
        rows.extend(_data_stats(ctx, data_notes))
    table = pa.Table.from_pylist(
        [{"round": config.round, "split": config.split, "policy_model_id": ctx.inputs["policy"].id,
          "stderr": None, "count": None, **row} for row in rows],
        schema=METRICS.schema,
    )
    metrics: dict = {row["metric"]: row["value"] for row in rows}
    metrics |= {f"{row['metric']}_stderr": row["stderr"] for row in rows if row.get("stderr") is not None}
    metrics |= data_notes | {"win_judge": config.win_judge, "notes": notes} | sharding_metrics(config.sharding, shards)
    if ensemble:
        metrics["reward_aggregation"] = aggregation_name(config.reward_aggregation, config.uncertainty_penalty)
    results_table = pa.table({name: results_columns.get(name, pa.nulls(n, EVAL_RESULTS.schema.field(name).type))
                              for name in EVAL_RESULTS.column_names}, schema=EVAL_RESULTS.schema)
    return StageOutput(table=table, extra_tables={"eval_results": (results_table, EVAL_RESULTS)}, metrics=metrics)


def has_reference(answer: object) -> bool:
    """Whether a prompt has a reference answer: present and not blank."""
    return answer is not None and bool(str(answer).strip())


def readable_references(task: TaskDefinition, answers: Sequence[object]) -> list[Any]:
    """Each reference answer in the task checker's form, None where there is none or the checker cannot read
    it: such a prompt is unverifiable, left out of the accuracy like a prompt without a reference (as the
    ``label`` stage drops it as ``unparseable_reference``), never counted wrong."""
    return [task.parse_reference(str(answer)) if has_reference(answer) else None for answer in answers]


def verify_against(task: TaskDefinition, completion: str, gold: Any) -> bool | None:
    """The verdict on one completion against a reference read by :func:`readable_references` (None: none)."""
    if gold is None:
        return None
    extracted = task.extract_answer(completion)
    return extracted is not None and task.is_correct(extracted, gold)


def verifier_accuracy_row(correct: Sequence[bool | None], notes: list[str]) -> dict:
    """The ``accuracy`` row over the prompts that have a reference answer (``correct`` is None for the others):
    p = c/m with sqrt(p(1 − p)/m) and count m, the number verified. With m = 0 the value is None (not 0:
    nothing was measured) and a note says why; with some prompts unverified a note says how many."""
    verified = [c for c in correct if c is not None]
    missing = len(correct) - len(verified)
    if not verified:
        notes.append(f"none of the {len(correct)} evaluated prompts has a reference answer the task's checker can "
                     "read: verifier accuracy, pass@k, the accuracy gain and verifier-judged wins are not measured "
                     "(import the prompts with a reference_answer mapping, in a form the task's check reads)")
        return {"metric": "accuracy", "value": None, "stderr": None, "count": 0}
    if missing:
        notes.append(f"{missing} of the {len(correct)} evaluated prompts have no reference answer the checker "
                     "can read: verifier "
                     f"accuracy, pass@k and the accuracy gain are over the {len(verified)} that have one")
    accuracy, stderr = accuracy_with_stderr(verified)
    return {"metric": "accuracy", "value": accuracy, "stderr": stderr, "count": len(verified)}


def evaluate_units(ctx: StageContext, parts: list[tuple[pa.Table, int]], advance) -> list[_UnitResult]:
    """One shard: greedy decoding, sampling, KL scoring and rewards of each unit of prompts (module docstring)."""
    from prefloop.backends.hf import HFBackend
    from prefloop.tasks.training.recipes.reward_model import (
        load_reward_model,
        reward_model_members,
        score_texts,
    )

    config: EvaluationConfig = ctx.config
    task = resolve_task(config.task)
    policy_ref = str(ctx.inputs["policy"])
    # A model is scored once however many roles name it; a role naming the policy gets the policy's scores.
    others = {str(ctx.inputs[role]): role for role in _kl_roles(ctx) if str(ctx.inputs[role]) != policy_ref}
    with model_loading():
        backend = HFBackend.from_directory(ctx.model_dir("policy"), batch_size=config.batch_size)
        scorers = {ref: HFBackend.from_directory(ctx.model_dir(role), batch_size=config.batch_size)
                   for ref, role in others.items()}
        members = [load_reward_model(member) for member in reward_model_members(ctx.model_dir("reward_model"))] \
            if ctx.has("reward_model") else []
    greedy = GenerationParams(n=1, temperature=0.0, max_new_tokens=config.max_new_tokens)
    block_size = max(1, config.batch_size // max(1, config.samples_per_prompt))
    results = []
    for prompts, sampled in parts:
        texts = prompts.column("prompt").to_pylist()
        golds = readable_references(task, prompts.column("reference_answer").to_pylist())
        prompt_ids = prompts.column("prompt_id").to_pylist()
        completions = [group[0] for group in backend.generate(texts, greedy)]
        unit = _UnitResult(completions=completions,
                           correct=[verify_against(task, c.text, gold) for c, gold in zip(completions, golds,
                                                                                           strict=True)],
                           samples_correct=[], policy_logprobs=[], other_logprobs={role: [] for role in _kl_roles(ctx)},
                           rewards=None)
        for run in blocks(sampled, block_size):
            params = GenerationParams(n=config.samples_per_prompt, temperature=config.temperature,
                                      max_new_tokens=config.max_new_tokens,
                                      seed=block_seed(config.seed, prompt_ids[run.start]))
            groups = backend.generate(texts[run.start:run.stop], params)
            unit.samples_correct.extend(
                sum(bool(verify_against(task, c.text, golds[run.start + i])) for c in group)
                if golds[run.start + i] is not None else None for i, group in enumerate(groups))
            if not unit.other_logprobs:
                continue
            flat_prompts = [texts[run.start + i] for i, group in enumerate(groups) for _ in group]
            flat = [completion for group in groups for completion in group]
            from prefloop.forward import tokenizer_fingerprint

            sampled_with = tokenizer_fingerprint(backend.tokenizer)
            scored = {ref: completion_sequence_logprobs(scorer, flat_prompts, flat, sampled_with)
                      for ref, scorer in scorers.items()}
            own = completion_sequence_logprobs(backend, flat_prompts, flat, sampled_with) if scorers \
                else [0.0] * len(flat)
            scored[policy_ref] = own
            unit.policy_logprobs.extend(own)
            for role in unit.other_logprobs:
                unit.other_logprobs[role].extend(scored[str(ctx.inputs[role])])
        if members:
            completions_text = [c.text for c in completions]
            unit.rewards = np.stack([score_texts(model, tokenizer, texts, completions_text, config.batch_size)
                                     for model, tokenizer in members])
        results.append(unit)
        advance(len(texts))
    return results


@dataclass
class _Sampled:
    rows: list[dict]
    columns: dict[str, pa.Array]


def _sampled_metrics(ctx: StageContext, results: list[_UnitResult], prompt_ids: list[str], count: int,
                     notes: list[str]) -> _Sampled:
    """pass@k and the KL estimate from ``samples_per_prompt`` samples on the first ``sampled_prompts`` prompts."""
    config: EvaluationConfig = ctx.config
    if config.samples_per_prompt == 0:
        notes.append("samples_per_prompt is 0: pass@k and the KL to the reference are not measured")
        return _Sampled([], {})
    correct_counts = [c for unit in results for c in unit.samples_correct]
    counts = [(config.samples_per_prompt, c) for c in correct_counts if c is not None]
    rows = []
    for k in config.pass_k if counts else ():  # no sampled prompt has a reference answer: pass@k not measured
        value, stderr = mean_pass_at_k(counts, k)
        rows.append({"metric": f"pass@{k}", "value": value, "stderr": stderr, "count": len(counts)})
    padding = [None] * (len(prompt_ids) - count)
    columns = {
        "samples_drawn": pa.array([config.samples_per_prompt] * count + padding, pa.int32()),
        "samples_correct": pa.array(correct_counts + padding, pa.int32()),
    }
    if not ctx.has("reference"):
        notes.append("no reference model given: the KL to the reference is not measured")
    if not any(ctx.has(role) for role in ("reference", "start")):
        return _Sampled(rows, columns)
    if config.temperature != 1.0:
        notes.append(f"samples drawn at temperature {config.temperature}, not from π itself: KL not estimated "
                     "(set evaluation temperature: 1.0 to measure it)")
        return _Sampled(rows, columns)
    flat_ids = [prompt_ids[i] for i in range(count) for _ in range(config.samples_per_prompt)]
    policy_scores = [s for unit in results for s in unit.policy_logprobs]
    other_scores = {role: [s for unit in results for s in unit.other_logprobs[role]] for role in _kl_roles(ctx)}
    rows.extend(kl_rows(policy_scores, other_scores, flat_ids))
    if "reference" in other_scores:
        ratios = np.asarray(policy_scores) - np.asarray(other_scores["reference"])
        per_prompt = group_means(ratios, flat_ids)
        columns["mean_log_ratio"] = pa.array([per_prompt[p] for p in prompt_ids[:count]] + padding, pa.float64())
    return _Sampled(rows, columns)


def kl_rows(policy_logprobs: Sequence[float], other_logprobs: Mapping[str, Sequence[float]],
            prompt_ids: Sequence[str]) -> list[dict]:
    """One row ``kl_to_<role>`` per other model: KL(π ‖ π_role) ≈ (1/N) Σ_ij [log π(y_ij) − log π_role(y_ij)]
    on the same samples y_ij ~ π, ± the standard error over prompts (:func:`kl_estimate`)."""
    rows = []
    for role, logprobs in other_logprobs.items():
        kl, stderr = kl_estimate(policy_logprobs, logprobs, prompt_ids)
        rows.append({"metric": f"kl_to_{role}", "value": kl, "stderr": stderr, "count": len(prompt_ids)})
    return rows


def _judged_scores(ctx: StageContext, role: str, other: pa.Table, judge: str, ensemble: bool) -> dict[str, float]:
    """The other policy's per-prompt scores under the configured judge (prompts without one left out)."""
    prompt_ids = other.column("prompt_id").to_pylist()
    if judge == "verifier":
        return {p: float(c) for p, c in zip(prompt_ids, other.column("correct").to_pylist(), strict=True)
                if c is not None}
    manifest = ctx.store.read_manifest(ctx.inputs[role])
    other_model = manifest.inputs.get("reward_model")
    if "reward" not in other.column_names or other_model != str(ctx.inputs["reward_model"]):
        raise UserError(
            f"evaluate: win_judge is 'reward_model' but the '{role}' evaluation ({ctx.inputs[role]}) was not scored "
            f"by the same reward model (it used {other_model or 'none'}); evaluate it again with "
            f"reward_model={ctx.inputs['reward_model']} or set win_judge: verifier")
    config: EvaluationConfig = ctx.config
    # An ensemble's rewards under another aggregate are on another scale: wins against them would mean nothing.
    theirs = (manifest.config.get("reward_aggregation", "mean"), manifest.config.get("uncertainty_penalty", 0.5))
    if ensemble and theirs != (config.reward_aggregation, config.uncertainty_penalty):
        raise UserError(
            f"evaluate: the '{role}' evaluation ({ctx.inputs[role]}) aggregated the ensemble's rewards as "
            f"{theirs[0]} (λ = {theirs[1]}), this one as {config.reward_aggregation} (λ = {config.uncertainty_penalty}): "
            "their rewards are not comparable; evaluate both with the same reward_aggregation or set win_judge: verifier")
    return {p: r for p, r in zip(prompt_ids, other.column("reward").to_pylist(), strict=True) if r is not None}


def _win_rows(opponent: str, scores: Mapping[str, float], other_scores: Mapping[str, float],
              notes: list[str]) -> list[dict]:
    outcome = win_rate(scores, other_scores)
    if outcome.n == 0:  # e.g. verifier-judged, and no prompt has a reference answer: a rate of nothing is no rate
        notes.append(f"no prompt was judged in both this and the '{opponent}' evaluation: win rate vs {opponent} "
                     "not measured")
        return []
    rows = []
    for name, key in (("win_rate", "wins"), ("tie_rate", "ties"), ("loss_rate", "losses")):
        value, stderr = outcome.rate(key)  # type: ignore[arg-type]
        rows.append({"metric": f"{name}_vs_{opponent}", "value": value, "stderr": stderr, "count": outcome.n})
    return rows


def _data_stats(ctx: StageContext, notes: dict[str, str]) -> list[dict]:
    """Pairs kept (this artifact), built (its input, if it was filtered), dropped by reason, by
    construction method, and the estimated flip rate (a filter's own estimate, else from confidences)."""
    store = ctx.store
    manifest = store.read_manifest(ctx.inputs["preferences"])
    built = manifest.rows
    source = manifest.inputs.get("preferences")
    if source is not None:
        built = store.read_manifest(ArtifactRef.parse(source)).rows
    rows = [
        {"metric": "pairs_built", "value": float(built)},
        {"metric": "pairs_kept", "value": float(manifest.rows)},
        {"metric": "pairs_dropped", "value": float(sum(manifest.drops.values()))},
    ]
    rows.extend({"metric": f"dropped:{reason}", "value": float(count)} for reason, count in sorted(manifest.drops.items()))
    pairs = ctx.read("preferences", PREFERENCES)
    methods = Counter(method or "unknown" for method in pairs.column("method").to_pylist())
    rows.extend({"metric": f"pairs_by_method:{method}", "value": float(count)} for method, count in sorted(methods.items()))
    notes["construction_method"] = ", ".join(sorted(methods)) or "none (no pairs kept)"
    flip_rate = manifest.metrics.get("estimated_flip_rate")
    if flip_rate is not None:
        estimator = manifest.metrics.get("flip_rate_estimator")
        notes["flip_rate_source"] = f"{manifest.stage} stage estimate" + \
            (f" ({estimator}, before its flips and drops)" if estimator else "")
    else:
        # The one definition of ε from confidence (tasks.common.confidence), as the filter and train use it.
        flip_rate = estimated_flip_rate(pairs.column("confidence").to_pylist())
        notes["flip_rate_source"] = "mean of min(1 − confidence, ½) over kept pairs" if flip_rate is not None else \
            "not estimated: the pairs carry no confidence and the filter made no estimate"
    if flip_rate is not None:
        rows.append({"metric": "estimated_flip_rate", "value": float(flip_rate), "count": manifest.rows})
    return rows
