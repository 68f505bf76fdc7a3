"""The loop started from what a user brings: a model directory or ref as the starting policy (optionally
SFT'd on demonstrations), prompts imported with a column map and split by hash — and the bad inputs
that must stop the loop before it writes anything."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import save_tiny_policy

from prefloop.config import ConfigFileError, LoopConfig, load_loop_config
from prefloop.embedded.arithmetic import make_problems
from prefloop.errors import UserError
from prefloop.flows.loop import run_loop
from prefloop.storage import ArtifactStore
from prefloop.tasks.common.models import UnsafeModelError
from prefloop.tasks.importing.sources import SourceImportError
from prefloop.tasks.importing.stage import import_model, import_table

ROOT = Path(__file__).resolve().parents[1]
HELDOUT = 8


@pytest.fixture(scope="module")
def smoke():
    return load_loop_config(ROOT / "configs/smoke.yaml")


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory, smoke):
    """A model made elsewhere, saved with save_pretrained (untrained: what it answers does not matter here)."""
    return save_tiny_policy(tmp_path_factory.mktemp("mine") / "my-policy", smoke.sft.model)


@pytest.fixture(scope="module")
def prompts_jsonl(tmp_path_factory):
    """A user's prompt file with its own column names: question, and the answer nested under meta.final."""
    path = tmp_path_factory.mktemp("data") / "problems.jsonl"
    rows = [{"question": p.prompt, "meta": {"final": p.answer}, "difficulty": "easy"}
            for p in make_problems(32, seed=11)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def own_config(smoke, **settings) -> LoopConfig:
    """The smoke loop shrunk further, with the user's starting points in ``settings``."""
    data = smoke.model_dump() | {"name": "own", "rounds": 2}
    data["sampling"] |= {"max_prompts": 6, "n": 4, "max_new_tokens": 20}
    data["evaluation"] |= {"max_prompts": HELDOUT, "max_new_tokens": 20}
    data["sft"]["training"] |= {"max_steps": 4}
    return LoopConfig.model_validate(data | settings)


def mapped_source(path, **extra) -> dict:
    return {"source": str(path), "map": {"prompt": "question", "reference_answer": "meta.final"}} | extra


def written(store: ArtifactStore) -> list:
    return store.list() + list(store.refs())


def test_loop_from_a_model_directory_and_mapped_prompts(tmp_path, smoke, policy_dir, prompts_jsonl):
    store = ArtifactStore(tmp_path / "store")
    config = own_config(smoke, policy=str(policy_dir), prompt_source=mapped_source(prompts_jsonl),
                        prompt_split={"heldout_size": HELDOUT})
    summary = run_loop(config, store.uri)

    start = store.resolve("own/starting-policy")
    assert store.read_manifest(start).stage.startswith("import-model")  # imported on the fly, id = its content
    assert import_model(policy_dir, store).output == str(start)
    assert store.resolve("own/round-0/policy") == start and summary.rounds[0].policy == str(start)
    assert not [r for r in store.list() if store.read_manifest(r).stage.startswith("sft")], "no SFT without demonstrations"
    assert "own/sft-prompts" not in store.refs()
    # Round 0's metrics are the starting policy's, and round 1 samples from it.
    assert store.read_manifest(store.resolve("own/round-0/metrics")).inputs["policy"] == str(start)
    assert store.read_manifest(store.resolve("own/round-1/samples")).inputs["policy"] == str(start)
    # reference_policy fixed: the starting policy is every round's reference (train's, and the KL's).
    assert store.read_manifest(store.resolve("own/round-2/metrics")).inputs["reference"] == str(start)

    # The user's prompts, mapped from their own column names, split by hash into 24 train and 8 held out.
    prompts = store.read_table(store.resolve("own/prompts"))
    questions = [json.loads(line)["question"] for line in prompts_jsonl.read_text().splitlines()]
    assert sorted(prompts.column("prompt").to_pylist()) == sorted(questions)
    assert all(prompts.column("reference_answer").to_pylist())
    splits = dict(zip(prompts.column("prompt_id").to_pylist(), prompts.column("split").to_pylist(), strict=True))
    heldout = {pid for pid, split in splits.items() if split == "heldout"}
    assert len(heldout) == HELDOUT
    # No round ever samples a held-out prompt; each round takes a fresh slice of the training prompts.
    sampled = [set(store.read_table(store.resolve(f"own/round-{k}/samples")).column("prompt_id").to_pylist())
               for k in (1, 2)]
    assert all(block and not block & heldout for block in sampled)
    assert not sampled[0] & sampled[1]
    evaluated = store.read_table(store.resolve("own/round-2/metrics"), "eval_results")
    assert set(evaluated.column("prompt_id").to_pylist()) <= heldout


def test_policy_ref_and_the_policy_override(tmp_path, smoke, policy_dir, prompts_jsonl):
    store = ArtifactStore(tmp_path / "store")
    mine = import_model(policy_dir, store, name="mine/policy")
    config_file = tmp_path / "loop.yaml"
    config_file.write_text(yaml.safe_dump({"name": "own", "rounds": 0, "policy": "somebody/else",
                                           "prompt_source": mapped_source(prompts_jsonl),
                                           "prompt_split": {"heldout_fraction": 0.25},
                                           "evaluation": {"max_prompts": 4, "max_new_tokens": 8}}))
    assert load_loop_config(config_file).policy == "somebody/else"
    config = load_loop_config(config_file, policy="mine/policy")  # what 'prefloop run --policy REF' passes
    assert config.policy == "mine/policy"
    summary = run_loop(config, store.uri)
    assert summary.rounds[0].policy == mine.output
    assert store.resolve("own/round-0/policy") == mine.ref == store.resolve("own/starting-policy")
    assert store.read_manifest(store.resolve("own/round-0/metrics")).inputs["policy"] == mine.output


def test_sft_of_the_starting_policy_on_demonstrations(tmp_path, smoke, policy_dir):
    store = ArtifactStore(tmp_path / "store")
    demos = tmp_path / "demos.jsonl"
    demos.write_text("".join(json.dumps({"q": p.prompt, "good": p.solution, "bad": p.solution + "0"}) + "\n"
                             for p in make_problems(12, seed=5)), encoding="utf-8")
    shown = import_table("preferences", demos, store, {"prompt": "q", "chosen": "good", "rejected": "bad"},
                         name="mine/demos")
    config = own_config(smoke, rounds=0, policy=str(policy_dir), demonstrations="mine/demos")
    summary = run_loop(config, store.uri)
    start = store.resolve("own/starting-policy")
    warm = store.read_manifest(store.resolve("own/round-0/policy"))
    assert warm.stage.startswith("sft") and warm.inputs == {"policy": str(start), "demonstrations": shown.output}
    assert warm.metrics["examples"] == 12 and warm.metrics["parameters"] > 0
    assert summary.rounds[0].policy == str(warm.ref) != str(start)
    assert store.read_manifest(store.resolve("own/round-0/metrics")).inputs["policy"] == str(warm.ref)


def _copy(source: Path, target: Path, skip: tuple[str, ...] = ()) -> Path:
    target.mkdir()
    for path in source.iterdir():
        if path.name not in skip:
            (target / path.name).write_bytes(path.read_bytes())
    return target


def test_unusable_policy_directories_stop_the_loop_before_anything_is_written(tmp_path, smoke, policy_dir,
                                                                              prompts_jsonl):
    no_tokenizer = _copy(policy_dir, tmp_path / "no-tokenizer",
                         skip=("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"))
    pickled = _copy(policy_dir, tmp_path / "pickled", skip=("model.safetensors",))
    from safetensors.torch import load_file
    torch.save(load_file(policy_dir / "model.safetensors"), pickled / "pytorch_model.bin")
    custom = _copy(policy_dir, tmp_path / "custom")
    settings = json.loads((custom / "config.json").read_text())
    (custom / "config.json").write_text(json.dumps(settings | {"auto_map": {"AutoModelForCausalLM": "modeling.Mine"}}))
    cases = [(no_tokenizer, "tokenizer.save_pretrained"), (pickled, "safe_serialization=True"),
             (custom, "never enables trust_remote_code")]
    for directory, fix in cases:
        store = ArtifactStore(tmp_path / f"store-{directory.name}")
        config = own_config(smoke, policy=str(directory), prompt_source=mapped_source(prompts_jsonl),
                            prompt_split={"heldout_size": HELDOUT})
        with pytest.raises(UnsafeModelError, match=fix.replace(".", r"\.")):
            run_loop(config, store.uri)
        assert not written(store), f"{directory.name}: the loop wrote before refusing the policy"
    with pytest.raises(UserError, match="save_pretrained"):
        run_loop(own_config(smoke, policy=str(tmp_path / "nowhere")), str(tmp_path / "store-nowhere"))


def test_a_mapped_column_missing_from_the_prompts_source_writes_nothing(tmp_path, smoke, policy_dir, prompts_jsonl):
    store = ArtifactStore(tmp_path / "store")
    source = {"source": str(prompts_jsonl), "map": {"prompt": "problem", "reference_answer": "meta.final"}}
    config = own_config(smoke, policy=str(policy_dir), prompt_source=source, prompt_split={"heldout_size": HELDOUT})
    with pytest.raises(SourceImportError, match="prompt=problem") as refused:
        run_loop(config, store.uri)
    assert "question" in str(refused.value)  # the fields it does have, to pick from
    assert not written(store)


def test_user_prompts_need_a_heldout_split_and_verifier_answers(tmp_path, smoke, policy_dir, prompts_jsonl):
    store = ArtifactStore(tmp_path / "store")
    unsplit = own_config(smoke, policy=str(policy_dir), prompt_source=mapped_source(prompts_jsonl))
    with pytest.raises(UserError, match="no 'heldout' prompts.*prompt_split"):
        run_loop(unsplit, store.uri)
    no_answers = own_config(smoke, policy=str(policy_dir), prompt_split={"heldout_size": HELDOUT},
                            prompt_source={"source": str(prompts_jsonl), "map": {"prompt": "question"}})
    with pytest.raises(UserError, match="32 of the 32 prompts .* no reference answer.*reference_answer"):
        run_loop(no_answers, store.uri)
    assert not [r for r in store.list() if r.kind == "model"], "nothing is imported after the prompts are refused"


def test_config_refuses_starting_points_that_cannot_work(smoke):
    with pytest.raises(ValueError, match="set policy too"):
        own_config(smoke, demonstrations="mine/demos")
    with pytest.raises(ValueError, match="prompt_split splits a prompt_source"):
        own_config(smoke, prompt_split={"heldout_size": 4})
    data = smoke.model_dump()
    data["sampling"]["split"] = "heldout"
    with pytest.raises(ValueError, match="would be trained on"):
        LoopConfig.model_validate(data)
    with pytest.raises(ConfigFileError, match="prompt_source"):
        load_loop_config(ROOT / "configs/smoke.yaml", prompt_source=3)
    example = load_loop_config(ROOT / "configs/own_model_smoke.yaml")
    assert example.policy and example.prompt_source.map["prompt"] == "question" and example.prompt_split
