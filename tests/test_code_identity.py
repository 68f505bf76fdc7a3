"""Code-aware artifact identity: a change to the code that computes a stage changes its output id
(a store miss, never a stale hit); a change elsewhere, or to a comment, does not; reuse across a
harmless change is an explicit record in the store."""

from __future__ import annotations

import pytest

from prefloop import code_identity as identity_module
from prefloop.code_identity import code_aliases, code_identity, record_code_reuse, source_hash
from prefloop.stage import output_identity, parse_config
from prefloop.tasks.common.labelers import LABELERS, LabelBatch, Labeler, register_labeler
from prefloop.tasks.registry import run_stage, stage_entry


@pytest.fixture
def edited_sources(monkeypatch):
    """Pretend the installed sources were edited: ``edit(module, old, new)`` rewrites one module's text."""
    edits: dict[str, tuple[str, str]] = {}
    original = identity_module.read_module_source

    def read(name: str) -> str | None:
        source = original(name)
        if source is not None and name in edits:
            old, new = edits[name]
            assert old in source, f"{old!r} is not in {name}"
            source = source.replace(old, new, 1)
        return source

    monkeypatch.setattr(identity_module, "read_module_source", read)
    identity_module._installed_module.cache_clear()

    def edit(module: str, old: str, new: str) -> None:
        edits[module] = (old, new)
        identity_module._installed_module.cache_clear()

    yield edit
    identity_module._installed_module.cache_clear()


def identity_of(stage: str, config: dict | None = None, store=None):
    spec = stage_entry(stage).spec
    return output_identity(spec, {}, parse_config(spec, config or {}), store)


def test_editing_one_line_of_a_stage_changes_its_id_and_only_its_id(edited_sources) -> None:
    construct, prompts = identity_of("construct"), identity_of("prompts")
    # One line of the construct stage's pairing: a behaviour change.
    edited_sources("prefloop.tasks.construct", "worst = min(c.score for c in group)", "worst = max(c.score for c in group)")
    assert identity_of("construct").ref != construct.ref
    assert identity_of("prompts").ref == prompts.ref  # an unrelated stage keeps its id


def test_a_shared_helper_changes_every_stage_that_uses_it(edited_sources) -> None:
    before = {stage: identity_of(stage).ref for stage in ("construct", "pair-trees", "prompts")}
    edited_sources("prefloop.tasks.common.ids", 'return content_id("pair", prompt, chosen, rejected)',
                   'return content_id("pair", prompt, rejected, chosen)')
    after = {stage: identity_of(stage).ref for stage in before}
    assert after["construct"] != before["construct"] and after["pair-trees"] != before["pair-trees"]
    assert after["prompts"] == before["prompts"]


def test_comments_docstrings_and_layout_do_not_count(edited_sources) -> None:
    before = identity_of("construct").ref
    edited_sources("prefloop.tasks.construct", '"""Stage ``construct``', '"""Stage ``construct`` (reworded)')
    assert identity_of("construct").ref == before
    assert source_hash("x = 1  # one\n") == source_hash("x = 1\n\n# another comment\n")
    assert source_hash("def f():\n    'doc'\n    return 1\n") == source_hash("def f():\n    return 1\n")
    assert source_hash("x = 1\n") != source_hash("x = 2\n")


def test_a_new_library_version_changes_model_stages_only(monkeypatch) -> None:
    sample, construct = identity_of("sample"), identity_of("construct")
    real = identity_module.importlib.metadata.version
    monkeypatch.setattr(identity_module.importlib.metadata, "version",
                        lambda name: "99.0" if name == "transformers" else real(name))
    assert identity_of("sample").ref != sample.ref
    assert identity_of("construct").ref == construct.ref


def _length_labeler(request) -> LabelBatch:
    batch = LabelBatch()
    for row in request.samples.select(["sample_id", "prompt_id", "completion"]).to_pylist():
        batch.add(row["sample_id"], row["prompt_id"], float(len(row["completion"])))
    return batch


def _negative_length_labeler(request) -> LabelBatch:
    batch = LabelBatch()
    for row in request.samples.select(["sample_id", "prompt_id", "completion"]).to_pylist():
        batch.add(row["sample_id"], row["prompt_id"], -float(len(row["completion"])))
    return batch


def test_the_label_stage_is_identified_by_its_labelers_code() -> None:
    """A plugin labeler outside the project is hashed by its own source: fixing it invalidates its labels."""
    spec = stage_entry("label").spec
    config = parse_config(spec, {"labeler": "test_code_length"})
    try:
        register_labeler(Labeler(name="test_code_length", version="1", label=_length_labeler))
        first = code_identity(spec, config, spec.module)
        LABELERS["test_code_length"] = Labeler(name="test_code_length", version="1", label=_negative_length_labeler)
        second = code_identity(spec, config, spec.module)
    finally:
        LABELERS.pop("test_code_length", None)
    assert first.fingerprint != second.fingerprint
    assert any(key.startswith("code:") for key in first.extra)
    verifier = code_identity(spec, parse_config(spec, {"labeler": "verifier"}), spec.module)
    bleu = code_identity(spec, parse_config(spec, {"labeler": "bleu"}), spec.module)
    assert "prefloop.tasks.reference_reward" in bleu.modules and "prefloop.tasks.reference_reward" not in verifier.modules


def test_the_manifest_records_the_code_fingerprint(store) -> None:
    result = run_stage("prompts", {}, {"n_train": 3, "n_heldout": 1}, store)
    manifest = store.read_manifest(result.ref)
    expected = identity_of("prompts", {"n_train": 3, "n_heldout": 1}, store)
    assert manifest.code["fingerprint"] == manifest.code["used"] == expected.code.fingerprint
    assert result.ref == expected.ref
    assert "prefloop.tasks.prompts" in manifest.code["modules"] and "prefloop.storage.store" not in manifest.code["modules"]


def test_reuse_across_a_harmless_change_is_an_explicit_record(store, edited_sources) -> None:
    config = {"n_train": 3, "n_heldout": 1}
    made = run_stage("prompts", {}, config, store)
    old_fingerprint = store.read_manifest(made.ref).code["fingerprint"]
    edited_sources("prefloop.tasks.prompts", "seen: set[str] = set()", "seen: set[str] = set(); _unused = 0")
    changed = identity_of("prompts", config, store)
    assert changed.ref != made.ref  # by default a code change is a miss
    with pytest.raises(ValueError, match="say why"):
        record_code_reuse(store, "prompts", changed.code.fingerprint, old_fingerprint, note=" ")
    record_code_reuse(store, "prompts", changed.code.fingerprint, old_fingerprint, note="added an unused variable")
    reused = run_stage("prompts", {}, config, store)
    assert reused.cached and reused.ref == made.ref
    assert code_aliases(store, "prompts")[-1]["note"] == "added an unused variable"
    # Newly computed artifacts under the alias record both fingerprints.
    other = run_stage("prompts", {}, {"n_train": 2, "n_heldout": 1}, store)
    code = store.read_manifest(other.ref).code
    assert code["fingerprint"] == changed.code.fingerprint and code["used"] == old_fingerprint


def test_the_cli_shows_fingerprints_and_records_a_reuse(store, edited_sources) -> None:
    from typer.testing import CliRunner

    from prefloop.cli import app

    config = {"n_train": 3, "n_heldout": 1}
    made = run_stage("prompts", {}, config, store)
    shown = CliRunner().invoke(app, ["code", "show", "prompts", "--store", store.uri])
    assert shown.exit_code == 0 and identity_of("prompts").code.fingerprint in shown.output
    nothing = CliRunner().invoke(app, ["code", "reuse", "prompts", "--note", "same code", "--store", store.uri])
    assert nothing.exit_code != 0  # the current code made the store's artifacts: nothing to reuse
    edited_sources("prefloop.tasks.prompts", "seen: set[str] = set()", "seen: set[str] = set(); _unused = 0")
    assert identity_of("prompts", config, store).ref != made.ref
    recorded = CliRunner().invoke(app, ["code", "reuse", "prompts", "--note", "an unused variable", "--store", store.uri])
    assert recorded.exit_code == 0, recorded.output
    assert run_stage("prompts", {}, config, store).cached
