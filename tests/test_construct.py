"""The construct stage's best-of-n family: ties, margins, all pairs, and bad candidates as named drops."""

import random

import pyarrow as pa
import pytest

from prefloop.datasets_spec import LABELS, SAMPLES
from prefloop.stage import StageConfig, StageOutput, StageSpec, execute
from prefloop.tasks.construct import (
    Candidate,
    ConstructConfig,
    all_pairs,
    best_vs_random,
    best_vs_worst,
    build_pairs,
    collect_candidates,
)
from prefloop.tasks.registry import run_stage

METHODS = ["best_vs_worst", "best_vs_random", "all_pairs", "rso"]


def candidates(scores, prompt_id="p"):
    return [Candidate(f"{prompt_id}-{i}", prompt_id, f"{prompt_id}?", f"A:{i}", s) for i, s in enumerate(scores)]


@pytest.mark.parametrize("method", METHODS)
def test_ties_never_make_a_pair(method) -> None:
    by_prompt = {"tied": candidates([1.0, 1.0, 1.0, 1.0], "tied"), "zero": candidates([0.0] * 3, "zero"),
                 "mixed": candidates([1.0, 0.0, 1.0, 0.0], "mixed")}
    rows, metrics = build_pairs(by_prompt, ConstructConfig(method=method, rso={"num_accepted": 4}))
    assert rows and {row["prompt_id"] for row in rows} == {"mixed"}
    assert all(row["score_chosen"] > row["score_rejected"] and row["chosen"] != row["rejected"] for row in rows)
    assert metrics["prompts_all_tied"] == 2 and metrics["prompts_without_pair"] == 2


def test_all_pairs_above_a_margin_hand_derived() -> None:
    group = candidates([1.0, 0.75, 0.5, 0.0])
    # Margins: 1−.75 = .25 and .75−.5 = .25 are not above 0.25; the rest, largest first:
    # (1, 0) 1.0, (.75, 0) .75, then (1, .5) and (.5, 0) at .5 in sampling order.
    pairs = all_pairs(group, min_margin=0.25)
    assert [(c.score, r.score) for c, r in pairs] == [(1.0, 0.0), (0.75, 0.0), (1.0, 0.5), (0.5, 0.0)]
    assert [(c.score, r.score) for c, r in all_pairs(group, min_margin=0.25, max_pairs=2)] == [(1.0, 0.0), (0.75, 0.0)]
    assert len(all_pairs(group)) == 6  # margin 0: every untied pair of 4 distinct scores


def test_all_pairs_counts_identical_completions_once() -> None:
    group = [Candidate("a", "p", "q", "A:1", 1.0), Candidate("b", "p", "q", "A:1", 1.0),
             Candidate("c", "p", "q", "A:2", 0.0), Candidate("d", "p", "q", "A:2", 0.0)]
    pairs = all_pairs(group)
    assert [(c.sample_id, r.sample_id) for c, r in pairs] == [("a", "c")]


def test_best_vs_worst_respects_the_margin() -> None:
    group = candidates([0.5, 0.25, 0.375])
    assert [(c.score, r.score) for c, r in best_vs_worst(group, random.Random(0))] == [(0.5, 0.25)]
    assert best_vs_worst(group, random.Random(0), min_margin=0.25) == []


def test_best_vs_random_draws_a_strictly_worse_rejected() -> None:
    group = candidates([1.0, 0.0, 0.5, 1.0, 0.25])
    rejected = set()
    for seed in range(40):
        [(chosen, loser)] = best_vs_random(group, random.Random(seed))
        assert chosen.score == 1.0 and loser.score < 1.0
        rejected.add(loser.sample_id)
    assert rejected == {"p-1", "p-2", "p-4"}
    [(_, loser)] = best_vs_random(group, random.Random(0), min_margin=0.8)
    assert loser.score == 0.0 and loser.sample_id == "p-1"


def test_bad_candidates_are_left_out_with_named_reasons() -> None:
    samples = pa.table({
        "sample_id": ["ok", "empty", "blank", "cut", "nan", "unlabelled", "inf"],
        "prompt_id": ["p"] * 7, "prompt": ["q"] * 7,
        "completion": ["A:1", "", "  \n", "1+1=2\n2+", "A:3", "A:4", "A:5"],
        "finish_reason": ["stop", "stop", "stop", "length", "stop", "stop", "stop"],
        "sample_index": pa.array(range(7), pa.int32()),
        "round": pa.array([1] * 7, pa.int32()), "policy_model_id": ["m"] * 7,
    })
    scores = {"ok": 1.0, "empty": 0.0, "blank": 0.0, "cut": 0.0, "nan": float("nan"), "inf": float("inf")}
    by_prompt, dropped, reasons = collect_candidates(samples, scores, drop_truncated=True)
    assert [c.sample_id for c in by_prompt["p"]] == ["ok"]
    assert dict(zip(dropped, reasons, strict=True)) == {
        1: "empty_completion", 2: "empty_completion", 3: "truncated_completion", 4: "nonfinite_score",
        5: "missing_label", 6: "nonfinite_score",
    }
    kept, _, _ = collect_candidates(samples, scores, drop_truncated=False)
    assert [c.sample_id for c in kept["p"]] == ["ok", "cut"]


def _put(store, name, kind, table_spec, table):
    class Empty(StageConfig):
        pass

    spec = StageSpec(name, "1", Empty, kind, {}, table_spec)
    return execute(spec, lambda ctx: StageOutput(table=table), {}, {}, store).output


@pytest.mark.parametrize("method", METHODS)
def test_stage_records_drops_and_never_pairs_a_bad_sample(store, method) -> None:
    # Prompt p: a correct answer, an empty completion (the policy returned nothing) and a truncated
    # one, both scored 0 by the verifier; without the guards each would be the rejected sample.
    samples = pa.table({
        "sample_id": ["p-good", "p-empty", "p-cut", "p-wrong", "q-good", "q-cut"],
        "prompt_id": ["p", "p", "p", "p", "q", "q"], "prompt": ["p?"] * 4 + ["q?"] * 2,
        "completion": ["A:3", "", "1+2=", "A:4", "A:7", "3+4"],
        "finish_reason": ["stop", "stop", "length", "stop", "stop", "length"],
        "sample_index": pa.array([0, 1, 2, 3, 0, 1], pa.int32()),
    })
    scores = {"p-good": 1.0, "p-empty": 0.0, "p-cut": 0.0, "p-wrong": 0.0, "q-good": 1.0, "q-cut": 0.0}
    labels = pa.table({"label_id": [f"l-{k}" for k in scores], "target_id": list(scores),
                       "target_kind": ["sample"] * 6, "labeler": ["exact_answer"] * 6, "score": list(scores.values())})
    inputs = {"samples": _put(store, "hand-samples", "samples", SAMPLES, samples),
              "labels": _put(store, "hand-labels", "labels", LABELS, labels)}
    result = run_stage("construct", inputs, {"method": method, "rso": {"num_accepted": 2, "pairing": "tournament"}}, store)
    pairs = store.read_table(result.ref).to_pylist()
    assert [(p["chosen_sample_id"], p["rejected_sample_id"]) for p in pairs] == [("p-good", "p-wrong")]
    assert result.drops == {"empty_completion": 1, "truncated_completion": 2}
    drops = store.read_table(result.ref, "drops").to_pylist()
    assert {(d["row_id"], d["reason"]) for d in drops} == {
        ("p-empty", "empty_completion"), ("p-cut", "truncated_completion"), ("q-cut", "truncated_completion")}
    assert result.metrics["prompts_without_pair"] == 1  # q has one usable sample left


def test_several_labelers_need_a_choice(store) -> None:
    samples = pa.table({"sample_id": ["a", "b"], "prompt_id": ["p", "p"], "prompt": ["p?"] * 2,
                        "completion": ["A:1", "A:2"], "finish_reason": ["stop", "stop"]})
    labels = pa.table({"label_id": ["1", "2", "3", "4"], "target_id": ["a", "b", "a", "b"],
                       "target_kind": ["sample"] * 4, "labeler": ["v", "v", "rm", "rm"], "score": [1.0, 0.0, 0.0, 1.0]})
    inputs = {"samples": _put(store, "hand-samples", "samples", SAMPLES, samples),
              "labels": _put(store, "hand-labels", "labels", LABELS, labels)}
    with pytest.raises(ValueError, match="several labelers"):
        run_stage("construct", inputs, {}, store)
    result = run_stage("construct", inputs, {"labeler": "rm"}, store)
    [pair] = store.read_table(result.ref).to_pylist()
    assert (pair["chosen"], pair["rejected"]) == ("A:2", "A:1")


def test_duplicate_labels_for_a_sample_are_an_error(store) -> None:
    # Two scores by one labeler for sample 'a': keeping either would decide the pair by row order.
    from prefloop.stage import StageInputError

    samples = pa.table({"sample_id": ["a", "b"], "prompt_id": ["p", "p"], "prompt": ["p?"] * 2,
                        "completion": ["A:1", "A:2"], "finish_reason": ["stop", "stop"]})
    labels = pa.table({"label_id": ["1", "2", "3"], "target_id": ["a", "b", "a"],
                       "target_kind": ["sample"] * 3, "labeler": ["v", "v", "v"], "score": [1.0, 0.5, 0.0]})
    inputs = {"samples": _put(store, "hand-samples", "samples", SAMPLES, samples),
              "labels": _put(store, "hand-labels", "labels", LABELS, labels)}
    with pytest.raises(StageInputError, match=r"several scores by labeler 'v' for the same sample .*\['a'\]"):
        run_stage("construct", inputs, {}, store)
