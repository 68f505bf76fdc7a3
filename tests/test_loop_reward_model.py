"""Reward-model-labeled rounds in the loop (loop setting ``reward_model``): a reward model the user brings, an
ensemble trained by train-rm before round 1 from imported pairs, the ensemble aggregates on hand numbers through
the loop's labeling path, and a reward model that cannot read the policy's tokens refused before anything is
written."""

import json
from pathlib import Path

import numpy as np
import pytest

from prefloop.config import LoopConfig, read_yaml
from prefloop.embedded.arithmetic import make_problems
from prefloop.embedded.tokenizer import build_tokenizer
from prefloop.errors import UserError
from prefloop.flows.loop import direct_caller, lookup_loop, run_loop
from prefloop.flows.training import label_with_reward_model
from prefloop.storage import ArtifactStore
from prefloop.tasks.common.ensembles import MemberStandardisation
from prefloop.tasks.importing.stage import import_model, import_table

ROOT = Path(__file__).resolve().parents[1]
SMOKE = read_yaml(ROOT / "configs/smoke.yaml")


def rm_config(**settings) -> LoopConfig:
    """configs/smoke.yaml shrunk to one round on 6 prompts (the embedded SFT model barely trained), as a file
    would give it, so the loop's defaults (win_judge) follow from what is set."""
    data = json.loads(json.dumps(SMOKE)) | {"name": "rm", "rounds": 1}
    data["sft"]["training"] |= {"max_steps": 4}
    data["sampling"] |= {"max_prompts": 6, "n": 4, "max_new_tokens": 16}
    data["evaluation"] |= {"max_prompts": 8, "max_new_tokens": 16, "samples_per_prompt": 2, "pass_k": [1, 2]}
    return LoopConfig.model_validate(data | settings)


def save_reward_model(out: Path, extra_tokens: tuple[str, ...] = ()) -> Path:
    """A reward model made elsewhere (untrained: its scores need only be finite): a one-label Llama sequence
    classifier with the embedded character tokenizer, plus ``extra_tokens`` (another vocabulary)."""
    import torch
    import transformers

    tokenizer = build_tokenizer()
    tokenizer.add_tokens(list(extra_tokens))
    shape = SMOKE["sft"]["model"]
    torch.manual_seed(0)
    model = transformers.LlamaForSequenceClassification(transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=shape["hidden_size"], num_hidden_layers=shape["num_hidden_layers"],
        num_attention_heads=shape["num_attention_heads"], num_key_value_heads=shape["num_attention_heads"],
        intermediate_size=shape["intermediate_size"], max_position_embeddings=shape["max_position_embeddings"],
        num_labels=1, pad_token_id=tokenizer.pad_token_id))
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def preference_file(path: Path, count: int = 16) -> Path:
    """A user's pairs with their own column names: the gold solution preferred to a wrong final answer."""
    rows = [{"q": p.prompt, "good": p.solution, "bad": p.solution.rsplit("A:", 1)[0] + f"A:{int(p.answer) + 1}"}
            for p in make_problems(count, seed=3)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def labelers(store: ArtifactStore, name: str) -> set[str]:
    return set(store.read_table(store.resolve(name)).column("labeler").to_pylist())


def metric_names(store: ArtifactStore, name: str) -> set[str]:
    return set(store.read_table(store.resolve(name)).column("metric").to_pylist())


@pytest.fixture(scope="module")
def imported_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("imported")
    store = ArtifactStore(tmp / "store")
    reward = import_model(save_reward_model(tmp / "my-rm"), store, name="mine/rm")
    config = rm_config(reward_model={"model": "mine/rm"})
    return store, reward, config, run_loop(config, store.uri)


@pytest.fixture(scope="module")
def ensemble_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ensemble")
    store = ArtifactStore(tmp / "store")
    config = rm_config(
        reward_model={"preferences": {"source": str(preference_file(tmp / "pairs.jsonl")),
                                      "map": {"prompt": "q", "chosen": "good", "rejected": "bad"}},
                      "members": 2, "aggregate": "min", "heldout_fraction": 0.25,
                      "training": {"max_steps": 3, "batch_size": 8}},
        filter={"max_ensemble_std": 1000.0})
    return store, config, run_loop(config, store.uri)


def test_an_imported_reward_model_labels_the_round_and_scores_the_evaluation(imported_run):
    store, reward, config, summary = imported_run
    assert store.resolve("rm/reward-model") == reward.ref
    labels = store.read_manifest(store.resolve("rm/round-1/labels"))
    assert labels.stage.startswith("label-rm") and labels.inputs["reward_model"] == reward.output
    assert labelers(store, "rm/round-1/labels") == {f"rm:{reward.ref.id}"}
    assert store.read_manifest(store.resolve("rm/round-1/preferences")).config["labeler"] == f"rm:{reward.ref.id}"
    # Round 0 is scored by the same reward model, so round 1's wins by reward are paired with it.
    assert store.read_manifest(store.resolve("rm/round-0/metrics")).inputs["reward_model"] == reward.output
    evaluated = store.read_manifest(store.resolve("rm/round-1/metrics"))
    assert evaluated.config["win_judge"] == "reward_model" and evaluated.inputs["reward_model"] == reward.output
    assert {"mean_reward", "win_rate_vs_previous", "win_rate_vs_sft", "accuracy"} <= \
        metric_names(store, "rm/round-1/metrics")
    # A finished run is a lookup: the same wiring, every stage found in the store.
    again = lookup_loop(config, store.uri)
    assert all(stage.cached for stage in again.stages)
    assert [s.output for s in again.stages] == [s.output for s in summary.stages]


def test_a_train_rm_ensemble_made_before_round_1_labels_filters_and_evaluates(ensemble_run):
    store, config, summary = ensemble_run
    reward = store.resolve("rm/reward-model")
    trained = store.read_manifest(reward)
    assert trained.stage.startswith("train-rm") and trained.metrics["ensemble_size"] == 2
    assert trained.inputs == {"preferences": str(store.resolve("rm/reward-preferences")),
                              "policy": str(store.resolve("rm/round-0/policy"))}
    members = {f"rm:{reward.id}/member-0", f"rm:{reward.id}/member-1"}
    aggregate = f"rm-ensemble:{reward.id}/min"
    assert labelers(store, "rm/round-1/labels") == members | {aggregate}
    # Construction ranks by the aggregate: every pair's scores are the aggregate's scores of its samples.
    labels = store.read_table(store.resolve("rm/round-1/labels")).to_pylist()
    aggregated = {row["target_id"]: row["score"] for row in labels if row["labeler"] == aggregate}
    pairs = store.read_table(store.resolve("rm/round-1/preferences")).to_pylist()
    assert pairs and all(pair["score_chosen"] == pytest.approx(aggregated[pair["chosen_sample_id"]])
                         and pair["score_rejected"] == pytest.approx(aggregated[pair["rejected_sample_id"]])
                         and pair["score_chosen"] > pair["score_rejected"] for pair in pairs)
    # The filter reads the members' labels: ensemble rules and the flip-rate estimate.
    kept = store.read_manifest(store.resolve("rm/round-1/preferences-filtered"))
    assert kept.inputs["ensemble_labels"] == str(store.resolve("rm/round-1/labels"))
    assert kept.metrics["ensemble_members"] == 2 and "estimated_flip_rate_input" in kept.metrics
    assert store.read_manifest(store.resolve("rm/round-1/metrics")).inputs["reward_model"] == str(reward)
    assert {"mean_reward", "win_rate_vs_previous"} <= metric_names(store, "rm/round-1/metrics")


HAND_REWARDS = np.array([[1.0, 3.0, 5.0],      # member 0: μ = 3, σ = 2  → z = −1, 0, 1
                         [10.0, 6.0, 14.0]])   # member 1: μ = 10, σ = 4 → z = 0, −1, 1
HAND_STATISTICS = MemberStandardisation((3.0, 10.0), (2.0, 4.0), "hand-made reference set", 3)


@pytest.mark.parametrize(("aggregate", "expected"), [
    ("mean", [-0.5, -0.5, 1.0]),                     # z̄
    ("min", [-1.0, -1.0, 1.0]),                      # min_i z_i
    ("uncertainty_weighted", [-0.625, -0.625, 1.0]),  # z̄ − 0.5·var_i z_i, var = 0.25, 0.25, 0
])
def test_ensemble_aggregates_on_hand_numbers_through_the_loops_labeling(ensemble_run, tmp_path, monkeypatch,
                                                                        aggregate, expected):
    """The loop setting → label-rm → the aggregate construction ranks by, with the members' rewards and their
    stored standardisation replaced by hand numbers (raw offsets 3 and 10 must not decide ``min``)."""
    from prefloop.tasks.training.recipes import reward_model as recipe

    store, _, _ = ensemble_run
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"q": "1+1", "a": a, "who": "me"}) + "\n" for a in ("A:1", "A:2", "A:3")))
    samples = import_table("samples", answers, store, {"prompt": "q", "completion": "a", "policy_name": "who"})
    monkeypatch.setattr(recipe, "score_with_members", lambda *args, **kwargs: HAND_REWARDS.copy())
    monkeypatch.setattr(MemberStandardisation, "read", classmethod(lambda cls, model_dir: HAND_STATISTICS))
    setting = rm_config(reward_model={"model": "rm/reward-model", "aggregate": aggregate}).reward_model
    scored = label_with_reward_model(direct_caller, str(store.resolve("rm/reward-model")), samples.output,
                                     setting.label_config(), store.uri, f"hand/{aggregate}")
    assert len(scored.members) == 2 and scored.ensemble_labels == scored.result.output
    table = store.read_table(scored.result.ref).to_pylist()
    order = {sid: i for i, sid in enumerate(store.read_table(samples.ref).column("sample_id").to_pylist())}
    combined = sorted((order[row["target_id"]], row["score"]) for row in table if row["labeler"] == scored.scorer)
    assert [score for _, score in combined] == pytest.approx(expected)


def test_the_data_only_flow_labels_with_the_same_reward_model_path(ensemble_run, tmp_path):
    """flows/data.py reuses the loop's labeling: label-rm members + aggregate, pairs by the aggregate, members to
    the filter."""
    from prefloop.flows.data import DataConfig, run_data

    store, _, _ = ensemble_run
    answers = tmp_path / "completions.jsonl"
    answers.write_text("".join(json.dumps({"q": "2+2=?\n", "a": f"2+2=4\nA:{a}", "who": who}) + "\n"
                               for a, who in (("4", "alpha"), ("5", "beta"), ("22", "gamma"))))
    samples = import_table("samples", answers, store, {"prompt": "q", "completion": "a", "policy_name": "who"})
    config = DataConfig(name="data-rm", reward_model={"model": "rm/reward-model", "aggregate": "uncertainty_weighted"},
                        filter={"max_ensemble_std": 1000.0})
    summary = run_data(config, store.uri, samples=samples.output)
    reward = store.resolve("rm/reward-model")
    assert labelers(store, "data-rm/labels") == {f"rm:{reward.id}/member-0", f"rm:{reward.id}/member-1",
                                                 f"rm-ensemble:{reward.id}/mean-0.5var"}
    assert store.read_manifest(store.resolve("data-rm/preferences")).config["labeler"] == \
        f"rm-ensemble:{reward.id}/mean-0.5var"
    assert store.read_manifest(store.resolve(summary.preferences)).inputs["ensemble_labels"] == \
        str(store.resolve("data-rm/labels"))
    with pytest.raises(ValueError, match="reward model you have"):
        DataConfig(reward_model={"preferences": "mine/pairs"})


def test_a_reward_model_with_another_vocabulary_is_refused_before_anything_is_written(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    other = save_reward_model(tmp_path / "other-rm", extra_tokens=("<tool>",))
    with pytest.raises(UserError, match=r"another vocabulary.*<tool>.*preferences: REF"):
        run_loop(rm_config(reward_model={"model": str(other)}), store.uri)
    assert store.list() == [] and not list(store.refs())
    # The same model given as a ref in the store: refused too, and the run adds nothing to the store.
    imported = import_model(other, store, name="their/rm")
    with pytest.raises(UserError, match="another vocabulary"):
        run_loop(rm_config(reward_model={"model": "their/rm"}), store.uri)
    assert store.list() == [imported.ref] and set(store.refs()) == {"their/rm"}


def test_reward_model_settings_are_checked_with_the_fix():
    with pytest.raises(ValueError, match="exactly one source"):
        rm_config(reward_model={"members": 2})
    with pytest.raises(ValueError, match="members.*model is given"):
        rm_config(reward_model={"model": "mine/rm", "members": 3})
    with pytest.raises(ValueError, match="loop has no reward model"):
        rm_config(label={"labeler": "reward_model"})
    with pytest.raises(ValueError, match="max_ensemble_std.*members to 2"):
        rm_config(reward_model={"preferences": "mine/pairs"}, filter={"max_ensemble_std": 1.0})
    with pytest.raises(ValueError, match="aggregate"):
        rm_config(reward_model={"model": "mine/rm", "aggregate": "median"})
    # Without a reward model the loop labels with the verifier, as before.
    assert rm_config().evaluation.win_judge == "verifier"
