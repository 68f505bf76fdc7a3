"""Task definitions, the labeler registry and the data-only flow (import → label → construct → filter → export)."""

import json
from pathlib import Path

import datasets
import pytest
from pydantic import BaseModel, ValidationError
from typer.testing import CliRunner

from prefloop.cli import app
from prefloop.flows.data import DataConfig, load_data_config, run_data
from prefloop.stage import StageInputError
from prefloop.storage import ArtifactStore
from prefloop.tasks.answers import (
    TASKS,
    AnswerCheck,
    AnswerExtraction,
    TaskDefinition,
    last_boxed,
    resolve_task,
)
from prefloop.tasks.common import labelers
from prefloop.tasks.importing.stage import import_table
from prefloop.tasks.registry import run_stage

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


# ---------------------------------------------------------------------------------------------
# task definitions
# ---------------------------------------------------------------------------------------------
def task(extract: dict, check: dict | None = None) -> TaskDefinition:
    return TaskDefinition(name="t", extract=AnswerExtraction(**extract), check=AnswerCheck(**(check or {})))


def test_extractors():
    assert task({"kind": "last_number"}).extract_answer("3 apples and 1,250.5 pears, so -7") == "-7"
    assert task({"kind": "last_number"}).extract_answer("total 1,250.5 pears") == "1250.5"
    assert task({"kind": "last_number"}).extract_answer("no digits") is None
    assert last_boxed("\\boxed{1} then \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{x^{2}") is None  # never closed
    line = task({"kind": "answer_line", "prefix": "Answer:"})
    assert line.extract_answer("work\nAnswer: 12\nAnswer: 13 \n") == "13"
    assert line.extract_answer("Answer:\n") is None
    regex = task({"kind": "regex", "pattern": r"final answer is (?P<answer>\w+)"})
    assert regex.extract_answer("final answer is 3, no: final answer is 4") == "4"
    assert task({"kind": "regex", "pattern": r"=\s*(\d+)"}).extract_answer("a = 5, b = 6") == "6"
    with pytest.raises(ValidationError, match="needs a 'pattern'"):
        AnswerExtraction(kind="regex")
    with pytest.raises(ValidationError, match="not a valid regular expression"):
        AnswerExtraction(kind="regex", pattern="(")


def test_checkers():
    exact = task({"kind": "full_text"}, {"kind": "exact", "case_sensitive": False, "collapse_whitespace": True})
    assert exact.is_correct("Paris  France", exact.parse_reference(" paris france"))
    numeric = task({"kind": "last_number"}, {"kind": "numeric", "abs_tol": 0.01})
    gold = numeric.parse_reference("3.14")
    assert numeric.is_correct("3.149", gold) and not numeric.is_correct("3.151", gold)  # |Δ| 0.009 vs 0.011
    relative = task({"kind": "last_number"}, {"kind": "numeric", "abs_tol": 0.0, "rel_tol": 0.1})
    assert relative.is_correct("109", relative.parse_reference("100"))
    assert not relative.is_correct("111", relative.parse_reference("100"))
    assert numeric.parse_reference("about seven") is None
    math = TASKS["math"]
    half = math.parse_reference("\\frac{1}{2}")
    assert math.is_correct("0.5", half) and math.is_correct("1/2", half) and math.is_correct("\\frac{2}{4}", half)
    assert not math.is_correct("0.6", half)
    assert math.parse_reference("???") is None
    arithmetic = resolve_task("arithmetic")
    assert arithmetic.extract_answer("1+2=3\nA:3") == "3" and arithmetic.version == "arithmetic:answer_line(A:)+exact"
    with pytest.raises(ValueError, match="presets are"):
        resolve_task("nope")


def test_math_verify_works_off_the_main_thread():
    # Prefect runs tasks in worker threads, where signal.alarm-based timeouts would raise.
    from concurrent.futures import ThreadPoolExecutor

    math = TASKS["math"]
    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(lambda: math.is_correct("\\boxed{0.25}", math.parse_reference("\\frac{1}{4}"))).result()


# ---------------------------------------------------------------------------------------------
# the data-only flow on a completions file of three policies
# ---------------------------------------------------------------------------------------------
# prompt -> (reference, {policy: completion}); verdicts under the math task are derived by hand.
PROBLEMS = {
    "What is 1/2 + 1/4?": ("\\frac{3}{4}", {"alpha": "So \\boxed{0.75}", "beta": "\\boxed{\\frac{1}{2}}",
                                             "gamma": "three quarters"}),   # correct, incorrect, unparseable
    "Simplify 6/8.": ("3/4", {"alpha": "\\boxed{\\frac{6}{8}}", "beta": "\\boxed{\\frac{3}{4}}",
                               "gamma": "\\boxed{0.8}"}),                  # correct, correct, incorrect
    "What is 2 + 2?": ("4", {"alpha": "\\boxed{4}", "beta": "\\boxed{4.0}", "gamma": "\\boxed{4}"}),  # all correct: a tie
    "Name the colour.": ("—", {"alpha": "\\boxed{red}"}),  # a reference math-verify cannot read
}


def completions_file(tmp_path: Path) -> Path:
    path = tmp_path / "completions.jsonl"
    with path.open("wb") as handle:
        for prompt, (reference, outputs) in PROBLEMS.items():
            for policy, output in outputs.items():
                row = {"input": {"question": prompt}, "gold": {"final": reference}, "policy": policy, "response": output}
                handle.write(json.dumps(row).encode() + b"\n")
        handle.write(json.dumps({"input": {"question": ""}, "gold": {"final": "1"}, "policy": "alpha",
                                 "response": "x"}).encode() + b"\n")
        handle.write(json.dumps({"input": {"question": "Is it?"}, "gold": {"final": "1"}, "policy": "alpha",
                                 "response": "  "}).encode() + b"\n")
        handle.write(b'{"input": {"question": "\xff"}, "gold": {"final": "1"}, "policy": "alpha", "response": "1"}\n')
    return path


PROMPT_MAP = {"prompt": "input.question", "reference_answer": "gold.final"}
SAMPLE_MAP = {"prompt": "input.question", "completion": "response", "policy_name": "policy"}


@pytest.fixture(scope="module")
def data_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("data")
    store = ArtifactStore(tmp / "store")
    source = completions_file(tmp)
    prompts = import_table("prompts", source, store, PROMPT_MAP, name="mine/prompts")
    samples = import_table("samples", source, store, SAMPLE_MAP, name="mine/samples")
    config = load_data_config(ROOT / "configs/data_only.yaml", name="mine")
    summary = run_data(config, store.uri, prompts="mine/prompts", samples="mine/samples", out=str(tmp / "trl"))
    return store, tmp, prompts, samples, summary


def test_every_bad_row_is_in_a_drops_table_with_its_reason(data_run):
    store, _, prompts, samples, summary = data_run
    assert samples.drops == {"missing_prompt": 1, "empty_completion": 1, "invalid_utf8": 1}
    labels = summary.stages[0]
    assert labels.stage == "label"
    drops = store.read_table(labels.ref, "drops").to_pylist()
    reasons = {json.loads(d["row"])["completion"]: d["reason"] for d in drops}
    assert reasons == {"three quarters": "unparseable_answer", "\\boxed{red}": "unparseable_reference"}


def test_labels_follow_the_math_task(data_run):
    store, _, _, _, summary = data_run
    labels = store.read_table(summary.stages[0].ref).to_pylist()
    samples = {r["sample_id"]: r for r in store.read_table(store.resolve("mine/samples")).to_pylist()}
    verdicts = {(samples[r["target_id"]]["prompt"], samples[r["target_id"]]["policy_name"]): r["verdict"] for r in labels}
    assert verdicts == {
        ("What is 1/2 + 1/4?", "alpha"): "correct", ("What is 1/2 + 1/4?", "beta"): "incorrect",
        ("Simplify 6/8.", "alpha"): "correct", ("Simplify 6/8.", "beta"): "correct", ("Simplify 6/8.", "gamma"): "incorrect",
        ("What is 2 + 2?", "alpha"): "correct", ("What is 2 + 2?", "beta"): "correct", ("What is 2 + 2?", "gamma"): "correct",
    }
    assert all(r["labeler"] == "verifier" and r["labeler_version"].endswith("math:boxed+math_verify") for r in labels)


def test_preferences_are_trl_ready(data_run):
    store, tmp, _, _, summary = data_run
    pairs = store.read_table(store.resolve("mine/preferences-filtered")).to_pylist()
    by_prompt = {p["prompt"]: p for p in pairs}
    assert set(by_prompt) == {"What is 1/2 + 1/4?", "Simplify 6/8."}  # 2 + 2 is all correct: no pair
    assert (by_prompt["What is 1/2 + 1/4?"]["chosen"], by_prompt["What is 1/2 + 1/4?"]["rejected"]) \
        == ("So \\boxed{0.75}", "\\boxed{\\frac{1}{2}}")
    assert by_prompt["Simplify 6/8."]["rejected"] == "\\boxed{0.8}"
    assert summary.export_path == str(tmp / "trl" / "train.parquet")
    exported = datasets.load_dataset("parquet", data_files=summary.export_path, split="train")
    assert exported.column_names == ["prompt", "chosen", "rejected"] and exported.num_rows == 2


def test_a_rerun_is_all_lookups(data_run):
    store, tmp, _, _, summary = data_run
    again = run_data(load_data_config(ROOT / "configs/data_only.yaml", name="mine"), store.uri,
                     prompts="mine/prompts", samples="mine/samples")
    assert all(stage.cached for stage in again.stages)
    assert again.preferences == summary.preferences


def test_import_specs_in_the_config_and_the_cli(data_run):
    store, tmp, prompts, samples, summary = data_run
    source = str(tmp / "completions.jsonl")
    config = DataConfig(name="inline", prompts={"source": source, "map": PROMPT_MAP},
                        samples={"source": source, "map": SAMPLE_MAP},
                        label={"labeler": "verifier", "task": "math", "on_unparseable": "drop"})
    inline = run_data(config, store.uri)
    assert [s.stage for s in inline.stages] == ["import-samples", "import-prompts", "label", "construct", "filter"]
    assert inline.stages[0].output == samples.output and inline.stages[1].output == prompts.output
    assert inline.preferences == summary.preferences
    result = runner.invoke(app, ["data", "--config", str(ROOT / "configs/data_only.yaml"), "--prompts", "mine/prompts",
                                 "--samples", "mine/samples", "--name", "cli", "--out", str(tmp / "cli-trl"),
                                 "--no-prefect", "--store", store.uri])
    assert result.exit_code == 0, result.output
    assert "unparseable_answer=1" in result.output and "exported to" in result.output
    wrong = runner.invoke(app, ["data", "--prompts", "mine/samples", "--samples", "mine/samples", "--no-prefect",
                                "--store", store.uri])
    assert wrong.exit_code == 2 and "must be a prompts artifact" in wrong.output


def test_score_zero_keeps_unparseable_answers_as_wrong(data_run):
    store, _, prompts, samples, _ = data_run
    result = run_stage("label", {"samples": samples.output, "prompts": prompts.output},
                          {"labeler": "verifier", "task": "math"}, store)
    rows = store.read_table(result.ref).to_pylist()
    assert [r["score"] for r in rows if r["verdict"] == "unparseable"] == [0.0]
    assert result.drops == {"unparseable_reference": 1}


def test_the_data_flow_runs_in_prefect(data_run):
    from prefect.testing.utilities import prefect_test_harness

    from prefloop.flows.data import data_flow

    store, tmp, prompts, samples, summary = data_run
    source = str(tmp / "completions.jsonl")
    config = DataConfig(name="flow", prompts={"source": source, "map": PROMPT_MAP},
                        samples={"source": source, "map": SAMPLE_MAP},
                        label={"labeler": "verifier", "task": "math", "on_unparseable": "drop"})
    with prefect_test_harness(server_startup_timeout=120):
        flowed = data_flow(config, store.uri)
    # the same artifacts as the direct path: the imports and stages were lookups
    assert flowed.preferences == summary.preferences
    assert all(stage.cached for stage in flowed.stages)


# ---------------------------------------------------------------------------------------------
# the labeler registry
# ---------------------------------------------------------------------------------------------
class LengthSettings(BaseModel):
    target: int = 10


def label_by_length(request: labelers.LabelRequest) -> labelers.LabelBatch:
    batch = labelers.LabelBatch()
    for row in request.samples.select(["sample_id", "prompt_id", "completion"]).to_pylist():
        batch.add(row["sample_id"], row["prompt_id"], -abs(len(row["completion"]) - request.settings.target))
    return batch


def test_a_plugin_labeler_is_one_registration(data_run):
    store, _, _, samples, _ = data_run
    labelers.register_labeler(labelers.Labeler(name="test_length", version="1", label=label_by_length,
                                               settings_model=LengthSettings))
    try:
        result = run_stage("label", {"samples": samples.output}, {"labeler": "test_length", "settings": {"target": 9}}, store)
        rows = {r["target_id"]: r for r in store.read_table(result.ref).to_pylist()}
        completions = {r["sample_id"]: r["completion"] for r in store.read_table(samples.ref).to_pylist()}
        assert all(rows[i]["score"] == -abs(len(completions[i]) - 9) for i in rows) and len(rows) == len(completions)
        assert {r["labeler"] for r in rows.values()} == {"test_length"}
        with pytest.raises(StageInputError, match="invalid settings"):
            run_stage("label", {"samples": samples.output}, {"labeler": "test_length", "settings": {"target": "x"}}, store)
        with pytest.raises(ValueError, match="already registered"):
            labelers.register_labeler(labelers.Labeler(name="test_length", version="2", label=label_by_length))
    finally:
        labelers.LABELERS.pop("test_length")
    with pytest.raises(StageInputError, match=r"needs the input\(s\) \['prompts'\]"):
        run_stage("label", {"samples": samples.output}, {"labeler": "verifier"}, store)
