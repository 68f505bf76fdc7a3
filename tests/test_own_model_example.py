"""The "your own model" example: the builder writes what a user would bring (a save_pretrained chat model,
prompts and reward-model pairs with their own column names), deterministically and idempotently; the
files import as a user's do; configs/own_model.yaml loads, and a shrunk round of it runs from them."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from prefloop.cli import app
from prefloop.config import LoopConfig, load_loop_config
from prefloop.embedded.own_model import (
    PROBLEMS_MAP,
    RM_PAIRS_MAP,
    TINY,
    build_own_model_example,
)
from prefloop.errors import UserError
from prefloop.flows.loop import run_loop
from prefloop.storage import ArtifactStore
from prefloop.tasks.importing.stage import import_model, import_table

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    steps = []
    example = build_own_model_example(tmp_path_factory.mktemp("own") / "example", TINY,
                                      progress=lambda done, total: steps.append((done, total)))
    assert steps[-1] == (TINY.sft.max_steps, TINY.sft.max_steps)  # the progress bar is fed every SFT step
    return example


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_the_build_imports_as_a_users_files(tmp_path, built):
    assert not built.reused and built.summary["sft_steps"] == TINY.sft.max_steps
    store = ArtifactStore(tmp_path / "store")
    model = import_model(built.policy, store, name="mine/policy")
    files = {f.path for f in store.verify(model.ref).files}
    assert {"files/model.safetensors", "files/config.json", "files/tokenizer.json"} <= files
    assert model.metrics["has_chat_template"] is True
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(built.policy)
    assert [t for t in tokenizer.tokenize("12+345=357") if t.isdigit()] == list("12345357")  # one token a digit

    problems = _rows(built.problems)
    assert len(problems) == TINY.n_prompts and set(problems[0]) == {"question_text", "meta", "source"}
    prompts = store.read_table(import_table("prompts", built.problems, store, PROBLEMS_MAP).ref)
    assert prompts.column("prompt").to_pylist() == [row["question_text"] for row in problems]
    assert prompts.column("reference_answer").to_pylist() == [row["meta"]["final_answer"] for row in problems]

    pairs = _rows(built.rm_pairs)
    assert len(pairs) == TINY.n_rm_pairs and set(pairs[0]) == {"context", "better", "worse"}
    table = store.read_table(import_table("preferences", built.rm_pairs, store, RM_PAIRS_MAP).ref)
    assert table.num_rows == TINY.n_rm_pairs
    assert table.column("chosen").to_pylist() == [row["better"] for row in pairs] != table.column("rejected").to_pylist()
    # No prompt the loop samples or evaluates is one the reward model was trained on.
    assert not {row["question_text"] for row in problems} & {row["context"]["question"] for row in pairs}


def test_same_seed_same_files_and_a_rerun_reuses_them(tmp_path, built):
    again = build_own_model_example(tmp_path / "again", TINY)
    for name in ("problems.jsonl", "rm_pairs.jsonl", "policy/model.safetensors", "policy/tokenizer.json"):
        assert (again.out / name).read_bytes() == (built.out / name).read_bytes(), name
    other = build_own_model_example(tmp_path / "other", TINY.model_copy(update={"seed": 1}))
    assert other.problems.read_bytes() != built.problems.read_bytes()

    written = (again.policy / "model.safetensors").stat().st_mtime_ns
    reused = build_own_model_example(again.out, TINY)
    assert reused.reused and reused.summary == again.summary
    assert (again.policy / "model.safetensors").stat().st_mtime_ns == written  # nothing rewritten
    with pytest.raises(UserError, match="other settings"):
        build_own_model_example(again.out, TINY.model_copy(update={"n_prompts": 40}))
    rebuilt = build_own_model_example(again.out, TINY.model_copy(update={"n_prompts": 40}), force=True)
    assert not rebuilt.reused and len(_rows(rebuilt.problems)) == 40


def test_a_directory_with_foreign_files_is_not_overwritten(tmp_path):
    (tmp_path / "problems.jsonl").write_text("mine\n")
    with pytest.raises(UserError, match="--force"):
        build_own_model_example(tmp_path, TINY)
    assert (tmp_path / "problems.jsonl").read_text() == "mine\n"


def test_cli_builds_the_example(tmp_path):
    result = CliRunner().invoke(app, ["example", "own-model", str(tmp_path / "ex"), "--tiny"])
    assert result.exit_code == 0, result.output
    assert "problems.jsonl" in result.output and "rm_pairs.jsonl" in result.output and "prefloop import" in result.output
    assert (tmp_path / "ex/policy/model.safetensors").exists() and (tmp_path / "ex/example.json").exists()
    rerun = CliRunner().invoke(app, ["example", "own-model", str(tmp_path / "ex"), "--tiny"])
    assert rerun.exit_code == 0 and "reusing" in rerun.output


@pytest.mark.parametrize("name", ["own_model", "own_model_verifier"])
def test_the_configs_load(name):
    config = load_loop_config(ROOT / f"configs/{name}.yaml")
    assert config.rounds >= 2 and config.reference_policy == "fixed" and config.prompt_split.heldout_size >= 500
    assert config.evaluation.task == "gsm8k" and config.sampling.new_prompts_each_round
    if name == "own_model":
        assert config.reward_model.members >= 2 and config.reward_model.preferences.map == RM_PAIRS_MAP
        assert config.evaluation.win_judge == "reward_model"
    else:
        assert config.reward_model is None and config.label.labeler == "verifier"
    assert config.prompt_source.map == PROBLEMS_MAP


def shrunk(built, name: str = "own_model", **changes) -> LoopConfig:
    """configs/NAME.yaml pointed at ``built`` and cut to one small round."""
    data = load_loop_config(ROOT / f"configs/{name}.yaml", rounds=1, policy=str(built.policy)).model_dump()
    data["prompt_source"]["source"] = str(built.problems)
    data["prompt_split"] = {"heldout_size": 8}
    data["sampling"] |= {"max_prompts": 6, "n": 4, "max_new_tokens": 32}
    data["evaluation"] |= {"max_prompts": 8, "max_new_tokens": 32, "samples_per_prompt": 2, "sampled_prompts": 4,
                           "pass_k": [1, 2]}
    if data.get("reward_model"):
        data["reward_model"]["preferences"]["source"] = str(built.rm_pairs)
        data["reward_model"]["training"] |= {"max_steps": 2, "batch_size": 8}
    return LoopConfig.model_validate(data | changes)


def test_a_shrunk_round_of_the_config_runs_from_the_build(tmp_path, built):
    store = ArtifactStore(tmp_path / "store")
    summary = run_loop(shrunk(built), store.uri)
    assert len(summary.rounds) == 2  # round 0 (the starting policy) and round 1
    start = store.resolve("own-model/starting-policy")
    assert store.read_manifest(start).stage.startswith("import-model")
    assert store.read_manifest(store.resolve("own-model/round-1/samples")).inputs["policy"] == str(start)
    assert store.read_manifest(store.resolve("own-model/reward-model")).metrics["ensemble_size"] == 2
    labels = store.read_manifest(store.resolve("own-model/round-1/labels"))
    assert labels.stage.startswith("label-rm")
    metrics = store.read_manifest(store.resolve("own-model/round-1/metrics")).metrics
    assert "accuracy" in metrics and "mean_reward" in metrics, sorted(metrics)
    # Pairs ranked by the reward model were built and trained on: round 1's policy is a new model.
    assert store.read_manifest(store.resolve("own-model/round-1/preferences-filtered")).metrics["pairs_kept"] > 0
    assert summary.rounds[1].policy != str(start)


def test_rm_pairs_prefer_a_correct_sampled_answer_and_fill_in_the_missing_side():
    from prefloop.backends.base import Completion
    from prefloop.embedded.own_model import rm_pair_rows
    from prefloop.embedded.word_problems import make_problems, verify

    first, second, third = make_problems(3, seed=0)

    def answers(*texts, reason="stop"):
        return [Completion(text, 1, 0.0, reason) for text in texts]

    wrong = f"1+1=2\n#### {int(first.answer) + 1}"
    rows = rm_pair_rows([first, second, third], seed=0, sampled=[
        answers(wrong, f"#### {first.answer}"),            # one right, one wrong: both sampled
        answers(f"#### {second.answer}"),                  # all right: the worse is made up
        answers(f"#### {third.answer}", reason="length")])  # cut off: neither side counts
    assert rows[0]["better"] == f"#### {first.answer}" and rows[0]["worse"] == wrong
    assert rows[1]["better"] == f"#### {second.answer}" and not verify(rows[1]["worse"], second.answer)
    assert rows[2]["better"] == third.solution and not verify(rows[2]["worse"], third.answer)
