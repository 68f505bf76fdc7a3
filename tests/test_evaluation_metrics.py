"""The evaluation stage's estimators on hand-made numbers, and the stage on a tiny model.

Unit tier: accuracy, pass@k (Chen et al. 2021), win rate with ties, the KL estimate, flip rate.
Stage tier: evaluate@3 with baseline, previous round, reference and reward model inputs.
"""

import math

import numpy as np
import pyarrow as pa
import pytest

from prefloop.backends.base import Completion, GenerationParams
from prefloop.datasets_spec import PREFERENCES
from prefloop.stage import StageConfig, StageInputError, StageOutput, StageSpec, execute, parse_config
from prefloop.tasks import evaluation
from prefloop.tasks.common.confidence import estimated_flip_rate
from prefloop.tasks.common.statistics import (
    WinRate,
    accuracy_with_stderr,
    kl_estimate,
    mean_pass_at_k,
    mean_with_stderr,
    pass_at_k,
    win_rate,
)
from prefloop.tasks.registry import run_stage

TINY_MODEL = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
              "max_position_embeddings": 64}


# ----------------------------------------------------------------------------------------------
# Estimators
# ----------------------------------------------------------------------------------------------
def test_accuracy_and_its_standard_error():
    accuracy, stderr = accuracy_with_stderr([True, True, True, False])
    assert accuracy == 0.75
    assert stderr == pytest.approx(math.sqrt(0.75 * 0.25 / 4))  # 0.2165
    assert accuracy_with_stderr([False, False]) == (0.0, 0.0)
    with pytest.raises(ValueError, match="zero prompts"):
        accuracy_with_stderr([])


def test_mean_with_stderr_uses_the_sample_standard_deviation():
    mean, stderr = mean_with_stderr([1.0, 2.0, 3.0, 6.0])
    # mean 3, sample variance (4 + 1 + 0 + 9)/3 = 14/3
    assert mean == 3.0 and stderr == pytest.approx(math.sqrt(14 / 3) / 2)
    assert mean_with_stderr([5.0]) == (5.0, None)


@pytest.mark.parametrize(("n", "c", "k", "expected"), [
    (5, 2, 2, 1 - 3 / 10),       # 1 − C(3,2)/C(5,2)
    (10, 3, 1, 0.3),             # pass@1 = c/n
    (10, 0, 5, 0.0),             # nothing correct
    (10, 7, 4, 1.0),             # n − c = 3 < k = 4: any 4 samples include a correct one
    (8, 1, 8, 1.0),
    (20, 4, 5, 1 - math.comb(16, 5) / math.comb(20, 5)),
])
def test_pass_at_k_is_the_unbiased_estimator(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_matches_the_binomial_formula_everywhere_and_refuses_nonsense():
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match="0 <= c <= n"):
        pass_at_k(4, 5, 1)


def test_pass_at_k_is_unbiased_by_simulation():
    """E[pass@k estimate from n samples] equals the true 1 − (1 − p)^k."""
    rng = np.random.default_rng(0)
    p, n, k = 0.2, 10, 3
    estimates = [pass_at_k(n, int(rng.binomial(n, p)), k) for _ in range(20000)]
    assert np.mean(estimates) == pytest.approx(1 - (1 - p) ** k, abs=4 * np.std(estimates) / math.sqrt(20000))


def test_mean_pass_at_k_averages_over_prompts():
    mean, stderr = mean_pass_at_k([(4, 0), (4, 4), (4, 2)], k=2)
    per_prompt = [0.0, 1.0, 1 - 1 / 6]  # 1 − C(2,2)/C(4,2)
    assert mean == pytest.approx(np.mean(per_prompt))
    assert stderr == pytest.approx(np.std(per_prompt, ddof=1) / math.sqrt(3))


def test_win_rate_counts_ties_apart():
    mine = {"a": 1.0, "b": 1.0, "c": 0.0, "d": 0.0, "e": 1.0, "only-mine": 1.0}
    theirs = {"a": 0.0, "b": 1.0, "c": 0.0, "d": 1.0, "e": 0.0, "only-theirs": 0.0}
    outcome = win_rate(mine, theirs)
    assert outcome == WinRate(wins=2, ties=2, losses=1) and outcome.n == 5  # a, e win; b, c tie; d loses
    rate, stderr = outcome.rate("wins")
    assert rate == 0.4 and stderr == pytest.approx(math.sqrt(0.4 * 0.6 / 5))
    assert outcome.rate("ties")[0] == 0.4 and outcome.rate("losses")[0] == 0.2
    # judged by a reward model: real-valued scores, equal rewards tie
    assert win_rate({"a": 0.3, "b": -1.0, "c": 2.0}, {"a": 0.1, "b": -1.0, "c": 2.5}) == WinRate(1, 1, 1)
    assert math.isnan(win_rate({}, {}).rate("wins")[0])


def test_kl_estimate_on_hand_values():
    # two prompts, two samples each: log-ratios 0.5, 1.5 (prompt p) and 0.0, 0.2 (prompt q)
    kl, stderr = kl_estimate([-1.0, -2.0, -3.0, -0.8], [-1.5, -3.5, -3.0, -1.0], ["p", "p", "q", "q"])
    assert kl == pytest.approx((0.5 + 1.5 + 0.0 + 0.2) / 4)
    per_prompt = [1.0, 0.1]  # the standard error is over prompts, not samples
    assert stderr == pytest.approx(np.std(per_prompt, ddof=1) / math.sqrt(2))
    assert kl_estimate([-1.0, -2.0], [-1.0, -2.0], ["p", "q"])[0] == 0.0
    with pytest.raises(ValueError, match="one policy and one reference"):
        kl_estimate([-1.0], [], ["p"])


def test_kl_rows_to_the_reference_and_to_the_start_by_hand():
    policy = [-1.0, -2.0, -3.0, -0.8]
    ids = ["p", "p", "q", "q"]
    # reference: log-ratios 0.5, 1.5 | 0.0, 0.2 → KL 0.55, per-prompt means 1.0, 0.1
    # start:     log-ratios 1.0, 1.0 | 2.0, 0.0 → KL 1.0,  per-prompt means 1.0, 1.0 (stderr 0)
    rows = evaluation.kl_rows(policy, {"reference": [-1.5, -3.5, -3.0, -1.0], "start": [-2.0, -3.0, -5.0, -0.8]}, ids)
    by_name = {row["metric"]: row for row in rows}
    assert by_name["kl_to_reference"]["value"] == pytest.approx(0.55)
    assert by_name["kl_to_reference"]["stderr"] == pytest.approx(0.9 / math.sqrt(2) / math.sqrt(2))
    assert by_name["kl_to_start"]["value"] == pytest.approx(1.0) and by_name["kl_to_start"]["stderr"] == 0.0
    assert by_name["kl_to_start"]["count"] == 4
    # the same model as reference and start: the same estimate and error
    same = evaluation.kl_rows(policy, {"reference": [-1.5, -3.5, -3.0, -1.0], "start": [-1.5, -3.5, -3.0, -1.0]}, ids)
    assert {k: v for k, v in same[0].items() if k != "metric"} == {k: v for k, v in same[1].items() if k != "metric"}


def test_kl_estimate_recovers_the_exact_kl_of_two_categoricals():
    policy, reference = np.array([0.6, 0.3, 0.1]), np.array([0.2, 0.5, 0.3])
    exact = float(np.sum(policy * np.log(policy / reference)))
    rng = np.random.default_rng(1)
    draws = rng.choice(3, size=(4000, 5), p=policy)  # 4000 prompts, 5 samples each
    prompt_ids = [f"p{i}" for i in range(4000) for _ in range(5)]
    kl, stderr = kl_estimate(np.log(policy[draws]).ravel().tolist(), np.log(reference[draws]).ravel().tolist(),
                             prompt_ids)
    assert abs(kl - exact) < 4 * stderr and stderr < 0.02


def test_estimated_flip_rate_from_confidences():
    assert estimated_flip_rate([0.9, 0.7, None, 1.0]) == pytest.approx((0.1 + 0.3 + 0.0) / 3)
    assert estimated_flip_rate([None, None]) is None
    assert estimated_flip_rate([]) is None


def test_config_refuses_pass_k_above_the_samples_drawn():
    with pytest.raises(StageInputError, match="pass_k"):
        parse_config(evaluation.SPEC, {"samples_per_prompt": 4, "pass_k": [1, 8]})
    assert evaluation.EvaluationConfig(samples_per_prompt=0, pass_k=(16,)).samples_per_prompt == 0


def test_report_knows_the_current_evaluate_version():
    from prefloop.report import CURRENT_EVALUATE_VERSION

    assert evaluation.SPEC.version == CURRENT_EVALUATE_VERSION == "3"


# ----------------------------------------------------------------------------------------------
# Sequence log-probs on a real (tiny) model
# ----------------------------------------------------------------------------------------------
def _tiny_backend(seed: int):
    from prefloop.backends.hf import HFBackend
    from prefloop.embedded.model import TinyLlamaConfig, build_model
    from prefloop.embedded.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    model = build_model(TinyLlamaConfig(**TINY_MODEL), len(tokenizer), seed, tokenizer)
    return HFBackend(model.eval(), tokenizer, batch_size=4)


def test_completion_sequence_logprobs_count_eos_only_when_generation_stopped():
    backend = _tiny_backend(0)
    prompt = "3+4="
    [[sampled]] = backend.generate([prompt], GenerationParams(n=1, temperature=1.0, max_new_tokens=6, seed=3))
    truncated = Completion(text=sampled.text, num_tokens=sampled.num_tokens, sum_logprob=sampled.sum_logprob,
                           finish_reason="length")
    stopped = Completion(text=sampled.text, num_tokens=sampled.num_tokens, sum_logprob=sampled.sum_logprob,
                         finish_reason="stop")
    as_truncated, as_stopped = evaluation.completion_sequence_logprobs(backend, [prompt, prompt], [truncated, stopped])
    assert as_truncated == pytest.approx(backend.score_logprobs([prompt], [sampled.text])[0], abs=1e-5)
    assert as_stopped < as_truncated  # + log π(eos | …) < 0


# ----------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------
class _Empty(StageConfig):
    pass


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Prompts, two tiny policies (3 and 6 SFT steps) and a tiny reward model in one store."""
    from prefloop.storage import ArtifactStore

    store = ArtifactStore(tmp_path_factory.mktemp("eval") / "store")
    made = run_stage("prompts", {}, {"n_train": 16, "n_heldout": 6, "task": {"min_ops": 1, "max_ops": 1}}, store)
    training = {"max_steps": 3, "batch_size": 8}
    first = run_stage("sft", {"prompts": made.output}, {"model": TINY_MODEL, "training": training}, store)
    second = run_stage("sft", {"prompts": made.output}, {"model": TINY_MODEL, "training": training | {"max_steps": 6}}, store)
    reward_model = _reward_model_artifact(store, tmp_path_factory.mktemp("rm"))
    return store, made, first, second, reward_model


def _reward_model_artifact(store, scratch):
    """A randomly initialised one-label Llama classifier, stored as a model artifact."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from prefloop.embedded.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=32, max_position_embeddings=64, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(scratch)
    tokenizer.save_pretrained(scratch)
    spec = StageSpec("hand-reward-model", "1", _Empty, "model", {})
    return execute(spec, lambda ctx: StageOutput(files_dir=scratch, remove_files_dir=False), {}, {}, store)


SMALL = {"max_prompts": 6, "max_new_tokens": 8, "samples_per_prompt": 4, "pass_k": [1, 4], "batch_size": 16}


def test_evaluate_measures_every_metric_against_baseline_previous_and_reference(tiny):
    store, made, first, second, _ = tiny
    base = run_stage("evaluate", {"policy": first.output, "prompts": made.output, "reference": first.output}, SMALL, store)
    assert base.metrics["kl_to_reference"] == 0.0  # the policy is its own reference
    pairs = _pairs_artifact(store)
    result = run_stage("evaluate", {"policy": second.output, "prompts": made.output, "baseline": base.output,
                             "previous": base.output, "reference": first.output, "preferences": pairs.output,
                             "start": first.output}, SMALL | {"round": 1}, store)
    rows = {r["metric"]: r for r in store.read_table(result.ref).to_pylist()}
    # the start is the reference here (a fixed reference): the same samples scored by the same model
    assert rows["kl_to_start"]["value"] == rows["kl_to_reference"]["value"]
    assert rows["kl_to_start"]["stderr"] == rows["kl_to_reference"]["stderr"] and rows["kl_to_start"]["count"] == 24
    assert result.metrics["kl_to_start"] == result.metrics["kl_to_reference"] != 0.0
    # a reference that moved to the policy itself (previous_round): KL 0 to it, the drift shows against the start
    moved = run_stage("evaluate", {"policy": second.output, "prompts": made.output, "reference": second.output,
                                   "start": first.output}, SMALL | {"round": 1}, store)
    assert moved.metrics["kl_to_reference"] == 0.0
    assert moved.metrics["kl_to_start"] == pytest.approx(result.metrics["kl_to_reference"], abs=1e-9)
    for metric in ("accuracy", "pass@1", "pass@4", "kl_to_reference", "mean_length", "truncated_rate", "accuracy_gain",
                   "win_rate_vs_sft", "tie_rate_vs_sft", "loss_rate_vs_sft", "win_rate_vs_previous",
                   "pairs_built", "pairs_kept", "pairs_by_method:best_vs_worst", "estimated_flip_rate"):
        assert metric in rows, metric
    assert rows["pass@1"]["count"] == 6 and rows["kl_to_reference"]["count"] == 24
    assert rows["pass@1"]["value"] <= rows["pass@4"]["value"]
    assert math.isfinite(rows["kl_to_reference"]["value"]) and rows["kl_to_reference"]["stderr"] is not None
    outcome = [rows[f"{o}_rate_vs_sft"]["value"] for o in ("win", "tie", "loss")]
    assert sum(outcome) == pytest.approx(1.0) and rows["win_rate_vs_sft"]["count"] == 6
    assert rows["estimated_flip_rate"]["value"] == pytest.approx((0.2 + 0.4) / 2)
    assert result.metrics["construction_method"] == "best_vs_worst"
    assert any("no reward model configured" in note for note in result.metrics["notes"])
    per_prompt = store.read_table(result.ref, "eval_results").to_pylist()
    assert all(r["samples_drawn"] == 4 and 0 <= r["samples_correct"] <= 4 for r in per_prompt)
    # the stored pass@1 is the mean of c/n over prompts
    assert rows["pass@1"]["value"] == pytest.approx(np.mean([r["samples_correct"] / 4 for r in per_prompt]))


def _pairs_artifact(store):
    table = pa.table({
        "pair_id": ["1", "2"], "prompt_id": ["a", "b"], "prompt": ["x?", "y?"], "chosen": ["good", "fine"],
        "rejected": ["bad", "worse"], "score_chosen": [1.0, 1.0], "score_rejected": [0.0, 0.0], "margin": [1.0, 1.0],
        "method": ["best_vs_worst"] * 2, "confidence": [0.8, 0.6],
    })
    return execute(StageSpec("hand-pairs", "1", _Empty, "preferences", {}, PREFERENCES),
                   lambda ctx: StageOutput(table=table), {}, {}, store)


def test_evaluate_with_a_reward_model_judges_wins_by_reward(tiny):
    store, made, first, second, reward_model = tiny
    config = SMALL | {"samples_per_prompt": 0, "win_judge": "reward_model"}
    base = run_stage("evaluate", {"policy": first.output, "prompts": made.output, "reward_model": reward_model.output},
                          config, store)
    result = run_stage("evaluate", {"policy": second.output, "prompts": made.output, "baseline": base.output,
                             "reward_model": reward_model.output}, config, store)
    rows = {r["metric"]: r for r in store.read_table(result.ref).to_pylist()}
    rewards = store.read_table(result.ref, "eval_results").column("reward").to_pylist()
    assert rows["mean_reward"]["value"] == pytest.approx(np.mean(rewards)) and rows["mean_reward"]["count"] == 6
    base_rewards = store.read_table(base.ref, "eval_results").column("reward").to_pylist()
    wins = sum(a > b for a, b in zip(rewards, base_rewards, strict=True))
    assert rows["win_rate_vs_sft"]["value"] == pytest.approx(wins / 6)
    assert "pass@1" not in rows and "kl_to_reference" not in rows  # samples_per_prompt 0
    assert result.metrics["win_judge"] == "reward_model"


def test_reward_judge_without_a_reward_model_is_a_clear_error(tiny):
    store, made, first, _, _ = tiny
    with pytest.raises(ValueError, match="no reward model was given.*reward_model=REF"):
        run_stage("evaluate", {"policy": first.output, "prompts": made.output},
                       SMALL | {"samples_per_prompt": 0, "win_judge": "reward_model"}, store)


class _AnswerInWordsBackend:
    """Answers every prompt correctly, but in words ("... so the result is 7."), never as "A: 7"."""

    def __init__(self, answers: dict[str, str]):
        self.answers = answers

    def generate(self, prompts, params, progress=None):
        return [[Completion(text=f"Adding up, the result is {self.answers[p]}.", num_tokens=5, sum_logprob=-1.0,
                            finish_reason="stop")] for p in prompts]


def test_evaluate_checks_answers_with_the_configured_task(tiny, monkeypatch):
    """The arithmetic task reads only an "A:" line; gsm8k's last-number extraction reads the answer in words."""
    store, made, first, _, _ = tiny
    table = store.read_table(made.ref).filter(pa.compute.equal(store.read_table(made.ref).column("split"), "heldout"))
    answers = dict(zip(table.column("prompt").to_pylist(), table.column("reference_answer").to_pylist(), strict=True))
    from prefloop.backends.hf import HFBackend

    monkeypatch.setattr(HFBackend, "from_directory", lambda *a, **k: _AnswerInWordsBackend(answers))
    config = SMALL | {"samples_per_prompt": 0}
    arithmetic = run_stage("evaluate", {"policy": first.output, "prompts": made.output}, config, store)
    gsm8k = run_stage("evaluate", {"policy": first.output, "prompts": made.output}, config | {"task": "gsm8k"}, store)
    assert arithmetic.metrics["accuracy"] == 0.0
    assert gsm8k.metrics["accuracy"] == 1.0


def test_a_loop_evaluates_with_its_label_task_unless_told_otherwise():
    from prefloop.config import LoopConfig

    assert LoopConfig.model_validate({}).evaluation.task == "arithmetic"
    assert LoopConfig.model_validate({"label": {"task": "gsm8k"}}).evaluation.task == "gsm8k"
    assert LoopConfig.model_validate({"label": {"task": "gsm8k"}, "evaluation": {"task": "math"}}).evaluation.task == "math"
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        evaluation.EvaluationConfig(task="nope")
