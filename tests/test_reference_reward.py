"""Reference-based reward (BLEU / chrF via sacrebleu): hand cases, and the labelers in the label stage."""

import math

import pyarrow as pa
import pytest

from prefloop.datasets_spec import PROMPTS, SAMPLES
from prefloop.stage import StageConfig, StageOutput, StageSpec, execute
from prefloop.tasks.reference_reward import reference_rewards
from prefloop.tasks.registry import run_stage

REFERENCE = "the cat sat on the mat"


def test_bleu_by_hand() -> None:
    scores = reference_rewards([REFERENCE, "the cat", "the cat sat on a mat"], [REFERENCE] * 3, "bleu")
    # Exact match: every precision 1, no brevity penalty.
    assert scores[0] == pytest.approx(1.0)
    # "the cat": c = 2 words, r = 6; effective orders 1..2 with p1 = p2 = 1; BP = exp(1 − 6/2) = e^−2.
    assert scores[1] == pytest.approx(math.exp(-2))
    # One word swapped: p1 = 5/6, p2 = 3/5, p3 = 2/4, p4 = 1/3, same length so BP = 1:
    # (5/6 · 3/5 · 1/2 · 1/3)^(1/4) = (1/12)^(1/4).
    assert scores[2] == pytest.approx((1 / 12) ** 0.25)


def test_chrf_by_hand() -> None:
    # "abd" vs "abc": character 1-grams P = R = 2/3, 2-grams 1/2, 3-grams 0 (no 4..6-grams: skipped);
    # mean P = mean R = (2/3 + 1/2 + 0)/3 = 7/18, so F_2 = 7/18.
    assert reference_rewards(["abc", "abd"], ["abc", "abc"], "chrf") == pytest.approx([1.0, 7 / 18])


class Empty(StageConfig):
    pass


def test_label_stage_with_chrf_scores_samples_and_drops_those_without_reference(store) -> None:
    prompts = pa.table({"prompt_id": ["q1", "q2"], "prompt": ["1+1=?\n", "2+2=?\n"],
                        "reference_solution": ["1+1=2\nA:2", None], "split": ["train", "train"]})
    samples = pa.table({"sample_id": ["s1", "s2", "s3", "s4"], "prompt_id": ["q1", "q1", "q2", "zz"],
                        "prompt": ["1+1=?\n", "1+1=?\n", "2+2=?\n", "?"],
                        "completion": ["1+1=2\nA:2", "A:3", "A:4", "A:1"]})
    prompts_ref = execute(StageSpec("hand-prompts", "1", Empty, "prompts", {}, PROMPTS),
                          lambda ctx: StageOutput(table=prompts), {}, {}, store).output
    samples_ref = execute(StageSpec("hand-samples", "1", Empty, "samples", {}, SAMPLES),
                          lambda ctx: StageOutput(table=samples), {}, {}, store).output
    result = run_stage("label", {"samples": samples_ref, "prompts": prompts_ref}, {"labeler": "chrf"}, store)
    rows = {r["target_id"]: r for r in store.read_table(result.ref).to_pylist()}
    assert set(rows) == {"s1", "s2"}
    assert rows["s1"]["score"] == pytest.approx(1.0) and 0.0 <= rows["s2"]["score"] < 1.0
    assert rows["s1"]["labeler"] == "chrf" and "nc:6" in rows["s1"]["labeler_version"]
    assert result.drops == {"missing_reference": 1, "unknown_prompt_id": 1}
    drops = store.read_table(result.ref, "drops").to_pylist()
    assert {(d["row_id"], d["reason"]) for d in drops} == {("s3", "missing_reference"), ("s4", "unknown_prompt_id")}


def test_no_sample_with_a_reference_is_a_clear_error(store) -> None:
    prompts = pa.table({"prompt_id": ["q1"], "prompt": ["1+1=?\n"], "reference_solution": [None], "split": ["train"]})
    samples = pa.table({"sample_id": ["s1"], "prompt_id": ["q1"], "prompt": ["1+1=?\n"], "completion": ["A:2"]})
    prompts_ref = execute(StageSpec("hand-prompts", "1", Empty, "prompts", {}, PROMPTS),
                          lambda ctx: StageOutput(table=prompts), {}, {}, store).output
    samples_ref = execute(StageSpec("hand-samples", "1", Empty, "samples", {}, SAMPLES),
                          lambda ctx: StageOutput(table=samples), {}, {}, store).output
    with pytest.raises(ValueError, match="no sample has a reference"):
        run_stage("label", {"samples": samples_ref, "prompts": prompts_ref}, {"labeler": "bleu"}, store)


def test_bleu_reads_the_reference_column_named_in_settings(store) -> None:
    prompts = pa.table({"prompt_id": ["q1"], "prompt": ["1+1=?\n"], "reference_solution": ["1+1=2\nA:2"],
                        "reference_answer": ["A:2"], "split": ["train"]})
    samples = pa.table({"sample_id": ["s1"], "prompt_id": ["q1"], "prompt": ["1+1=?\n"], "completion": ["A:2"]})
    prompts_ref = execute(StageSpec("hand-prompts", "1", Empty, "prompts", {}, PROMPTS),
                          lambda ctx: StageOutput(table=prompts), {}, {}, store).output
    samples_ref = execute(StageSpec("hand-samples", "1", Empty, "samples", {}, SAMPLES),
                          lambda ctx: StageOutput(table=samples), {}, {}, store).output
    inputs = {"samples": samples_ref, "prompts": prompts_ref}
    against_answer = run_stage("label", inputs, {"labeler": "bleu", "settings": {"reference": "reference_answer"}}, store)
    against_solution = run_stage("label", inputs, {"labeler": "bleu"}, store)
    score = store.read_table(against_answer.ref).column("score").to_pylist()
    assert score == [pytest.approx(1.0)]
    assert store.read_table(against_solution.ref).column("score").to_pylist()[0] < 1.0
    row = store.read_table(against_answer.ref).to_pylist()[0]
    assert row["labeler"] == "bleu" and row["labeler_version"].startswith("1+") and "tok:13a" in row["labeler_version"]
