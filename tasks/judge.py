"""Stage ``label-judge``: a policy judges each preference pair, in both orders (LLM-as-judge).

The judge sees a prompt built from ``template`` with the two completions as answer A and answer B,
and is asked which is better; through the :class:`~prefloop.backends.base.PolicyBackend` interface it
scores the continuations " A" and " B" (``score_logprobs``), so

    P(A) = σ(log π(" A" | judge prompt) − log π(" B" | judge prompt))

(the two options renormalised). To cancel position bias (Zheng et al. 2023, "Judging LLM-as-a-Judge
with MT-Bench and Chatbot Arena") every pair is judged twice: chosen as A (p₁ = P(A)), then chosen
as B (p₂ = P(B) = 1 − P(A) of the swapped prompt). The pair's score is the judge's probability that
*chosen* is better, averaged over the orders, s = (p₁ + p₂)/2; its verdict is ``chosen`` when both
orders prefer chosen (p > 0.5), ``rejected`` when both prefer rejected, and ``order_disagreement``
when the preferred answer follows its position — the disagreement is recorded, not hidden.

Label rows (``target_kind = "pair"``, ``target_id`` = pair id), per pair:

* ``judge:<model-id>`` — s and the verdict;
* ``judge:<model-id>/chosen-first`` and ``judge:<model-id>/chosen-second`` — p₁ and p₂ with each
  order's own verdict, so each order's answer is kept.

Metrics: agreement with the pairs' labels (both orders prefer chosen), the order-disagreement rate
and the mean position bias (mean of P(A) over both orders − 0.5).

Data-parallel (``sharding``, :mod:`prefloop.sharding`): pairs are judged in blocks of ``batch_size`` (both
orders of a block in one call), blocks run in shards and the judgements are merged in pair order, so the
labels do not depend on the shard count.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator

from prefloop.backends import BackendKind, load_backend
from prefloop.backends.base import PolicyBackend, yes_probability
from prefloop.datasets_spec import LABELS, PREFERENCES, make_drops
from prefloop.errors import UserError
from prefloop.ids import content_id
from prefloop.sharding import ShardedStageConfig, blocks, model_loading, run_sharded, sharding_metrics
from prefloop.stage import StageContext, StageOutput
from prefloop.tasks.registry import stage_spec

LABELER_VERSION = "1"
DEFAULT_TEMPLATE = "{prompt}\nAnswer A:\n{answer_a}\nAnswer B:\n{answer_b}\nBetter answer:"


class JudgeConfig(ShardedStageConfig):
    template: str = Field(DEFAULT_TEMPLATE, description="judge prompt; must contain {prompt}, {answer_a}, {answer_b} "
                          "(and use only characters the judge's tokenizer knows)")
    option_a: str = Field(" A", description="continuation that names answer A")
    option_b: str = Field(" B", description="continuation that names answer B")
    batch_size: int = Field(64, ge=1)
    backend: BackendKind = Field("hf", description="hf: transformers in-process (CPU); vllm: a vllm serve process "
                                 "at $PREFLOOP_VLLM_URL serving the judge artifact (GPU)")

    @field_validator("template")
    @classmethod
    def _check_template(cls, template: str) -> str:
        missing = [f"{{{k}}}" for k in ("prompt", "answer_a", "answer_b") if f"{{{k}}}" not in template]
        if missing:
            raise UserError(f"the judge template lacks {', '.join(missing)}; it must place the prompt and both answers")
        return template


SPEC = stage_spec(
    "label-judge",
    version="1",
    config_model=JudgeConfig,
    output_table=LABELS,
    description="A judge policy compares chosen and rejected of each pair in both orders; disagreements between "
                "the orders are recorded.",
)


def judge_prompt(template: str, prompt: str, answer_a: str, answer_b: str) -> str:
    return template.format(prompt=prompt, answer_a=answer_a, answer_b=answer_b)


def judge_pairs(backend: PolicyBackend, prompts: Sequence[str], chosen: Sequence[str], rejected: Sequence[str],
                config: JudgeConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(p₁, p₂) per pair: the judge's probability that chosen is better with chosen shown first, and second.

    All 4·n scorings (2 orders × 2 options) go to the backend in one batched call.
    """
    config = config or JudgeConfig()
    first = [judge_prompt(config.template, p, c, r) for p, c, r in zip(prompts, chosen, rejected, strict=True)]
    second = [judge_prompt(config.template, p, r, c) for p, c, r in zip(prompts, chosen, rejected, strict=True)]
    # P(A) = σ(log π(A|x) − log π(B|x)), the two options normalised against each other, in one batched call.
    p_a = np.asarray(yes_probability(backend, first + second, yes=config.option_a, no=config.option_b),
                     dtype=np.float64)
    n = len(prompts)
    return p_a[:n], 1.0 - p_a[n:]


def verdict(p: float) -> str:
    return "chosen" if p > 0.5 else "rejected" if p < 0.5 else "tie"


def combined_verdict(p_first: float, p_second: float) -> str:
    """``chosen``/``rejected`` when both orders agree, ``tie`` when both are undecided, else ``order_disagreement``."""
    first, second = verdict(p_first), verdict(p_second)
    return first if first == second else "order_disagreement"


def label_table(pair_ids: Sequence[str], prompt_ids: Sequence[str | None], labeler: str,
                p_first: np.ndarray, p_second: np.ndarray) -> pa.Table:
    """LABELS rows: the combined label and one per order, for each pair."""
    rows: dict[str, list] = {name: [] for name in LABELS.column_names}
    variants = [
        (labeler, (p_first + p_second) / 2, [combined_verdict(a, b) for a, b in zip(p_first, p_second, strict=True)]),
        (f"{labeler}/chosen-first", p_first, [verdict(p) for p in p_first]),
        (f"{labeler}/chosen-second", p_second, [verdict(p) for p in p_second]),
    ]
    for name, scores, verdicts in variants:
        for pair_id, prompt_id, score, label in zip(pair_ids, prompt_ids, scores, verdicts, strict=True):
            rows["label_id"].append(content_id(name, LABELER_VERSION, "pair", pair_id))
            rows["target_id"].append(pair_id)
            rows["target_kind"].append("pair")
            rows["prompt_id"].append(prompt_id)
            rows["labeler"].append(name)
            rows["labeler_version"].append(LABELER_VERSION)
            rows["score"].append(float(score))
            rows["verdict"].append(label)
            rows["extracted_answer"].append(None)
    return pa.table(rows, schema=LABELS.schema)


def judge_metrics(p_first: np.ndarray, p_second: np.ndarray) -> dict[str, float]:
    """Agreement with the pairs' labels, order-disagreement rate and mean position bias."""
    verdicts = [combined_verdict(a, b) for a, b in zip(p_first, p_second, strict=True)]
    n = len(verdicts)
    # P(A) in the first order is p₁, in the second it is 1 − p₂.
    position_bias = float(np.mean(np.concatenate([p_first, 1.0 - p_second])) - 0.5)
    return {
        "agreement_with_labels": verdicts.count("chosen") / n,
        "reversed": verdicts.count("rejected") / n,
        "order_disagreement_rate": verdicts.count("order_disagreement") / n,
        "position_bias": position_bias,
    }


def compute(ctx: StageContext) -> StageOutput:
    config: JudgeConfig = ctx.config
    pairs = ctx.read("preferences", PREFERENCES)
    if pairs.num_rows == 0:
        raise UserError(f"preferences {ctx.inputs['preferences']} is empty: there are no pairs to judge")
    parts = [pairs.slice(run.start, len(run)).select(["prompt", "chosen", "rejected"])
             for run in blocks(pairs.num_rows, config.batch_size)]
    judged, shards = run_sharded(ctx, config.sharding, parts, judge_blocks, units=[p.num_rows for p in parts],
                                 description="pairs (judge)")
    p_first = np.concatenate([first for first, _ in judged])
    p_second = np.concatenate([second for _, second in judged])
    output = labels_output(pairs, f"judge:{ctx.inputs['judge'].id}", p_first, p_second)
    output.metrics |= sharding_metrics(config.sharding, shards)
    return output


def judge_blocks(ctx: StageContext, parts: list[pa.Table], advance) -> list[tuple[np.ndarray, np.ndarray]]:
    """One shard: (p₁, p₂) of each block of pairs."""
    config: JudgeConfig = ctx.config
    with model_loading():
        backend = load_backend(config.backend, ctx.model_dir("judge"), ctx.inputs["judge"].id, config.batch_size)
    try:
        results = []
        for part in parts:
            results.append(judge_pairs(backend, part.column("prompt").to_pylist(), part.column("chosen").to_pylist(),
                                       part.column("rejected").to_pylist(), config))
            advance(part.num_rows)
        return results
    finally:
        close = getattr(backend, "close", None)
        if close is not None:
            close()  # a vLLM server this stage started is stopped; HF: nothing to do


def labels_output(pairs: pa.Table, labeler: str, p_first: np.ndarray, p_second: np.ndarray) -> StageOutput:
    """Label rows for the pairs with finite judgements; the rest dropped as ``nonfinite_judgement``."""
    finite = np.isfinite(p_first) & np.isfinite(p_second)
    bad = np.flatnonzero(~finite)
    drops = make_drops(pairs, bad, ["nonfinite_judgement"] * len(bad), "preferences",
                       detail="the judge's log-probs of the options were NaN or inf in at least one order")
    kept = np.flatnonzero(finite)
    pair_ids = [pairs.column("pair_id")[int(i)].as_py() for i in kept]
    prompt_ids = [pairs.column("prompt_id")[int(i)].as_py() for i in kept]
    table = label_table(pair_ids, prompt_ids, labeler, p_first[kept], p_second[kept])
    metrics: dict[str, object] = {"pairs": pairs.num_rows, "judged": int(len(kept)), "nonfinite_judgement": int(len(bad))}
    if len(kept):
        metrics |= judge_metrics(p_first[kept], p_second[kept])
    return StageOutput(table=table, drops=drops, metrics=metrics)
