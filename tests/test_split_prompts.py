"""Stage ``split-prompts``: a held-out split by prompt hash that ignores row order and is stable as
prompts are added; bad settings are refused before anything is written."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from prefloop.cli import app
from prefloop.datasets_spec import PROMPTS
from prefloop.stage import StageInputError
from prefloop.tasks.registry import run_stage
from prefloop.tasks.split_prompts import hash_position


def put_prompts(store, ids: list[str], split: str = "train"):
    table = pa.table({"prompt_id": ids, "prompt": [f"question {i}" for i in ids], "reference_answer": ids,
                      "split": [split] * len(ids)})
    table = table.append_column("reference_solution", pa.array([None] * len(ids), pa.string()))
    table = table.append_column("task", pa.array(["t"] * len(ids), pa.string()))
    table = table.append_column("source", pa.array(["test"] * len(ids), pa.string()))
    table = table.select(PROMPTS.column_names).cast(PROMPTS.schema)
    with store.writer("prompts", hashlib.sha256(",".join(ids).encode()).hexdigest()[:24]) as writer:
        writer.write_table(table, "data", PROMPTS.schema_id, PROMPTS.version)
        return writer.commit(stage="test", stage_version="1", config={}, seed=None, inputs={}, metrics={},
                             validation={}, drops={})


def splits_of(store, result) -> dict[str, str]:
    rows = store.read_table(getattr(result, "ref", result)).to_pylist()
    return {row["prompt_id"]: row["split"] for row in rows}


def test_hash_position_is_the_sha256_of_seed_and_id() -> None:
    # content_id hashes each part with an 8-byte length prefix; the first 16 hex digits, over 16^16.
    digest = hashlib.sha256()
    for part in ("split", "0", "p1"):
        digest.update(len(part).to_bytes(8, "big") + part.encode())
    assert hash_position("p1", 0) == int(digest.hexdigest()[:16], 16) / 16.0**16
    assert 0.0 <= hash_position("p1", 0) < 1.0 and hash_position("p1", 1) != hash_position("p1", 0)


def test_heldout_size_takes_the_smallest_hashes_whatever_the_row_order(store) -> None:
    ids = [f"p{i}" for i in range(20)]
    expected = set(sorted(ids, key=lambda i: hash_position(i, 3))[:5])
    first = run_stage("split-prompts", {"prompts": str(put_prompts(store, ids).ref)}, {"heldout_size": 5, "seed": 3}, store)
    shuffled = ids[7:] + ids[:7]
    second = run_stage("split-prompts", {"prompts": str(put_prompts(store, shuffled).ref)},
                       {"heldout_size": 5, "seed": 3}, store)
    for result in (first, second):
        splits = splits_of(store, result)
        assert {i for i, split in splits.items() if split == "heldout"} == expected
        assert result.metrics["heldout"] == 5 and result.metrics["train"] == 15
    assert first.metrics["moved"] == 5


def test_a_heldout_fraction_keeps_every_prompt_in_its_split_as_prompts_are_added(store) -> None:
    few = [f"q{i}" for i in range(40)]
    many = few + [f"r{i}" for i in range(200)]
    small = splits_of(store, run_stage("split-prompts", {"prompts": str(put_prompts(store, few).ref)},
                                       {"heldout_fraction": 0.25}, store))
    large = splits_of(store, run_stage("split-prompts", {"prompts": str(put_prompts(store, many).ref)},
                                       {"heldout_fraction": 0.25}, store))
    assert all(large[i] == small[i] for i in few)
    assert {i for i, s in large.items() if s == "heldout"} == {i for i in many if hash_position(i, 0) < 0.25}
    assert 0.15 < sum(s == "heldout" for s in large.values()) / len(large) < 0.35


def test_bad_settings_are_refused_and_nothing_is_written(store) -> None:
    prompts = str(put_prompts(store, ["a", "b", "c"]).ref)
    before = sorted(p.as_posix() for p in Path(store.uri).rglob("*"))
    with pytest.raises(StageInputError, match="exactly one of heldout_fraction"):
        run_stage("split-prompts", {"prompts": prompts}, {}, store)
    with pytest.raises(StageInputError, match="exactly one of heldout_fraction"):
        run_stage("split-prompts", {"prompts": prompts}, {"heldout_fraction": 0.1, "heldout_size": 1}, store)
    with pytest.raises(ValueError, match="would hold out all 3 prompts"):
        run_stage("split-prompts", {"prompts": prompts}, {"heldout_size": 3}, store)
    assert sorted(p.as_posix() for p in Path(store.uri).rglob("*")) == before


def test_the_cli_runs_it_as_a_registered_stage(store, tmp_path) -> None:
    prompts = put_prompts(store, [f"s{i}" for i in range(10)])
    config = tmp_path / "split.yaml"
    config.write_text("heldout_size: 3\n")
    result = CliRunner().invoke(app, ["stage", "split-prompts", "--input", f"prompts={prompts.ref}", "--config",
                                      str(config), "--name", "mine/prompts", "--store", store.uri])
    assert result.exit_code == 0, result.output
    assert sum(s == "heldout" for s in splits_of(store, store.resolve("mine/prompts")).values()) == 3
