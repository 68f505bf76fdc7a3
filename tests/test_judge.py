"""LLM judge: both orders through the backend interface, disagreement recorded, hand-derived numbers."""

import math

import numpy as np
import pyarrow as pa
import pytest

from prefloop.datasets_spec import PREFERENCES
from prefloop.embedded.model import TinyLlamaConfig, build_model
from prefloop.embedded.tokenizer import build_tokenizer
from prefloop.stage import StageConfig, StageInputError, StageOutput, StageSpec, execute
from prefloop.tasks.judge import JudgeConfig, judge_pairs, labels_output
from prefloop.tasks.registry import run_stage
from prefloop.tasks.training.artifacts import save_model_dir

TEMPLATE = "{prompt}|A={answer_a}|B={answer_b}|"


class PositionBiasedBackend:
    """Always prefers whatever is shown first: P(" A") = 0.8, P(" B") = 0.2, whatever the answers."""

    def __init__(self):
        self.calls = []

    def score_logprobs(self, prompts, continuations, progress=None):
        self.calls.append((list(prompts), list(continuations)))
        return [math.log(0.8) if c == " A" else math.log(0.2) for c in continuations]


class ContentBackend:
    """Prefers the answer containing 'good', wherever it is: P = 0.9 for it, 0.1 for the other."""

    def score_logprobs(self, prompts, continuations, progress=None):
        scores = []
        for prompt, option in zip(prompts, continuations, strict=True):
            shown_a = prompt.split("|A=")[1].split("|B=")[0]
            good_is_a = "good" in shown_a
            wants_a = option == " A"
            scores.append(math.log(0.9) if good_is_a == wants_a else math.log(0.1))
        return scores


def test_both_orders_are_asked_in_one_batched_call() -> None:
    backend = PositionBiasedBackend()
    judge_pairs(backend, ["q"], ["good"], ["bad"], JudgeConfig(template=TEMPLATE))
    assert len(backend.calls) == 1
    prompts, options = backend.calls[0]
    assert prompts == ["q|A=good|B=bad|", "q|A=bad|B=good|"] * 2
    assert options == [" A", " A", " B", " B"]


def test_position_bias_is_recorded_as_order_disagreement() -> None:
    p_first, p_second = judge_pairs(PositionBiasedBackend(), ["q1", "q2"], ["good", "x"], ["bad", "y"],
                                    JudgeConfig(template=TEMPLATE))
    # Chosen first: P(A) = 0.8/(0.8 + 0.2) = 0.8. Chosen second: P(B) = 0.2.
    assert p_first.tolist() == pytest.approx([0.8, 0.8]) and p_second.tolist() == pytest.approx([0.2, 0.2])
    output = labels_output(_pairs(2), "judge:fake", p_first, p_second)
    rows = output.table.to_pylist()
    combined = [r for r in rows if r["labeler"] == "judge:fake"]
    assert [r["verdict"] for r in combined] == ["order_disagreement"] * 2
    assert [r["score"] for r in combined] == pytest.approx([0.5, 0.5])
    assert {r["verdict"] for r in rows if r["labeler"] == "judge:fake/chosen-first"} == {"chosen"}
    assert {r["verdict"] for r in rows if r["labeler"] == "judge:fake/chosen-second"} == {"rejected"}
    # P(A) is 0.8 in both orders: a position bias of 0.8 − 0.5 = 0.3, and every pair disagrees.
    assert output.metrics["order_disagreement_rate"] == 1.0 and output.metrics["agreement_with_labels"] == 0.0
    assert output.metrics["position_bias"] == pytest.approx(0.3)


def test_a_consistent_judge_agrees_in_both_orders() -> None:
    p_first, p_second = judge_pairs(ContentBackend(), ["q1", "q2"], ["good 1", "bad 2"], ["bad 1", "good 2"],
                                    JudgeConfig(template=TEMPLATE))
    assert p_first.tolist() == pytest.approx([0.9, 0.1]) and p_second.tolist() == pytest.approx([0.9, 0.1])
    output = labels_output(_pairs(2), "judge:fake", p_first, p_second)
    combined = {r["target_id"]: r for r in output.table.to_pylist() if r["labeler"] == "judge:fake"}
    assert (combined["p0"]["verdict"], combined["p1"]["verdict"]) == ("chosen", "rejected")
    assert output.metrics["order_disagreement_rate"] == 0.0 and output.metrics["position_bias"] == pytest.approx(0.0)
    assert output.metrics["agreement_with_labels"] == 0.5 and output.metrics["reversed"] == 0.5


def test_non_finite_judgements_are_dropped_with_a_named_reason() -> None:
    output = labels_output(_pairs(2), "judge:fake", np.array([0.7, float("nan")]), np.array([0.6, 0.4]))
    assert {r["target_id"] for r in output.table.to_pylist()} == {"p0"}
    assert output.drops.column("reason").to_pylist() == ["nonfinite_judgement"]
    assert output.metrics["nonfinite_judgement"] == 1


def test_template_must_place_prompt_and_both_answers() -> None:
    with pytest.raises(ValueError, match=r"lacks \{answer_b\}"):
        JudgeConfig(template="{prompt} {answer_a}")


def _pairs(n):
    return pa.table({"pair_id": [f"p{i}" for i in range(n)], "prompt_id": [f"q{i}" for i in range(n)],
                     "prompt": [f"q{i}" for i in range(n)], "chosen": ["c"] * n, "rejected": ["r"] * n})


class Empty(StageConfig):
    pass


def test_judge_stage_round_trip_on_a_tiny_policy(store) -> None:
    tokenizer = build_tokenizer()
    model = build_model(TinyLlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=32, max_position_embeddings=128), len(tokenizer), 0, tokenizer)
    model_spec = StageSpec("hand-model", "1", Empty, "model", {})
    judge_ref = execute(model_spec, lambda ctx: StageOutput(files_dir=save_model_dir(model, tokenizer)), {}, {}, store).output
    pairs_spec = StageSpec("hand-pairs", "1", Empty, "preferences", {}, PREFERENCES)
    pairs = pa.table({"pair_id": ["p0", "p1"], "prompt_id": ["a", "b"], "prompt": ["1+1=?\n", "2+2=?\n"],
                      "chosen": ["A:2", "A:4"], "rejected": ["A:3", "A:5"]})
    pairs_ref = execute(pairs_spec, lambda ctx: StageOutput(table=pairs), {}, {}, store).output
    config = {"template": "{prompt}{answer_a}\n{answer_b}\n", "option_a": "A", "option_b": "1"}
    result = run_stage("label-judge", {"preferences": pairs_ref, "judge": judge_ref}, config, store)
    rows = store.read_table(result.ref).to_pylist()
    judge_id = judge_ref.split("/")[1]
    assert sorted({r["labeler"] for r in rows}) == [f"judge:{judge_id}", f"judge:{judge_id}/chosen-first",
                                                    f"judge:{judge_id}/chosen-second"]
    assert len(rows) == 6 and all(r["target_kind"] == "pair" and 0.0 <= r["score"] <= 1.0 for r in rows)
    assert all(r["labeler_version"] == "1" for r in rows)
    assert set(result.metrics) >= {"order_disagreement_rate", "position_bias", "agreement_with_labels"}
    with pytest.raises(StageInputError, match="missing input role"):
        run_stage("label-judge", {"preferences": pairs_ref}, config, store)
