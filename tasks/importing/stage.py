"""Import stages: bring your own prompts, completions, preference pairs and models into the store.

``prefloop import prompts|samples|preferences SRC --map TARGET=SOURCE …`` reads SRC — a JSONL,
Parquet or CSV file, a folder of such files, or a dataset saved with ``datasets``'
``save_to_disk`` (a saved ``DatasetDict`` needs ``--split``) — maps its fields onto the table's
columns and writes an artifact through the same data contracts as every stage:

* ``--map TARGET=SOURCE`` takes column TARGET from field SOURCE; SOURCE may be a dotted path into
  nested records (``reference_answer=meta.final``, ``completion=choices.0.text``). A column that is
  not mapped is taken from a source field of the same name, if there is one.
* Text fields may be plain strings or chat messages (``[{"role": …, "content": …}]``): a single
  message becomes its content, several become ``role: content`` blocks separated by blank lines.
* Rows that cannot be imported are quarantined in the artifact's ``drops`` table with a named
  reason — ``invalid_utf8``, ``invalid_json``, ``missing_prompt``, ``missing_completion``,
  ``empty_completion``, ``invalid_messages``, ``invalid_value``, ``conflicting_reference_answer`` —
  and then the table's contract quarantines what breaks its rules (duplicate ids, unknown splits …).
* The source is only read, and read once: it is copied to a private folder while its bytes are
  hashed, and the rows come from that copy. The artifact id hashes the source's *content* (sha256 of
  its files) and the mapping, so importing the same data with the same mapping twice gives the same
  artifact, and a file changed during an import gets the id of the bytes actually imported.

Prompt ids are ``content_id("prompt", prompt text)`` unless mapped, so prompts and samples
imported from different files join on equal prompt texts.

``prefloop import model DIR`` imports a local transformers causal-LM directory (safetensors
weights, config, tokenizer and its chat template) as a checksummed model artifact that every stage
can use. Pickle-based weights are refused (loading them can run arbitrary code), and custom model
code is never run (``trust_remote_code`` stays off).

This module holds the import stages themselves (their configs, specs and runs); reading sources is
:mod:`prefloop.tasks.importing.sources`, mapping records onto columns
:mod:`prefloop.tasks.importing.mapping`, and the model-directory checks
:mod:`prefloop.tasks.common.models`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa
from pydantic import Field

from prefloop.datasets_spec import DROPS, PREFERENCES, PROMPTS, SAMPLES, TableSpec
from prefloop.errors import UserError
from prefloop.stage import StageConfig, StageContext, StageOutput, StageResult, StageSpec, execute
from prefloop.storage import ArtifactStore
from prefloop.tasks.common.models import PICKLE_SUFFIXES, UnsafeModelError, check_model_dir
from prefloop.tasks.importing.mapping import (
    TARGETS,
    ImportKind,
    Problem,
    build_rows,
    fill_ids,
    merge_prompt_rows,
    resolve_mapping,
)
from prefloop.tasks.importing.sources import (
    SourceFormat,
    SourceImportError,
    SourceSnapshot,
    detect_format,
    read_source,
    snapshot_source,
)
from prefloop.tasks.registry import stage_spec

if TYPE_CHECKING:
    from prefloop.tasks.registry import StageEntry

TABLES: dict[str, TableSpec] = {"prompts": PROMPTS, "samples": SAMPLES, "preferences": PREFERENCES}


class ImportConfig(StageConfig):
    """What identifies an import: the source's content and how it is read and mapped (not its path)."""

    source_sha256: str = Field(description="sha256 over the source's files (relative path and bytes)")
    source_format: SourceFormat
    mapping: dict[str, str] = Field(default_factory=dict, description="TARGET column -> SOURCE field (dotted path)")
    dataset_split: str | None = Field(None, description="the split of a saved DatasetDict")
    split: Literal["train", "heldout"] = Field("train", description="prompts: split of rows without a split field")
    policy_name: str | None = Field(None, description="samples: policy name of rows without a policy field")
    explode: str | None = Field(None, description="a field holding a list (or a mapping) of items, each made a row")


class ImportSource(StageConfig):
    """An import as a flow or config file states it: where the data is and how to read it."""

    source: str = Field(description="a .jsonl/.parquet/.csv file, a folder of them, or a save_to_disk folder")
    map: dict[str, str] = Field(default_factory=dict, description="TARGET column -> SOURCE field (dotted path)")
    dataset_split: str | None = Field(None, description="the split of a saved DatasetDict")
    split: Literal["train", "heldout"] = Field("train", description="prompts: split of rows without a split field")
    policy_name: str | None = Field(None, description="samples: policy name of rows without a policy field")
    explode: str | None = Field(None, description="a field holding a list (or a mapping) of items, each made a row")

    def task_config(self) -> dict[str, Any]:
        """The mapping an import task takes (see :func:`execute_entry`)."""
        return {"source": self.source, "mapping": self.map, "dataset_split": self.dataset_split,
                "split": self.split, "policy_name": self.policy_name, "explode": self.explode}


def _spec(kind: ImportKind) -> StageSpec:
    return stage_spec(f"import-{kind}", version="1", config_model=ImportConfig, output_table=TABLES[kind],
                      refuse_empty_output=True,
                      description=f"Import {kind} from a JSONL/Parquet/CSV file or a saved dataset.")


PROMPTS_SPEC = _spec("prompts")
SAMPLES_SPEC = _spec("samples")
PREFERENCES_SPEC = _spec("preferences")
SPECS: dict[str, StageSpec] = {"prompts": PROMPTS_SPEC, "samples": SAMPLES_SPEC, "preferences": PREFERENCES_SPEC}


def _drops_table(kind: str, problems: list[Problem]) -> pa.Table:
    problems = sorted(problems)
    return pa.Table.from_arrays([
        pa.array([f"source:{kind}"] * len(problems), pa.string()),
        pa.array([None] * len(problems), pa.string()),
        pa.array([p[0] for p in problems], pa.int64()),
        pa.array([p[1] for p in problems], pa.string()),
        pa.array([p[2] for p in problems], pa.string()),
        pa.array([p[3] for p in problems], pa.string()),
    ], schema=DROPS.schema)


def _import_compute(kind: ImportKind, snapshot: SourceSnapshot):
    source = snapshot.original

    def compute(ctx: StageContext) -> StageOutput:
        config: ImportConfig = ctx.config
        rows, problems, found, seen_fields = build_rows(
            kind, read_source(snapshot.path, config.source_format, config.dataset_split, shown_as=source),
            config.mapping, config.explode)
        never = [f"{target}={path}" for target, path in config.mapping.items() if not found[target]]
        if never and seen_fields:
            raise SourceImportError(
                f"no row of {source} has the field(s) {', '.join(never)}; fields seen: {', '.join(sorted(seen_fields))}. "
                "Use a dotted path for a nested field (--map reference_answer=meta.final)")
        source_rows = len(rows.source_index) + len(problems)
        fill_ids(kind, rows, config.split, config.policy_name)
        metrics: dict[str, Any] = {}
        if kind == "prompts":
            keep, conflicts, merged = merge_prompt_rows(rows)
            problems += conflicts
            rows.columns = {name: [values[i] for i in keep] for name, values in rows.columns.items()}
            metrics["merged_repeated_prompts"] = merged
        schema = pa.schema([f for f in TABLES[kind].schema if f.name in rows.columns])
        table = pa.Table.from_pydict(rows.columns, schema=schema)
        used_roots = {path.split(".")[0] for path in config.mapping.values()}
        metrics = {
            "source": str(source), "source_format": config.source_format, "source_rows": source_rows,
            "imported_rows": table.num_rows, "rejected_source_rows": len(problems),
            "mapping": {t.name: config.mapping.get(t.name, t.name) for t in TARGETS[kind]
                        if t.name in config.mapping or t.name in seen_fields},
            "ignored_fields": sorted(f for f in seen_fields if f not in used_roots
                                     and f not in {t.name for t in TARGETS[kind]}),
            **metrics,
        }
        return StageOutput(table=table, drops=_drops_table(kind, problems), metrics=metrics)

    return compute


def import_table(kind: ImportKind, source: str | Path, store: ArtifactStore, mapping: dict[str, str] | None = None,
                 dataset_split: str | None = None, split: str = "train", policy_name: str | None = None,
                 name: str | None = None, explode: str | None = None) -> StageResult:
    """Import ``source`` as a ``kind`` artifact (a lookup when the same content and mapping were imported)."""
    if kind not in SPECS:
        raise SourceImportError(f"cannot import '{kind}': importable tables are {', '.join(SPECS)} (and 'model')")
    path = Path(source).expanduser()
    fmt = detect_format(path)
    resolved = resolve_mapping(kind, dict(mapping or {}))
    with snapshot_source(path) as snapshot:
        config = {"source_sha256": snapshot.digest, "source_format": fmt, "mapping": resolved,
                  "dataset_split": dataset_split, "split": split, "policy_name": policy_name, "explode": explode}
        return execute(SPECS[kind], _import_compute(kind, snapshot), {}, config, store, name)


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------
class ModelImportConfig(StageConfig):
    source_sha256: str = Field(description="sha256 over the model directory's files (relative path and bytes)")


MODEL_SPEC = stage_spec(
    "import-model", version="1", config_model=ModelImportConfig,
    description="Import a local transformers causal-LM directory (safetensors) as a model artifact.",
)


def _carried(relative: str) -> bool:
    """Whether a model directory's file goes into the artifact: pickles (e.g. training_args.bin) and hidden files never do."""
    return Path(relative).suffix.lower() not in PICKLE_SUFFIXES and not any(
        part.startswith(".") for part in Path(relative).parts)


def _model_compute(snapshot: SourceSnapshot, skipped: list[str]):
    source = snapshot.original

    def compute(ctx: StageContext) -> StageOutput:
        from transformers import AutoTokenizer

        out = snapshot.path
        try:
            weights = check_model_dir(out)  # again on the copy: what is published is what was checked
        except UnsafeModelError as error:
            raise UnsafeModelError(str(error).replace(str(out), str(source))) from None
        try:
            tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=False, local_files_only=True)
        except Exception as error:  # noqa: BLE001 - any failure here means the directory has no usable tokenizer
            raise UnsafeModelError(f"{source}: its tokenizer does not load ({type(error).__name__}: {error}); "
                                   "save it beside the model with tokenizer.save_pretrained(DIR)") from None
        metrics: dict[str, Any] = {"source": str(source), "weight_files": [w.name for w in weights],
                                   "skipped_files": skipped, "has_chat_template": bool(tokenizer.chat_template)}
        from prefloop.chat import ChatTemplateError, check_chat_template

        try:
            check_chat_template(tokenizer)  # a template that raises is refused here, not at the first stage using it
        except ChatTemplateError as error:  # name the user's directory, not the snapshot this reads
            raise ChatTemplateError(str(error).replace(str(out), str(source))) from None
        if tokenizer.eos_token_id is None:
            raise UnsafeModelError(f"{source}: the tokenizer has no eos token, so generation cannot stop; set "
                                   "tokenizer.eos_token and save it again")
        if tokenizer.pad_token_id is None:
            # Batched generation needs a pad token; the eos token is the usual stand-in.
            tokenizer.pad_token = tokenizer.eos_token
            tokenizer.save_pretrained(out)
            metrics["pad_token_set_to_eos"] = True
        return StageOutput(files_dir=out, metrics=metrics)

    return compute


def import_model(source: str | Path, store: ArtifactStore, name: str | None = None) -> StageResult:
    """Import a local model directory as a checksummed model artifact (a lookup if already imported)."""
    path = Path(source).expanduser()
    check_model_dir(path)  # refuse early, before copying the weights
    skipped = sorted(p.relative_to(path).as_posix() for p in path.rglob("*")
                     if p.is_file() and not _carried(p.relative_to(path).as_posix()))
    with snapshot_source(path, keep=_carried) as snapshot:
        return execute(MODEL_SPEC, _model_compute(snapshot, skipped), {}, {"source_sha256": snapshot.digest},
                       store, name)


# ---------------------------------------------------------------------------------------------
# running an import as a registered stage
# ---------------------------------------------------------------------------------------------
def execute_entry(entry: StageEntry, inputs: dict[str, str], config: Mapping[str, Any], store: ArtifactStore,
                  name: str | None = None) -> StageResult:
    """Run import stage ``entry`` with a flow's import config (:meth:`ImportSource.task_config`):
    its ``source`` is read here, and only the source's content (not its path) goes into the id."""
    if inputs:
        raise UserError(f"stage '{entry.name}' takes no inputs (it reads a source file); got {sorted(inputs)}")
    options = dict(config)
    source = options.pop("source")
    if entry.output == "model":
        return import_model(source, store, name)
    return import_table(entry.output, source, store, name=name, **options)
