"""Reward models: Bradley–Terry loss and ensemble aggregation by hand, accuracies, and the train-rm →
label-rm → evaluate round trip on a tiny Llama."""

import math
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import torch

from prefloop.datasets_spec import PREFERENCES, SAMPLES
from prefloop.embedded.model import TinyLlamaConfig, build_model
from prefloop.embedded.tokenizer import build_tokenizer
from prefloop.stage import StageConfig, StageInputError, StageOutput, StageSpec, execute
from prefloop.storage import ArtifactRef
from prefloop.tasks import evaluation
from prefloop.tasks.common.ensembles import MemberStandardisation, aggregate_rewards, combine_standardised
from prefloop.tasks.registry import run_stage
from prefloop.tasks.reward_model import best_of_n_accuracy, best_of_n_sets, pairwise_accuracy
from prefloop.tasks.training.artifacts import save_model_dir
from prefloop.tasks.training.recipes import reward_model
from prefloop.tasks.training.recipes.reward_model import bradley_terry_loss

TINY_MODEL = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
              "max_position_embeddings": 64}


class Empty(StageConfig):
    pass


def put(store, kind, table_spec, table, name="x"):
    """Write a hand-made table as if a stage had made it."""
    spec = StageSpec(f"hand-{kind}-{name}", "1", Empty, kind, {}, table_spec)
    return execute(spec, lambda ctx: StageOutput(table=table), {}, {}, store, name).output


def pairs_table(rows):
    """(prompt, chosen, rejected) rows; chosen scored 1, rejected 0."""
    return pa.table({
        "pair_id": [f"p{i}" for i in range(len(rows))], "prompt_id": [r[0] for r in rows],
        "prompt": [r[0] for r in rows], "chosen": [r[1] for r in rows], "rejected": [r[2] for r in rows],
        "score_chosen": [1.0] * len(rows), "score_rejected": [0.0] * len(rows),
    })


# ----------------------------------------------------------------------------------------------
# Hand-derived numbers
# ----------------------------------------------------------------------------------------------
def test_bradley_terry_loss_by_hand() -> None:
    chosen = torch.tensor([2.0, 0.0, 1.0])
    rejected = torch.tensor([0.0, 1.0, 1.0])
    # −log σ(z) = log(1 + e^−z): z = 2 → log(1 + e^−2); z = −1 → log(1 + e); z = 0 → log 2.
    expected = [math.log(1 + math.exp(-2)), math.log(1 + math.e), math.log(2)]
    assert bradley_terry_loss(chosen, rejected).tolist() == pytest.approx(expected, abs=1e-6)
    # Centring adds c·(r_w + r_l)²: with c = 0.1 the pairs get +0.4, +0.1 and +0.4.
    centred = bradley_terry_loss(chosen, rejected, center_coefficient=0.1).tolist()
    assert centred == pytest.approx([expected[0] + 0.4, expected[1] + 0.1, expected[2] + 0.4], abs=1e-6)


def test_bradley_terry_gradient_pushes_chosen_up_and_rejected_down() -> None:
    chosen = torch.tensor([0.0], requires_grad=True)
    rejected = torch.tensor([0.0], requires_grad=True)
    bradley_terry_loss(chosen, rejected).sum().backward()
    # d/dr_w of −log σ(r_w − r_l) at 0 is −σ(0) = −0.5, and +0.5 for r_l.
    assert chosen.grad.item() == pytest.approx(-0.5) and rejected.grad.item() == pytest.approx(0.5)


def test_ensemble_aggregation_by_hand() -> None:
    # Three members (rows) scoring two targets (columns), already standardised (tests/test_ensembles.py
    # covers the standardisation itself).
    rewards = [[1.0, 4.0], [2.0, 0.0], [6.0, 2.0]]
    assert combine_standardised(rewards, "mean").tolist() == pytest.approx([3.0, 2.0])
    assert combine_standardised(rewards, "min").tolist() == pytest.approx([1.0, 0.0])
    # Population variances: (4 + 1 + 9)/3 = 14/3 and (4 + 4 + 0)/3 = 8/3.
    assert combine_standardised(rewards, "uncertainty_weighted", 1.0).tolist() == pytest.approx([3 - 14 / 3, 2 - 8 / 3])
    assert combine_standardised(rewards, "uncertainty_weighted", 0.5).tolist() == pytest.approx([3 - 7 / 3, 2 - 4 / 3])
    assert combine_standardised(rewards, "uncertainty_weighted", 0.0).tolist() == pytest.approx([3.0, 2.0])


def test_aggregation_refuses_non_finite_rewards_and_bad_shapes() -> None:
    with pytest.raises(ValueError, match="non-finite rewards for 1 target"):
        aggregate_rewards([[1.0, float("nan")], [2.0, 3.0]], "mean")
    with pytest.raises(ValueError, match="non-finite"):
        aggregate_rewards([[float("inf")]], "min")
    with pytest.raises(ValueError, match="members, targets"):
        aggregate_rewards([1.0, 2.0], "mean")
    with pytest.raises(ValueError, match="unknown aggregation 'median'"):
        combine_standardised([[1.0]], "median")


def test_pairwise_and_best_of_4_accuracy_by_hand() -> None:
    # Wins, a loss, a tie (counts as wrong) and a win: 2/4, SE sqrt(0.5·0.5/4) = 0.25.
    accuracy, stderr, n = pairwise_accuracy([1.0, 2.0, 3.0, 4.0], [0.0, 3.0, 3.0, 1.0])
    assert (accuracy, stderr, n) == (0.5, pytest.approx(0.25), 4)
    # Set 1: 5 beats 1, 2, 3; set 2: 1 ties the best wrong answer (wrong); set 3: 2 beats all.
    hit, hit_stderr, sets = best_of_n_accuracy([5.0, 1.0, 2.0], [[1.0, 2.0, 3.0], [0.0, 1.0, 0.5], [1.9, -1.0, 0.0]])
    assert (hit, sets) == (pytest.approx(2 / 3), 3)
    assert hit_stderr == pytest.approx(math.sqrt(2 / 3 * 1 / 3 / 3))
    with pytest.raises(ValueError, match="no held-out pairs"):
        pairwise_accuracy([], [])


def test_best_of_4_sets_need_one_top_and_three_lower_completions() -> None:
    table = pairs_table([("q1", "good", "bad1"), ("q1", "good", "bad2"), ("q1", "good", "bad3"),
                         ("q2", "good", "bad1"), ("q2", "good", "bad2")])
    sets = best_of_n_sets(table)
    assert len(sets) == 1
    assert sets[0].prompt == "q1" and sets[0].correct == "good" and sorted(sets[0].wrong) == ["bad1", "bad2", "bad3"]


# ----------------------------------------------------------------------------------------------
# Stages on a tiny model
# ----------------------------------------------------------------------------------------------
def _toy_pairs(prompts):
    """A learnable preference: chosen ends in 'A:1', rejected in 'A:2' (or 'A:3', 'A:4' for best-of-4)."""
    return [(f"{i}+0=?\n", "A:1", f"A:{wrong}") for i in prompts for wrong in (2, 3, 4)]


TRAIN_CONFIG = {"model": TINY_MODEL, "training": {"learning_rate": 1e-2, "batch_size": 8, "max_steps": 40,
                                                  "warmup_steps": 0}}


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One store for the module: toy pairs, a single reward model and a 2-member ensemble, trained once."""
    from prefloop.storage import ArtifactStore

    store = ArtifactStore(tmp_path_factory.mktemp("reward-models") / "store")
    train = put(store, "preferences", PREFERENCES, pairs_table(_toy_pairs(range(1, 9))), "train")
    heldout = put(store, "preferences", PREFERENCES, pairs_table(_toy_pairs(range(11, 17))), "heldout")
    single = run_stage("train-rm", {"preferences": train, "heldout": heldout}, TRAIN_CONFIG, store)
    ensemble = run_stage("train-rm", {"preferences": train, "heldout": heldout}, {**TRAIN_CONFIG, "ensemble_size": 2}, store)
    samples = put(store, "samples", SAMPLES, pa.table({
        "sample_id": ["s1", "s2", "s3"], "prompt_id": ["q", "q", "r"], "prompt": ["5+0=?\n", "5+0=?\n", "6+0=?\n"],
        "completion": ["A:1", "A:2", "A:1"]}), "samples")
    return SimpleNamespace(store=store, train=train, heldout=heldout, single=single, ensemble=ensemble, samples=samples)


def test_train_rm_learns_and_reports_heldout_accuracies(shared) -> None:
    result = shared.single
    metrics = result.metrics
    assert result.ref.kind == "model" and metrics["ensemble_size"] == 1 and metrics["initialised_from"] == "fresh"
    assert metrics["heldout_pairs"] == 18 and metrics["heldout_best_of_4_sets"] == 6
    assert metrics["heldout_pairwise_accuracy"] == 1.0 and metrics["heldout_best_of_4_accuracy"] == 1.0
    assert metrics["final_loss"] < 0.1
    assert "train_log" in shared.store.read_manifest(result.ref).tables
    again = run_stage("train-rm", {"preferences": shared.train, "heldout": shared.heldout}, TRAIN_CONFIG, shared.store)
    assert again.cached and again.output == result.output


def test_single_reward_model_artifact_is_what_evaluate_reads(shared) -> None:
    model_dir = shared.store.local_files(shared.single.ref)
    prompts, completions = ["3+0=?\n", "3+0=?\n", "12+0=?\n"], ["A:1", "A:2", "A:1"]
    ours = reward_model.score_with_members(model_dir, prompts, completions)
    theirs = evaluation.score_rewards(model_dir, prompts, completions, batch_size=2)
    assert ours.shape == (1, 3)
    assert ours[0].tolist() == pytest.approx(theirs, abs=1e-5)
    assert theirs[0] > theirs[1]
    # an ensemble artifact is read too: the evaluation's reward is the mean of the members' rewards,
    # each standardised with the μ_i, σ_i train-rm stored
    ensemble_dir = shared.store.local_files(shared.ensemble.ref)
    members = reward_model.score_with_members(ensemble_dir, prompts, completions)
    assert members.shape == (2, 3)
    expected = np.mean([(members[i] - mean) / std for i, (mean, std) in enumerate(_stored_stats(shared))], axis=0)
    assert evaluation.score_rewards(ensemble_dir, prompts, completions) == pytest.approx(expected.tolist(), abs=1e-6)


def _stored_stats(shared) -> list[tuple[float, float]]:
    stored = MemberStandardisation.read(shared.store.local_files(shared.ensemble.ref))
    return list(zip(stored.means, stored.stds, strict=True))


def test_train_rm_stores_each_members_statistics_on_the_heldout_completions(shared) -> None:
    ensemble_dir = shared.store.local_files(shared.ensemble.ref)
    stored = MemberStandardisation.read(ensemble_dir)
    # held-out prompts 11..16, each with completions A:1 (chosen) and A:2, A:3, A:4: 24 distinct texts
    assert stored.count == 24 and stored.reference == "held-out completions"
    assert shared.ensemble.metrics["standardisation"] == stored.to_dict()
    prompts = [f"{i}+0=?\n" for i in range(11, 17) for _ in range(4)]
    completions = [f"A:{k}" for _ in range(11, 17) for k in (1, 2, 3, 4)]
    rewards = reward_model.score_with_members(ensemble_dir, prompts, completions)
    assert list(stored.means) == pytest.approx(rewards.mean(axis=1).tolist(), abs=1e-6)
    assert list(stored.stds) == pytest.approx(rewards.std(axis=1).tolist(), abs=1e-6)
    assert MemberStandardisation.read(shared.store.local_files(shared.single.ref)) is None  # one model: raw reward


def test_ensemble_members_differ_and_label_rm_writes_members_plus_aggregate(shared) -> None:
    result = shared.ensemble
    assert result.metrics["member_seeds"] == [0, 1]
    assert set(result.metrics["heldout_by_scorer"]) == {"member_0", "member_1", "mean", "min", "uncertainty_weighted"}
    labels = run_stage("label-rm", {"reward_model": result.output, "samples": shared.samples},
                               {"aggregation": "uncertainty_weighted", "uncertainty_penalty": 1.0}, shared.store)
    model_id = result.ref.id
    by_labeler = {}
    for row in shared.store.read_table(labels.ref).to_pylist():
        by_labeler.setdefault(row["labeler"], {})[row["target_id"]] = row["score"]
        assert row["labeler_version"] == "2" and row["target_kind"] == "sample"
    member_0, member_1 = f"rm:{model_id}/member-0", f"rm:{model_id}/member-1"
    aggregate = f"rm-ensemble:{model_id}/mean-1var"
    assert set(by_labeler) == {member_0, member_1, aggregate}
    assert by_labeler[member_0] != by_labeler[member_1]
    (mean_0, std_0), (mean_1, std_1) = _stored_stats(shared)
    for sample in ("s1", "s2", "s3"):
        a = (by_labeler[member_0][sample] - mean_0) / std_0  # member rows keep the raw reward
        b = (by_labeler[member_1][sample] - mean_1) / std_1
        # mean − 1·population variance of two standardised values = (a + b)/2 − ((a − b)/2)².
        assert by_labeler[aggregate][sample] == pytest.approx((a + b) / 2 - ((a - b) / 2) ** 2, abs=1e-6)
    assert labels.metrics["member_standardisation"] == {
        member_0: {"mean": mean_0, "std": std_0}, member_1: {"mean": mean_1, "std": std_1}}
    members_only = run_stage("label-rm", {"reward_model": result.output, "samples": shared.samples}, {}, shared.store)
    assert set(shared.store.read_table(members_only.ref).column("labeler").to_pylist()) == {member_0, member_1}


def test_label_stage_reward_model_labeler_scores_samples_with_the_aggregate(shared) -> None:
    inputs = {"samples": shared.samples, "model": shared.ensemble.output}
    result = run_stage("label", inputs, {"labeler": "reward_model", "settings": {"aggregation": "min"}}, shared.store)
    rows = shared.store.read_table(result.ref).to_pylist()
    members = reward_model.score_with_members(shared.store.local_files(shared.ensemble.ref),
                                              ["5+0=?\n", "5+0=?\n", "6+0=?\n"], ["A:1", "A:2", "A:1"])
    standardised = [(members[i] - mean) / std for i, (mean, std) in enumerate(_stored_stats(shared))]
    assert [r["score"] for r in rows] == pytest.approx(np.min(standardised, axis=0).tolist(), abs=1e-6)
    assert {r["labeler"] for r in rows} == {"reward_model"} and result.metrics["members"] == 2
    with pytest.raises(StageInputError, match="needs the input"):
        run_stage("label", {"samples": shared.samples}, {"labeler": "reward_model"}, shared.store)


def test_label_rm_on_pairs_scores_the_margin_and_names_one_model(shared) -> None:
    ref = shared.single.ref
    labels = run_stage("label-rm", {"reward_model": str(ref), "preferences": shared.heldout}, {}, shared.store)
    rows = shared.store.read_table(labels.ref).to_pylist()
    assert len(rows) == 18 and {r["labeler"] for r in rows} == {f"rm:{ref.id}"}
    assert all(r["target_kind"] == "pair" and r["score"] > 0 for r in rows)
    pairs = shared.store.read_table(ArtifactRef.parse(shared.heldout))
    model_dir = shared.store.local_files(ref)
    prompts = pairs.column("prompt").to_pylist()
    margins = (reward_model.score_with_members(model_dir, prompts, pairs.column("chosen").to_pylist())[0]
               - reward_model.score_with_members(model_dir, prompts, pairs.column("rejected").to_pylist())[0])
    by_pair = {r["target_id"]: r["score"] for r in rows}
    assert [by_pair[p] for p in pairs.column("pair_id").to_pylist()] == pytest.approx(margins.tolist(), abs=1e-6)


def test_label_rm_on_pairs_aggregates_standardised_margins(shared) -> None:
    result = run_stage("label-rm", {"reward_model": shared.ensemble.output, "preferences": shared.heldout},
                       {"aggregation": "min"}, shared.store)
    rows = shared.store.read_table(result.ref).to_pylist()
    pairs = shared.store.read_table(ArtifactRef.parse(shared.heldout))
    model_dir = shared.store.local_files(shared.ensemble.ref)
    prompts = pairs.column("prompt").to_pylist()
    margins = (reward_model.score_with_members(model_dir, prompts, pairs.column("chosen").to_pylist())
               - reward_model.score_with_members(model_dir, prompts, pairs.column("rejected").to_pylist()))
    # (r_i(y_w) − r_i(y_l)) / σ_i: the offsets μ_i cancel in a margin
    expected = np.min([margins[i] / std for i, (_, std) in enumerate(_stored_stats(shared))], axis=0)
    aggregate = {r["target_id"]: r["score"] for r in rows if r["labeler"].startswith("rm-ensemble:")}
    assert [aggregate[p] for p in pairs.column("pair_id").to_pylist()] == pytest.approx(expected.tolist(), abs=1e-6)
    assert result.metrics["standardisation_reference"] == "held-out completions" and "notes" not in result.metrics


def test_non_finite_rewards_are_dropped_with_a_named_reason(shared, monkeypatch) -> None:
    def broken(model_dir, prompts, completions, batch_size=64):
        return np.array([[0.5, float("nan"), 1.0], [0.25, 1.0, float("inf")]])

    monkeypatch.setattr(reward_model, "score_with_members", broken)  # the recipe both labelers call
    result = run_stage("label-rm", {"reward_model": shared.ensemble.output, "samples": shared.samples},
                               {"aggregation": "mean"}, shared.store)
    assert result.drops == {"nonfinite_reward": 2}
    rows = shared.store.read_table(result.ref).to_pylist()
    assert {r["target_id"] for r in rows} == {"s1"} and len(rows) == 3  # two members + the mean
    (mean_0, std_0), (mean_1, std_1) = _stored_stats(shared)
    expected = ((0.5 - mean_0) / std_0 + (0.25 - mean_1) / std_1) / 2  # s1's rewards, standardised, averaged
    assert [r["score"] for r in rows if r["labeler"].startswith("rm-ensemble:")] == pytest.approx([expected])
    labeled = run_stage("label", {"samples": shared.samples, "model": shared.ensemble.output},
                           {"labeler": "reward_model"}, shared.store)
    assert labeled.drops == {"nonfinite_reward": 2}
    assert shared.store.read_table(labeled.ref).column("score").to_pylist() == pytest.approx([expected])


def test_bad_inputs_get_clear_errors(shared, tmp_path) -> None:
    store = shared.store
    empty = put(store, "preferences", PREFERENCES, PREFERENCES.schema.empty_table(), "empty")
    with pytest.raises(ValueError, match="is empty: a reward model needs pairs"):
        run_stage("train-rm", {"preferences": empty}, TRAIN_CONFIG, store)
    ref = shared.single.output
    with pytest.raises(ValueError, match="either samples .* or pairs"):
        run_stage("label-rm", {"reward_model": ref}, {}, store)
    with pytest.raises(ValueError, match="is empty: there is nothing to score"):
        run_stage("label-rm", {"reward_model": ref, "preferences": empty}, {}, store)
    with pytest.raises(StageInputError, match="ensemble_size"):
        run_stage("train-rm", {"preferences": shared.train}, {**TRAIN_CONFIG, "ensemble_size": 0}, store)
    with pytest.raises(ValueError, match="neither a model .* nor an ensemble"):
        reward_model.reward_model_members(tmp_path)
    with pytest.raises(StageInputError, match="max_length is not supported for reward models"):
        run_stage("train-rm", {"preferences": shared.train}, {"training": {"max_length": 16}}, store)


def test_reward_model_from_a_policy_keeps_its_backbone(tmp_path) -> None:
    tokenizer = build_tokenizer()
    policy = build_model(TinyLlamaConfig(**TINY_MODEL), len(tokenizer), 3, tokenizer)
    policy_dir = save_model_dir(policy, tokenizer)
    model = reward_model.build_reward_model(tokenizer, seed=0, policy_dir=policy_dir)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id
    assert torch.equal(model.model.embed_tokens.weight, policy.model.embed_tokens.weight)
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, policy.model.layers[0].mlp.up_proj.weight)
    other_head = reward_model.build_reward_model(tokenizer, seed=1, policy_dir=policy_dir)
    assert not torch.equal(model.score.weight, other_head.score.weight)


def test_train_rm_from_a_policy_artifact_holds_out_whole_prompts(shared) -> None:
    tokenizer = build_tokenizer()
    policy = build_model(TinyLlamaConfig(**TINY_MODEL), len(tokenizer), 5, tokenizer)
    policy_spec = StageSpec("hand-policy", "1", Empty, "model", {})
    policy_ref = execute(policy_spec, lambda ctx: StageOutput(files_dir=save_model_dir(policy, tokenizer)), {}, {},
                         shared.store).output
    config = {"training": {"max_steps": 2, "batch_size": 4}, "heldout_fraction": 0.5}
    result = run_stage("train-rm", {"preferences": shared.train, "policy": policy_ref}, config, shared.store)
    metrics = result.metrics
    assert metrics["initialised_from"] == "policy"
    # 8 prompts × 3 pairs: a prompt's pairs are all trained on or all held out.
    assert metrics["train_pairs"] + metrics["heldout_pairs"] == 24
    assert metrics["train_pairs"] % 3 == 0 and 0 < metrics["heldout_pairs"] < 24
    model, _ = reward_model.load_reward_model(shared.store.local_files(result.ref))
    assert model.config.num_labels == 1 and model.config.hidden_size == TINY_MODEL["hidden_size"]
