"""Your own model: a local save_pretrained directory imported as a model artifact and used by a round
of the loop; pickled weights and custom model code are refused."""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from prefloop.cli import app
from prefloop.config import load_loop_config
from prefloop.embedded.model import TinyLlamaConfig, build_model
from prefloop.embedded.tokenizer import build_tokenizer
from prefloop.flows.loop import run_round
from prefloop.storage import ArtifactStore
from prefloop.tasks.common.models import UnsafeModelError, check_model_dir
from prefloop.tasks.importing.stage import import_model
from prefloop.tasks.registry import run_stage
from prefloop.tasks.training.artifacts import load_policy
from prefloop.tasks.training.configs import SFTConfig
from prefloop.tasks.training.recipes.sft import train_sft

ROOT = Path(__file__).resolve().parents[1]
CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"


@pytest.fixture(scope="module")
def smoke_config():
    return load_loop_config(ROOT / "configs/smoke.yaml", name="own")


@pytest.fixture(scope="module")
def own_model_dir(tmp_path_factory, smoke_config):
    """A model trained elsewhere: a tiny Llama fine-tuned briefly on the task, saved with save_pretrained."""
    store = ArtifactStore(tmp_path_factory.mktemp("train") / "store")
    made = run_stage("prompts", {}, smoke_config.sft_prompts, store)
    table = store.read_table(made.ref)
    examples = list(zip(table.column("prompt").to_pylist(), table.column("reference_solution").to_pylist(), strict=True))
    tokenizer = build_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    model = build_model(TinyLlamaConfig(**smoke_config.sft.model.model_dump()), len(tokenizer), 0, tokenizer)
    train_sft(model, tokenizer, examples, SFTConfig(**smoke_config.sft.training.model_dump()))
    out = tmp_path_factory.mktemp("mine") / "my-policy"
    model.save_pretrained(out)  # safetensors by default
    tokenizer.save_pretrained(out)
    torch.save({"step": 120}, out / "training_args.bin")  # a pickle beside the weights is left out
    return out


def test_imported_model_runs_a_round_of_the_loop(tmp_path, own_model_dir, smoke_config):
    store = ArtifactStore(tmp_path / "store")
    model = import_model(own_model_dir, store, name="own/round-0/policy")
    manifest = store.verify(model.ref)  # checksummed like every artifact
    files = {f.path for f in manifest.files}
    assert {"files/model.safetensors", "files/config.json", "files/tokenizer.json"} <= files
    assert "files/training_args.bin" not in files and model.metrics["skipped_files"] == ["training_args.bin"]
    assert model.metrics["has_chat_template"] is True
    assert import_model(own_model_dir, store).output == model.output  # same directory, same artifact

    task_prompts = run_stage("prompts", {}, smoke_config.prompts, store, "own/prompts")
    base = run_stage("evaluate", {"policy": model.output, "prompts": task_prompts.output, "reference": model.output},
                          {**smoke_config.evaluation.model_dump(), "round": 0}, store, "own/round-0/metrics")
    summary = run_round(smoke_config, 1, model.output, model.output, task_prompts.output, base.output, store.uri,
                        previous_metrics=base.output)
    by_stage = {s.stage: s for s in summary.stages}
    assert store.read_manifest(by_stage["sample"].ref).inputs["policy"] == model.output
    assert by_stage["construct"].rows > 0, "the fine-tuned model should give some correct and some wrong answers"
    trained = store.read_manifest(by_stage["train"].ref)
    assert trained.inputs["policy"] == model.output and trained.inputs["reference"] == model.output
    assert summary.policy == by_stage["train"].output != model.output
    assert store.read_manifest(store.resolve("own/round-1/metrics")).inputs["baseline"] == base.output


def test_pickled_weights_are_refused_with_how_to_convert(tmp_path, own_model_dir):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (pickled / name).write_bytes((own_model_dir / name).read_bytes())
    from safetensors.torch import load_file

    torch.save(load_file(own_model_dir / "model.safetensors"), pickled / "pytorch_model.bin")
    with pytest.raises(UnsafeModelError, match="pytorch_model.bin") as refused:
        import_model(pickled, ArtifactStore(tmp_path / "store"))
    message = str(refused.value)
    assert "safe_serialization=True" in message and "save_pretrained" in message and "trust" in message
    with pytest.raises(UnsafeModelError, match="pickle"):
        load_policy(pickled)  # loading a model directory inside a stage refuses it too
    result = CliRunner().invoke(app, ["import", "model", str(pickled), "--store", str(tmp_path / "store")])
    assert result.exit_code == 2 and "safe_serialization=True" in result.output
    assert not ArtifactStore(tmp_path / "store").list()


def test_custom_model_code_is_never_run(tmp_path, own_model_dir):
    custom = tmp_path / "custom"
    custom.mkdir()
    for path in own_model_dir.iterdir():
        (custom / path.name).write_bytes(path.read_bytes())
    config = json.loads((custom / "config.json").read_text())
    (custom / "config.json").write_text(json.dumps(config | {"auto_map": {"AutoModelForCausalLM": "modeling.Mine"}}))
    with pytest.raises(UnsafeModelError, match="never enables trust_remote_code"):
        check_model_dir(custom)
    (custom / "config.json").write_text(json.dumps(config | {"model_type": "t5"}))
    with pytest.raises(UnsafeModelError, match="no causal-LM class"):
        check_model_dir(custom)
    with pytest.raises(UnsafeModelError, match="no config.json"):
        check_model_dir(tmp_path)


def test_cli_imports_a_model(tmp_path, own_model_dir):
    result = CliRunner().invoke(app, ["import", "model", str(own_model_dir), "--name", "mine/policy",
                                      "--store", str(tmp_path / "store")])
    assert result.exit_code == 0, result.output
    assert "model.safetensors" in result.output and "training_args.bin" in result.output
    assert ArtifactStore(tmp_path / "store").resolve("mine/policy").kind == "model"


def test_a_tokenizer_without_pad_token_gets_eos_as_pad(tmp_path, own_model_dir):
    from transformers import AutoTokenizer

    no_pad = tmp_path / "no-pad"
    no_pad.mkdir()
    for path in own_model_dir.iterdir():
        (no_pad / path.name).write_bytes(path.read_bytes())
    tokenizer = AutoTokenizer.from_pretrained(no_pad)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(no_pad)
    store = ArtifactStore(tmp_path / "store")
    model = import_model(no_pad, store)
    assert model.metrics["pad_token_set_to_eos"] is True
    loaded, imported_tokenizer = load_policy(store.local_files(model.ref))
    assert imported_tokenizer.pad_token_id == imported_tokenizer.eos_token_id
    assert AutoTokenizer.from_pretrained(no_pad).pad_token is None  # the source is left as it was
