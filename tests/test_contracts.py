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
