"""Nothing that fails a check is published, nor written, nor visible to a reader while the checks run.

``prefloop.stage`` quarantines rows with the row rules first, then runs the great-expectations suite
on the kept rows, and only then writes the Parquet parts and the manifest (running the suite in a
thread during the write was measured slower: it holds the GIL while the encoder needs it). These tests
catch a suite that fails and look at the store as a reader would. The uniqueness rule's sort-based path (ids of one width) is checked against the exact
hash-based one, key collisions included.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from prefloop.datasets_spec import PREFERENCES, ContractError, contracts
from prefloop.ids import content_id
from prefloop.stage import StageConfig, StageOutput, StageSpec, execute
from prefloop.storage import ArtifactWriter


class _Empty(StageConfig):
    pass


def pairs(rows: int) -> pa.Table:
    """Valid preference rows with content ids (16 hex characters, as the stages make them)."""
    return pa.table({
        "pair_id": [content_id("pair", i) for i in range(rows)],
        "prompt_id": [content_id("prompt", i) for i in range(rows)],
        "prompt": [f"{i}+1=?" for i in range(rows)], "chosen": [f"A:{i + 1}" for i in range(rows)],
        "rejected": [f"A:{i + 2}" for i in range(rows)], "score_chosen": np.ones(rows),
        "score_rejected": np.zeros(rows), "margin": np.ones(rows),
    })


def files_under(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) if root.exists() else []


def stage_spec(name: str, table_spec) -> StageSpec:
    return StageSpec(name=name, version="1", config_model=_Empty, output_kind="preferences", inputs={},
                     output_table=table_spec)


def test_a_violation_only_the_suite_finds_writes_nothing(store, monkeypatch) -> None:
    # A spec whose suite asks more than its row rules (margins at most 0.5): every row passes the
    # rules, so the violation is found only by the suite, which runs before any part is written.
    strict = dataclasses.replace(PREFERENCES, name="preferences_margin_ceiling")
    expectations, suite_and_batch, put = contracts._expectations, contracts._suite_and_batch, ArtifactWriter._put

    def with_margin_ceiling(spec):
        suite = expectations(spec)
        if spec.name == strict.name:
            gxe = contracts._GX_STATE["gx"].expectations
            suite.append(gxe.ExpectColumnValuesToBeBetween(column="margin", max_value=0.5))
        return suite

    seen: dict[str, object] = {"puts": []}

    def recording_put(self, relpath, data):
        seen["puts"].append(relpath)
        return put(self, relpath, data)

    def suite_looking_at_the_store(spec):
        root = Path(store.uri)
        seen["files"] = files_under(root)
        seen["listed"], seen["refs"] = store.list(), store.refs()
        return suite_and_batch(spec)

    monkeypatch.setattr(contracts, "_expectations", with_margin_ceiling)
    monkeypatch.setattr(contracts, "_suite_and_batch", suite_looking_at_the_store)
    monkeypatch.setattr(ArtifactWriter, "_put", recording_put)
    with pytest.raises(ContractError, match=r"expect_column_values_to_be_between\(margin\): 40 rows"):
        execute(stage_spec("suite-fails", strict), lambda ctx: StageOutput(table=pairs(40)), {}, {}, store,
                name="run/bad")
    assert seen["puts"] == [], "a part was written although the suite failed"
    assert seen["files"] == [] and seen["listed"] == [] and seen["refs"] == {}  # nothing while it ran
    assert files_under(Path(store.uri)) == [] and store.list() == [] and store.refs() == {}  # nor after


def test_a_stage_publishes_every_row_but_the_violating_ones(store) -> None:
    table = pairs(2000)
    ids = table.column("pair_id").to_pylist()
    ids[1999] = ids[3]  # a duplicate in the last row
    rejected = table.column("rejected").to_pylist()
    rejected[1000] = table["chosen"][1000].as_py()  # chosen == rejected
    table = table.set_column(0, "pair_id", pa.array(ids)).set_column(4, "rejected", pa.array(rejected))
    result = execute(stage_spec("pairs", PREFERENCES), lambda ctx: StageOutput(table=table), {}, {}, store)
    assert result.drops == {"duplicate_pair_id": 1, "chosen_equals_rejected": 1}
    assert store.read_table(result.ref).column("pair_id").to_pylist() == [
        ids[i] for i in range(2000) if i not in (1000, 1999)]
    assert store.read_manifest(result.ref).validation["data"]["suite"]["success"]


# ----------------------------------------------------------------------------------------------
# The uniqueness rule: a sort of 64-bit keys for ids of one width, the exact check where keys clash
# ----------------------------------------------------------------------------------------------
def test_sorted_keys_find_the_same_duplicates_as_the_exact_check() -> None:
    rng = np.random.default_rng(0)
    for width in (1, 5, 8, 16, 21):
        values = ["".join(rng.choice(list("ab"), width)) for _ in range(300)]  # many repeats at small widths
        column = pa.chunked_array([values[:100], values[100:]])  # chunked, as a concatenated table's
        keys = contracts._fixed_width_keys(column)
        assert keys is not None and len(keys) == 300
        first_seen = {value: values.index(value) for value in set(values)}
        assert contracts._duplicates(pa.table({"id": column}), "id").tolist() == [
            first_seen[value] != row for row, value in enumerate(values)]
    # Unequal widths or a null: no keys, the exact check answers.
    assert contracts._fixed_width_keys(pa.chunked_array([["ab", "abc"]])) is None
    assert contracts._fixed_width_keys(pa.chunked_array([["ab", None]])) is None
    assert contracts._duplicates(pa.table({"id": ["ab", "abc", "ab"]}), "id").tolist() == [False, False, True]


def test_a_key_collision_costs_time_never_a_wrong_answer() -> None:
    # Two different 16-byte ids with one key: (w0, w1) = (0, m) and (1, 0) fold to 0·m + m = 1·m + 0.
    multiplier = int(contracts._KEY_MULTIPLIER)
    first, second = bytes(8) + multiplier.to_bytes(8, "little"), (1).to_bytes(8, "little") + bytes(8)
    column = pa.chunked_array([pa.array([first, second, b"x" * 16, first], pa.binary())])
    keys = contracts._fixed_width_keys(column)
    assert keys[0] == keys[1] == keys[3] != keys[2]
    assert contracts._duplicates(pa.table({"id": column}), "id").tolist() == [False, False, False, True]
