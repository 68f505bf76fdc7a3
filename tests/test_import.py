"""Importing prompts, completions and preference pairs: formats, mapping, nested fields, bad rows."""

import hashlib
import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from prefloop.cli import app
from prefloop.ids import content_id
from prefloop.tasks.importing.mapping import lookup, messages_to_text, parse_map_options
from prefloop.tasks.importing.sources import SourceImportError
from prefloop.tasks.importing.stage import import_table

runner = CliRunner()

# A completions file as another team would have it: non-standard names, nested fields, one row per
# (prompt, policy) completion, and one bad row of each kind.
GOOD_ROWS = [
    {"question": "What is 1/2 + 1/4?", "meta": {"final": "\\frac{3}{4}"}, "model": "alpha", "output": "It is \\boxed{0.75}"},
    {"question": "What is 1/2 + 1/4?", "meta": {"final": "\\frac{3}{4}"}, "model": "beta", "output": "\\boxed{\\frac{1}{2}}"},
    {"question": "What is 2 + 2?", "meta": {"final": "4"}, "model": "alpha",
     "output": [{"role": "assistant", "content": "\\boxed{4}"}]},
]
MISSING_PROMPT = {"question": None, "meta": {"final": "1"}, "model": "alpha", "output": "\\boxed{1}"}
EMPTY_COMPLETION = {"question": "What is 3 * 3?", "meta": {"final": "9"}, "model": "beta", "output": ""}
NOT_UTF8 = b'{"question": "caf\xe9?", "meta": {"final": "1"}, "model": "alpha", "output": "x"}\n'


def write_jsonl(path, rows, extra_lines=()):
    with path.open("wb") as handle:
        for row in rows:
            handle.write(json.dumps(row).encode("utf-8") + b"\n")
        for line in extra_lines:
            handle.write(line)
    return path


@pytest.fixture
def completions(tmp_path):
    return write_jsonl(tmp_path / "completions.jsonl", [*GOOD_ROWS, MISSING_PROMPT, EMPTY_COMPLETION], [NOT_UTF8])


SAMPLE_MAP = {"prompt": "question", "completion": "output", "policy": "model"}


def drops_by_reason(store, result):
    drops = store.read_table(result.ref, "drops").to_pylist()
    return {d["reason"]: d for d in drops}


def test_samples_from_jsonl_with_renamed_and_nested_fields(store, completions):
    before = hashlib.sha256(completions.read_bytes()).hexdigest()
    result = import_table("samples", completions, store, SAMPLE_MAP, name="mine/samples")
    table = store.read_table(result.ref)
    assert table.num_rows == 3
    assert table.column("policy_name").to_pylist() == ["alpha", "beta", "alpha"]
    # chat messages become their content; prompt ids are the hash of the prompt text
    assert table.column("completion").to_pylist()[2] == "\\boxed{4}"
    assert table.column("prompt_id").to_pylist()[0] == content_id("prompt", "What is 1/2 + 1/4?")
    drops = drops_by_reason(store, result)
    assert set(drops) == {"missing_prompt", "empty_completion", "invalid_utf8"}
    assert drops["missing_prompt"]["row_index"] == 3 and drops["empty_completion"]["row_index"] == 4
    assert "caf\\xe9" in drops["invalid_utf8"]["row"]  # the undecodable line is kept, escaped
    assert result.drops == {"missing_prompt": 1, "empty_completion": 1, "invalid_utf8": 1}
    assert hashlib.sha256(completions.read_bytes()).hexdigest() == before  # the source is only read
    again = import_table("samples", completions, store, SAMPLE_MAP)
    assert again.cached and again.output == result.output
    remapped = import_table("samples", completions, store, {**SAMPLE_MAP, "policy": "meta.final"})
    assert remapped.output != result.output


def test_same_content_elsewhere_is_the_same_artifact(store, completions, tmp_path):
    copy = tmp_path / "elsewhere" / "renamed.jsonl"
    copy.parent.mkdir()
    copy.write_bytes(completions.read_bytes())
    first = import_table("samples", completions, store, SAMPLE_MAP)
    assert import_table("samples", copy, store, SAMPLE_MAP).output == first.output
    copy.write_bytes(completions.read_bytes() + json.dumps(GOOD_ROWS[0] | {"model": "gamma"}).encode() + b"\n")
    assert import_table("samples", copy, store, SAMPLE_MAP).output != first.output


def test_prompts_from_a_completions_file_are_merged(store, completions):
    result = import_table("prompts", completions, store, {"prompt": "question", "answer": "meta.final"})
    table = store.read_table(result.ref)
    assert sorted(table.column("prompt").to_pylist()) == ["What is 1/2 + 1/4?", "What is 2 + 2?", "What is 3 * 3?"]
    assert dict(zip(table.column("prompt").to_pylist(), table.column("reference_answer").to_pylist(), strict=True)) \
        == {"What is 1/2 + 1/4?": "\\frac{3}{4}", "What is 2 + 2?": "4", "What is 3 * 3?": "9"}
    assert set(table.column("split").to_pylist()) == {"train"}
    assert result.metrics["merged_repeated_prompts"] == 1
    assert result.drops == {"missing_prompt": 1, "invalid_utf8": 1}


def test_conflicting_reference_answers_drop_the_prompt(store, tmp_path):
    rows = [{"q": "1+1?", "a": "2"}, {"q": "1+1?", "a": "3"}, {"q": "2+2?", "a": 4}]
    result = import_table("prompts", write_jsonl(tmp_path / "p.jsonl", rows), store, {"prompt": "q", "answer": "a"})
    table = store.read_table(result.ref)
    assert table.column("prompt").to_pylist() == ["2+2?"]
    assert table.column("reference_answer").to_pylist() == ["4"]  # a JSON number becomes its text
    assert result.drops == {"conflicting_reference_answer": 2}


def test_saved_dataset_dict_needs_a_split(store, tmp_path):
    records = {
        "messages": [[{"role": "user", "content": "What is 6 * 7?"}], [{"role": "user", "content": "What is 5 - 8?"}]],
        "gold": [{"value": "42", "source": "x"}, {"value": "-3", "source": "y"}],
        "difficulty": ["easy", "easy"],
    }
    saved = tmp_path / "saved"
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(records),
                          "train": datasets.Dataset.from_dict(records)}).save_to_disk(str(saved))
    mapping = {"prompt": "messages", "reference_answer": "gold.value"}
    with pytest.raises(SourceImportError, match=r"DatasetDict with splits \['test', 'train'\]: choose one with --split"):
        import_table("prompts", saved, store, mapping)
    result = import_table("prompts", saved, store, mapping, dataset_split="test", split="heldout")
    table = store.read_table(result.ref)
    assert table.column("prompt").to_pylist() == ["What is 6 * 7?", "What is 5 - 8?"]
    assert table.column("reference_answer").to_pylist() == ["42", "-3"]
    assert set(table.column("split").to_pylist()) == {"heldout"}
    assert result.metrics["ignored_fields"] == ["difficulty"]
    assert import_table("prompts", saved, store, mapping, dataset_split="test", split="heldout").output == result.output


def test_csv_and_parquet_folders(store, tmp_path):
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_bytes(b"q,good,bad\n1+1?,2,3\n2+2?,4,\n3+3?,6,fi\xffve\n4+4?,8,8\n")
    result = import_table("preferences", csv_path, store, {"prompt": "q", "chosen": "good", "rejected": "bad"})
    assert store.read_table(result.ref).column("prompt").to_pylist() == ["1+1?"]
    # an empty CSV cell is no value; the data contract then drops chosen == rejected
    assert result.drops == {"missing_rejected": 1, "invalid_utf8": 1, "chosen_equals_rejected": 1}
    from prefloop.datasets_spec.exporters import export_artifact

    exported = pq.read_table(export_artifact(store, result.ref, tmp_path / "trl", "trl"))
    assert exported.to_pylist() == [{"prompt": "1+1?", "chosen": "2", "rejected": "3"}]
    folder = tmp_path / "parts"
    folder.mkdir()
    for index in range(2):
        pq.write_table(pa.table({"prompt": [f"p{index}"], "completion": [f"c{index}"],
                                 "info": [{"policy": f"m{index}"}]}), folder / f"part-{index}.parquet")
    samples = import_table("samples", folder, store, {"policy": "info.policy"})
    table = store.read_table(samples.ref)
    assert table.column("completion").to_pylist() == ["c0", "c1"]
    assert table.column("policy_name").to_pylist() == ["m0", "m1"]


def test_mapping_errors_say_what_to_do(store, completions):
    with pytest.raises(SourceImportError, match="'answr' is not a column of prompts"):
        import_table("prompts", completions, store, {"answr": "meta.final"})
    with pytest.raises(SourceImportError, match=r"no row .* has the field\(s\) reference_answer=meta.fnal"):
        import_table("prompts", completions, store, {"prompt": "question", "answer": "meta.fnal"})
    with pytest.raises(SourceImportError, match="must look like TARGET=SOURCE"):
        parse_map_options(["prompt"])
    text_file = completions.with_suffix(".txt")
    text_file.write_text("x")
    with pytest.raises(SourceImportError, match="cannot tell the format"):
        import_table("prompts", text_file, store)
    with pytest.raises(SourceImportError, match="does not exist"):
        import_table("prompts", completions.with_name("nowhere.jsonl"), store)
    assert not store.list()  # nothing was written by a refused import


def test_nested_lookup_and_messages():
    record = {"a.b": 1, "meta": {"final": "x", "steps": [{"t": "s0"}, {"t": "s1"}]}}
    assert lookup(record, "a.b") == 1
    assert lookup(record, "meta.final") == "x"
    assert lookup(record, "meta.steps.-1.t") == "s1"
    assert lookup(record, "meta.nope") is not None and lookup(record, "meta.nope") is not lookup(record, "meta.final")
    assert messages_to_text([{"role": "user", "content": "hi"}]) == "hi"
    assert messages_to_text([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]) \
        == "system: be brief\n\nuser: hi"
    with pytest.raises(ValueError, match="role"):
        messages_to_text([{"content": "no role"}])


def test_cli_import_prints_the_summary(tmp_path, completions):
    store_path = tmp_path / "store"
    result = runner.invoke(app, ["import", "samples", str(completions), "--map", "prompt=question", "--map",
                                 "completion=output", "--map", "policy=model", "--name", "mine/samples",
                                 "--store", str(store_path)])
    assert result.exit_code == 0, result.output
    for text in ("imported", "dropped: invalid_utf8", "dropped: missing_prompt", "dropped: empty_completion",
                 "completion<-output", "ref mine/samples"):
        assert text in result.output
    again = runner.invoke(app, ["import", "samples", str(completions), "-m", "prompt=question", "-m", "completion=output",
                                "-m", "policy=model", "--store", str(store_path)])
    assert "cached" in again.output and again.exit_code == 0
    bad = runner.invoke(app, ["import", "samples", str(completions), "--map", "nope=x", "--store", str(store_path)])
    assert bad.exit_code == 2 and "'nope' is not a column of samples" in bad.output


def test_several_completions_per_row_are_exploded(store, tmp_path):
    rows = [
        {"q": "1+1?", "outputs": [{"model": "alpha", "text": "2"}, {"model": "beta", "text": "3"}]},
        {"q": "2+2?", "outputs": []},
        {"q": "3+3?", "outputs": "6"},
    ]
    listed = import_table("samples", write_jsonl(tmp_path / "wide.jsonl", rows), store,
                          {"prompt": "q", "completion": "outputs.text", "policy": "outputs.model"}, explode="outputs")
    table = store.read_table(listed.ref)
    assert table.column("completion").to_pylist() == ["2", "3"]
    assert table.column("policy_name").to_pylist() == ["alpha", "beta"]
    assert table.column("sample_index").to_pylist() == [0, 1]
    assert listed.drops == {"no_items": 1, "invalid_value": 1}
    by_policy = [{"q": "1+1?", "meta": {"answers": {"alpha": "2", "beta": "3"}}}]
    mapped = import_table("samples", write_jsonl(tmp_path / "by-policy.jsonl", by_policy), store,
                          {"prompt": "q", "completion": "meta.answers.value", "policy": "meta.answers.key"},
                          explode="meta.answers")
    table = store.read_table(mapped.ref)
    assert list(zip(table.column("policy_name").to_pylist(), table.column("completion").to_pylist(), strict=True)) \
        == [("alpha", "2"), ("beta", "3")]


def test_source_digest_value_is_unchanged(tmp_path):
    # The snapshot hashes exactly as source_digest always has, so ids of earlier imports still match.
    from prefloop.tasks.importing.sources import snapshot_source, source_digest

    single = tmp_path / "one.jsonl"
    single.write_bytes(b'{"prompt": "a"}\n')
    folder = tmp_path / "many"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.jsonl").write_bytes(b'{"prompt": "a"}\n')
    (folder / "sub" / "b.jsonl").write_bytes(b'{"prompt": "b"}\n')
    expected_single = hashlib.sha256(b"\0" + b'{"prompt": "a"}\n' + b"\0").hexdigest()
    expected_folder = hashlib.sha256(b"a.jsonl\0" + b'{"prompt": "a"}\n' + b"\0"
                                     + b"sub/b.jsonl\0" + b'{"prompt": "b"}\n' + b"\0").hexdigest()
    assert source_digest(single) == expected_single and source_digest(folder) == expected_folder
    for path, expected in ((single, expected_single), (folder, expected_folder)):
        with snapshot_source(path) as snapshot:
            assert snapshot.digest == expected


def test_a_source_changed_during_import_gets_the_id_of_what_was_read(store, tmp_path, monkeypatch):
    # The file changes after it was hashed, just before the rows are read: the artifact must hold the
    # rows that were hashed, so its id is the id of its content (importing the original again is a hit).
    import prefloop.tasks.importing.stage as import_stage

    original = [{"prompt": "What is 1 + 1?"}, {"prompt": "What is 2 + 2?"}]
    source = write_jsonl(tmp_path / "prompts.jsonl", original)
    real_execute = import_stage.execute

    def execute_after_a_change(*args, **kwargs):
        write_jsonl(source, [{"prompt": "What is 9 + 9?"}])
        return real_execute(*args, **kwargs)

    monkeypatch.setattr(import_stage, "execute", execute_after_a_change)
    changed_midway = import_table("prompts", source, store)
    monkeypatch.setattr(import_stage, "execute", real_execute)
    assert sorted(store.read_table(changed_midway.ref).column("prompt").to_pylist()) == [r["prompt"] for r in original]
    write_jsonl(source, original)
    assert import_table("prompts", source, store).output == changed_midway.output
