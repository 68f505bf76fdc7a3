"""benchmarks/fidelity.py: its aggregation across seeds and claim verdicts on hand numbers, and its
--quick mode running every row end to end on the smoke config."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fidelity():
    spec = importlib.util.spec_from_file_location("fidelity_benchmark", REPO / "benchmarks" / "fidelity.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _rounds(*accuracies: float, gains: tuple[float, ...] = ()) -> list[dict]:
    gains = gains or tuple(a - accuracies[0] for a in accuracies)
    return [{"round": k, "accuracy": a, "accuracy_stderr": 0.01, "gain": g, "gain_stderr": 0.02, "pairs_kept": 10}
            for k, (a, g) in enumerate(zip(accuracies, gains, strict=True))]


def test_aggregate_gives_mean_and_sd_across_seeds_and_per_seed_rises(fidelity):
    result = fidelity.aggregate({0: _rounds(0.40, 0.50, 0.60), 1: _rounds(0.20, 0.30, 0.25), 2: _rounds(0.30, 0.40, 0.50)})
    last = result["rounds"][-1]
    assert last["accuracy_mean"] == pytest.approx((0.60 + 0.25 + 0.50) / 3)
    # sd of 0.60, 0.25, 0.50 (ddof 1): mean 0.45, deviations .15, -.2, .05 → sqrt((.0225+.04+.0025)/2)
    assert last["accuracy_sd"] == pytest.approx(math.sqrt(0.065 / 2))
    assert last["gain_mean"] == pytest.approx((0.20 + 0.05 + 0.20) / 3)
    assert result["rises_per_seed"] == {0: True, 1: False, 2: True}
    assert result["rises_every_round"] is False
    assert fidelity.aggregate({0: _rounds(0.4, 0.5), 1: _rounds(0.1, 0.2)})["rises_every_round"] is True


def test_claims_are_decided_from_the_numbers_and_unmeasured_rows_say_so(fidelity):
    results = {"bon-fixed": fidelity.aggregate({0: _rounds(0.40, 0.45), 1: _rounds(0.30, 0.35)}),
               "mcts-dpo": fidelity.aggregate({0: _rounds(0.40, 0.50), 1: _rounds(0.30, 0.40)}),
               "rso": fidelity.aggregate({0: _rounds(0.40, 0.41), 1: _rounds(0.30, 0.31)}), "bon-previous": {}}
    verdicts = {claim.rule: claim.check(results) for claim in fidelity.CLAIMS}
    assert verdicts["final-round mean accuracy: mcts-dpo > bon-fixed > SFT"] is True
    assert verdicts["final-round mean accuracy: rso ≥ bon-fixed"] is False
    assert verdicts["bon-previous: accuracy rises in every round for every seed"] is None
    markdown = fidelity.render_markdown(results, [0, 1], quick=False, machine="test machine")
    assert "| RSO (rejection-sampled pairs) | 35.0 ± 7.1 | 36.0 ± 7.1 | +1.0 ± 0.0 |" in markdown
    assert "not measured" in markdown and "not run" in markdown


def test_quick_mode_runs_every_row_on_the_smoke_config(fidelity, tmp_path):
    assert fidelity.main(["--quick", "--store", str(tmp_path / "store"), "--out", str(tmp_path)]) == 0
    written = json.loads((tmp_path / "fidelity.json").read_text())
    assert set(written["rows"]) == set(fidelity.ROWS)
    for name, row in written["rows"].items():
        assert [int(s) for s in row["seeds"]] == [0, 1], name
        assert len(row["rounds"]) == 2, name  # SFT and one round
    assert (tmp_path / "fidelity.png").stat().st_size > 0
    # A second call tabulates the finished runs without computing anything.
    assert fidelity.main(["--quick", "--report-only", "--store", str(tmp_path / "store"), "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "fidelity.json").read_text())["rows"] == written["rows"]
