"""Data contracts: good rows pass, each kind of bad row is quarantined with its reason, and a
table missing a required column, or failing its great-expectations suite, is refused with nothing written."""

import dataclasses
import hashlib
import math
from pathlib import Path

import pyarrow as pa
import pytest

from prefloop.datasets_spec import (
    LABELS,
    PREFERENCES,
    SAMPLES,
    SPECS,
    ContractError,
    apply_contract,
    contracts,
)
from prefloop.stage import StageConfig, StageOutput, StageSpec, execute


def pairs(**overrides):
    rows = {
        "pair_id": ["p1", "p2", "p3"],
        "prompt_id": ["q1", "q2", "q3"],
        "prompt": ["1+2=?\n", "3+4=?\n", "5+1=?\n"],
        "chosen": ["1+2=3\nA:3", "3+4=7\nA:7", "5+1=6\nA:6"],
        "rejected": ["1+2=4\nA:4", "3+4=8\nA:8", "5+1=5\nA:5"],
        "score_chosen": [1.0, 1.0, 1.0],
        "score_rejected": [0.0, 0.0, 0.0],
        "margin": [1.0, 1.0, 1.0],
    }
    rows.update(overrides)
    return pa.table(rows)


def test_every_schema_carries_its_id_and_version():
    for spec in SPECS.values():
        assert spec.schema.metadata[b"schema_id"] == spec.schema_id.encode()
        assert int(spec.schema.metadata[b"schema_version"]) == spec.version


def test_good_rows_pass_and_the_suite_reports():
    result = apply_contract(pairs(), PREFERENCES)
    assert result.kept.num_rows == 3 and result.drops.num_rows == 0
    suite = result.report["suite"]
    assert suite["success"] and suite["engine"].startswith("great_expectations")
    assert suite["evaluated"] >= 10
    assert result.kept.schema.metadata[b"schema_id"] == b"prefloop.preferences"


@pytest.mark.parametrize(
    ("column", "values", "reason"),
    [
        ("prompt", [None, "3+4=?\n", "5+1=?\n"], "missing_prompt"),
        ("chosen", ["", "3+4=7\nA:7", "5+1=6\nA:6"], "empty_chosen"),
        ("rejected", ["1+2=3\nA:3", "3+4=8\nA:8", "5+1=5\nA:5"], "chosen_equals_rejected"),
        ("score_chosen", [math.nan, 1.0, 1.0], "nonfinite_score"),
        ("margin", [math.inf, 1.0, 1.0], "nonfinite_margin"),
        ("pair_id", ["p1", "p1", "p3"], "duplicate_pair_id"),
    ],
)
def test_bad_rows_are_quarantined_with_their_reason(column, values, reason):
    result = apply_contract(pairs(**{column: values}), PREFERENCES)
    assert result.kept.num_rows == 2
    assert result.drops.column("reason").to_pylist() == [reason]
    assert result.drop_counts == {reason: 1}
    dropped = result.drops.to_pylist()[0]
    assert dropped["table"] == "preferences" and dropped["row"]  # the original row is kept as JSON


def test_sample_and_label_rules():
    samples = pa.table({
        "sample_id": ["s1", "s2"], "prompt_id": ["q", "q"], "prompt": ["p", "p"], "completion": ["a", "b"],
        "finish_reason": ["stop", "exploded"], "sum_logprob": [-1.0, -2.0],
    })
    result = apply_contract(samples, SAMPLES)
    assert result.drops.column("reason").to_pylist() == ["unknown_finish_reason"]
    labels = pa.table({"label_id": ["l1", "l2"], "target_id": ["s1", "s2"], "target_kind": ["sample", "sample"],
                       "labeler": ["v", "v"], "score": [1.0, math.nan]})
    assert apply_contract(labels, LABELS).drops.column("reason").to_pylist() == ["missing_score"]


def test_missing_required_column_is_refused():
    with pytest.raises(ContractError) as error:
        apply_contract(pairs().drop(["chosen"]), PREFERENCES, source="upload.jsonl")
    message = str(error.value)
    assert "no column 'chosen'" in message and "prefloop.preferences/1" in message and "Nothing was written" in message


def test_uncastable_column_is_refused():
    with pytest.raises(ContractError, match="margin"):
        apply_contract(pairs(margin=["high", "low", "mid"]), PREFERENCES)


class _Empty(StageConfig):
    pass


def test_a_stage_whose_output_breaks_the_schema_writes_nothing(store):
    spec = StageSpec(name="broken", version="1", config_model=_Empty, output_kind="preferences", inputs={},
                     output_table=PREFERENCES)
    with pytest.raises(ContractError, match="no column 'chosen'"):
        execute(spec, lambda ctx: StageOutput(table=pairs().drop(["chosen"])), {}, {}, store)
    assert store.list() == []


def test_quarantined_rows_of_a_stage_land_in_its_drops_table(store):
    spec = StageSpec(name="noisy", version="1", config_model=_Empty, output_kind="preferences", inputs={},
                     output_table=PREFERENCES)
    bad = pairs(chosen=["", "3+4=7\nA:7", "5+1=6\nA:6"])
    result = execute(spec, lambda ctx: StageOutput(table=bad), {}, {}, store)
    assert result.rows == 2 and result.drops == {"empty_chosen": 1}
    drops = store.read_table(result.ref, "drops")
    assert drops.column("reason").to_pylist() == ["empty_chosen"]
    manifest = store.read_manifest(result.ref)
    assert manifest.validation["data"]["suite"]["success"]


def _tree(root: Path) -> dict[str, str]:
    """Every path under ``root``: files with their sha256, directories as 'dir'."""
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
            for path in sorted(root.rglob("*"))}


def test_a_failing_expectation_suite_stops_the_publish(store, tmp_path, monkeypatch):
    # A table spec whose great-expectations suite asks more than its Arrow row rules: margins at most 0.5.
    # The rows below pass every row rule (so nothing is quarantined) and then fail the suite.
    strict = dataclasses.replace(PREFERENCES, name="preferences_suite_only_check")
    expectations = contracts._expectations

    def with_margin_ceiling(spec):
        suite = expectations(spec)
        if spec.name == strict.name:
            gxe = contracts._GX_STATE["gx"].expectations
            suite.append(gxe.ExpectColumnValuesToBeBetween(column="margin", max_value=0.5))
        return suite

    monkeypatch.setattr(contracts, "_expectations", with_margin_ceiling)
    assert contracts.check_rows(pairs(), strict).drops.num_rows == 0  # the row rules pass every row

    # Something already in the store (an artifact, its staging parent, a ref) that must not change.
    good = StageSpec(name="good", version="1", config_model=_Empty, output_kind="preferences", inputs={},
                     output_table=PREFERENCES)
    execute(good, lambda ctx: StageOutput(table=pairs()), {}, {}, store, name="run/good")
    root = tmp_path / "store"
    before = _tree(root)

    spec = StageSpec(name="suite-fails", version="1", config_model=_Empty, output_kind="preferences", inputs={},
                     output_table=strict)
    with pytest.raises(ContractError, match=r"failed its data contract prefloop\.preferences_suite_only_check/1.*"
                                            r"expect_column_values_to_be_between\(margin\): 3 rows"):
        execute(spec, lambda ctx: StageOutput(table=pairs()), {}, {}, store, name="run/bad")
    assert _tree(root) == before  # byte-identical: no artifact, no staging directory, no ref
    assert "run/bad" not in store.refs()


# ----------------------------------------------------------------------------------------------
# Row-complete rules, sampled suite (docs/validation.md)
# ----------------------------------------------------------------------------------------------
def test_the_suite_sample_is_deterministic_and_spans_the_table():
    rows = contracts.suite_sample(1_000_000)
    assert len(rows) == contracts.SUITE_SAMPLE_ROWS and rows[0] == 0 and rows[-1] == 999_999
    assert (rows == contracts.suite_sample(1_000_000)).all() and (rows[1:] > rows[:-1]).all()
    assert contracts.suite_sample(25, 10).tolist() == [0, 3, 5, 8, 11, 13, 16, 19, 21, 24]
    assert contracts.suite_sample(7, 10).tolist() == list(range(7))  # a small table: every row
    assert contracts.suite_sample(20_000, None).tolist() == list(range(20_000))


def _million_pairs(rows: int, bad: dict[str, dict[int, object]]) -> pa.Table:
    """Valid preference rows, built in bulk, except the cells of ``bad`` ({column: {row: value}})."""
    import numpy as np
    import pyarrow.compute as pc

    ids = pa.array(np.arange(rows)).cast(pa.string())
    table = pa.table({
        "pair_id": pc.binary_join_element_wise("p", ids, ""), "prompt_id": pc.binary_join_element_wise("q", ids, ""),
        "prompt": pc.binary_join_element_wise(ids, "+1=?", ""), "chosen": pc.binary_join_element_wise("A:", ids, ""),
        "rejected": pc.binary_join_element_wise("B:", ids, ""), "score_chosen": np.ones(rows),
        "score_rejected": np.zeros(rows), "margin": np.ones(rows),
    })
    for name, cells in bad.items():
        mask = np.zeros(rows, dtype=bool)
        mask[list(cells)] = True
        column = table.column(name)
        values = pa.array([cells[row] for row in sorted(cells)], column.type)
        table = table.set_column(table.column_names.index(name), name, pc.replace_with_mask(column, pa.array(mask), values))
    return table


def test_a_violating_row_is_never_published_even_where_the_suite_does_not_look(store):
    # The guarantee of docs/validation.md: the Arrow row rules see every row of a million, the suite a sample.
    import pyarrow.compute as pc

    rows = 1_000_000
    sampled = set(contracts.suite_sample(rows).tolist())
    unseen = [r for r in range(1, rows) if r not in sampled][:2]  # rows the suite's sample skips
    table = _million_pairs(rows, {
        "rejected": {rows - 1: f"A:{rows - 1}"},  # the last row: chosen == rejected
        "score_chosen": {unseen[0]: math.nan},    # not in the sample
        "pair_id": {unseen[1]: "p0"},             # the id of row 0, not in the sample
    })
    spec = StageSpec(name="million", version="1", config_model=_Empty, output_kind="preferences", inputs={},
                     output_table=PREFERENCES)
    result = execute(spec, lambda ctx: StageOutput(table=table), {}, {}, store)
    assert result.rows == rows - 3
    assert result.drops == {"chosen_equals_rejected": 1, "nonfinite_score": 1, "duplicate_pair_id": 1}
    published = store.read_table(result.ref, "data").column("pair_id")
    assert not pc.any(pc.is_in(published, pa.array([f"p{rows - 1}", f"p{unseen[0]}"]))).as_py()
    assert pc.count_distinct(published).as_py() == rows - 3  # p0 once
    report = store.read_manifest(result.ref).validation["data"]
    assert report["row_rules"]["rows_checked"] == rows
    assert report["suite"]["success"] and report["suite"]["rows_validated"] == contracts.SUITE_SAMPLE_ROWS
    assert report["suite"]["rows_total"] == rows - 3
