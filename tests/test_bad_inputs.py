"""Bad inputs the reliability battery found accepted: an import with no usable row, an enormous text
field, and a bad output ref name — each a clear error, and the store is left as it was."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prefloop.errors import UserError
from prefloop.storage import StoreError
from prefloop.tasks.importing import mapping
from prefloop.tasks.importing.stage import import_table
from prefloop.tasks.registry import run_stage


def store_files(store) -> list[str]:
    root = Path(store.uri)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) if root.exists() else []


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_an_import_whose_every_row_is_bad_is_refused_and_writes_nothing(store, tmp_path) -> None:
    rows = [{"prompt": f"q{i}", "chosen": "same", "rejected": "same"} for i in range(3)]
    source = write_jsonl(tmp_path / "pairs.jsonl", rows)
    before = store_files(store)
    with pytest.raises(UserError, match=r"no row is left to publish \(chosen_equals_rejected: 3\)"):
        import_table("preferences", source, store)
    assert store_files(store) == before
    with pytest.raises(UserError, match="the input has no rows"):
        import_table("prompts", write_jsonl(tmp_path / "empty.jsonl", []), store)
    assert store_files(store) == before
    # One good row is enough: the bad ones are quarantined with their reasons, as before.
    rows.append({"prompt": "q9", "chosen": "A:1", "rejected": "A:2"})
    result = import_table("preferences", write_jsonl(tmp_path / "some.jsonl", rows), store)
    assert result.rows == 1 and result.drops == {"chosen_equals_rejected": 3}


def test_an_enormous_text_field_is_dropped_with_a_reason(store, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(mapping, "MAX_TEXT_CHARS", 20)
    source = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "x" * 21}, {"prompt": "short"}])
    result = import_table("prompts", source, store)
    assert result.rows == 1 and result.drops == {"text_too_long": 1}
    with pytest.raises(UserError, match="text_too_long: 1"):
        import_table("prompts", write_jsonl(tmp_path / "only.jsonl", [{"prompt": "y" * 30}]), store)


def test_a_bad_output_ref_name_fails_before_any_work(store) -> None:
    before = store_files(store)
    with pytest.raises(StoreError, match="not a valid ref name"):
        run_stage("prompts", {}, {"n_train": 2, "n_heldout": 1}, store, name="../../escaped")
    assert store_files(store) == before
