"""benchmarks/trainer_vs_trl.py's demo-pairs mode at tiny size: which pairs and model ``--pairs-from``
finds in a store (a round's training input and starting policy, exported and read back), its token
counts on hand-made pairs, its check that TRL trains on prefloop's tokens, and one tiny run of the
whole comparison. No timing is asserted (the benchmark prints ratios; a test cannot judge them)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from helpers import arithmetic_pairs, save_tiny_policy

from prefloop.datasets_spec.exporters import export_artifact
from prefloop.embedded.tokenizer import build_tokenizer
from prefloop.errors import UserError
from prefloop.tasks.importing.stage import import_model, import_table
from prefloop.tasks.registry import run_stage
from prefloop.tasks.training.recipes.dpo import prepare_pairs

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "trainer_vs_trl.py"
TINY_MODEL = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
              "max_position_embeddings": 64}


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("trainer_vs_trl_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def tiny_round(tmp_path_factory):
    """A store holding one round's training as the loop leaves it: a starting policy (imported), its
    preferences (imported) and the train stage's output, named by a round's ref."""
    from prefloop.embedded.model import TinyLlamaConfig
    from prefloop.storage import ArtifactStore

    root = tmp_path_factory.mktemp("bench")
    store = ArtifactStore(root / "store")
    start = import_model(save_tiny_policy(root / "policy", TinyLlamaConfig(**TINY_MODEL)), store)
    source = root / "pairs.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in arithmetic_pairs(12).to_pylist()))
    preferences = import_table("preferences", source, store)
    trained = run_stage("train", {"preferences": preferences.output, "policy": start.output, "reference": start.output},
                        {"training": {"max_steps": 1, "batch_size": 4}}, store)
    store.set_ref("tiny/round-1/policy", trained.ref)
    return store, start, preferences, trained


def _rows(store, ref):
    table = store.read_table(ref)
    return list(zip(*(table.column(name).to_pylist() for name in ("prompt", "chosen", "rejected")), strict=True))


def test_a_rounds_policy_ref_gives_its_training_pairs_and_starting_policy(bench, tiny_round, tmp_path):
    store, sft, preferences, _ = tiny_round
    source = bench.demo_source("tiny/round-1/policy", store, tmp_path)
    assert source.parquet.name == "train.parquet" and source.parquet.is_relative_to(tmp_path)
    assert bench.read_pairs(source.parquet) == _rows(store, preferences.ref)
    assert source.model_dir == store.local_files(sft.ref)  # the policy training started from, not its output
    assert str(sft.ref) in source.model_description and str(preferences.ref) in source.description


def test_an_export_folder_its_file_or_a_preferences_ref_give_the_same_pairs(bench, tiny_round, tmp_path):
    store, _, preferences, _ = tiny_round
    exported = export_artifact(store, preferences.ref, tmp_path / "export", "trl")
    expected = _rows(store, preferences.ref)
    for given in (str(tmp_path / "export"), str(exported), str(preferences.ref)):
        source = bench.demo_source(given, store, tmp_path / f"scratch-{len(given)}")
        assert bench.read_pairs(source.parquet) == expected
        assert source.model_dir is None  # no round named: the model comes from --model or the tiny Llama


def test_a_model_not_made_by_train_is_refused(bench, tiny_round, tmp_path):
    store, sft, _, _ = tiny_round
    with pytest.raises(UserError, match="not by 'train'"):  # an imported model: no training pairs
        bench.demo_source(str(sft.ref), store, tmp_path)
    (tmp_path / "other").mkdir()
    with pytest.raises(UserError, match="not a prefloop export"):
        bench.demo_source(str(tmp_path / "other"), store, tmp_path)


def test_token_facts_on_hand_made_pairs(bench):
    # Character tokenizer: the prompt is bos + 6 characters = 7 tokens, a completion its characters + eos.
    # Pair A: completions of 9 + 1 tokens sharing "1+2=" (4); its row feeds 16 + 16 inputs, 11 shared: 21.
    # Pair B: chosen 9 + 1, rejected 10 + 1, sharing all 9 characters; inputs 16 + 17, 16 shared: 17.
    pairs = [("1+2=?\n", "1+2=3\nA:3", "1+2=4\nA:4"), ("1+2=?\n", "1+2=3\nA:3", "1+2=3\nA:33")]
    tokenizer = build_tokenizer()
    prepared = prepare_pairs(tokenizer, pairs)
    facts = bench.token_facts(prepared, prepared, batch_size=2, batches=3)
    assert (facts.prompt, facts.chosen, facts.rejected, facts.shared, facts.cut) == (7, 10, 10.5, 6.5, 0)
    assert facts.trl_tokens == 2 * 2 * 18  # 4 rows, each padded to the longest sequence (B's rejected: 18)
    assert (facts.prefloop_real, facts.prefloop_tokens) == (21 + 17, 2 * 21)  # one group, padded to A's row
    cut = bench.token_facts(prepare_pairs(tokenizer, pairs, 17), prepared, batch_size=2, batches=1)
    assert cut.cut == 1  # only B's rejected (18 tokens) is longer than 17


def test_differing_pairs_compares_trl_rows_cut_as_its_collator_cuts(bench):
    tokenizer = build_tokenizer()
    pairs = [("1+2=?\n", "1+2=3\nA:3", "1+2=4\nA:4")]
    prepared = prepare_pairs(tokenizer, pairs, 12)
    chosen, rejected = prepare_pairs(tokenizer, pairs).chosen[0], prepare_pairs(tokenizer, pairs).rejected[0]
    prompt = chosen.token_ids[: chosen.prompt_length]
    row = {"prompt_ids": prompt, "chosen_ids": chosen.token_ids[len(prompt):],
           "rejected_ids": rejected.token_ids[len(prompt):]}
    assert bench.differing_pairs([row], prepared, 12) == 0
    assert bench.differing_pairs([row | {"rejected_ids": row["rejected_ids"][:-1] + [0]}], prepared, 12) == 0  # cut off
    assert bench.differing_pairs([row | {"rejected_ids": [0] + row["rejected_ids"][1:]}], prepared, 12) == 1


def test_a_tiny_comparison_on_a_rounds_pairs(bench, tiny_round, monkeypatch, capsys):
    store, sft, _, _ = tiny_round
    monkeypatch.setattr("sys.argv", ["trainer_vs_trl.py", "--pairs-from", "tiny/round-1/policy", "--store", store.root,
                                     "--synthetic", "--batch-size", "4", "--max-length", "48", "--steps", "3",
                                     "--warmup", "1", "--repeats", "1"])
    bench.main()
    out = capsys.readouterr().out
    assert f"model: {sft.ref}" in out
    assert "demo pairs: preferences/" in out and "12 pairs" in out and "synthetic" not in out
    assert "tokens: TRL's are prefloop's on 12 of 12 pairs" in out
    assert "ratio prefloop / trl precompute_ref: best" in out
    assert "too few for the goal" in out
    headline = out.split("goal: prefloop >= 2.0x")[1].splitlines()[1]
    assert "demo pairs" in headline and ("met" in headline)
