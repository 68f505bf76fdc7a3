"""The stage contract: a stage is a :class:`StageSpec` and a pure ``compute(ctx) -> StageOutput``.

A stage module declares its spec (name, version, config model, output table; its input roles,
output kind and pool come from its entry in :mod:`prefloop.tasks.registry`) and ``compute``.
:func:`execute` (what ``registry.run_stage(name, inputs, config, store)`` calls) does everything
around ``compute``:
resolves and type-checks the inputs, computes the output id *before* any work (so a finished
stage is a store lookup), applies the output table's data contract, writes the artifact with
its manifest, and points a human-readable ref at it. Stages never call each other; flows wire
them by passing artifact references.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, ValidationError

from prefloop.code_identity import CodeIdentity, code_identity, fingerprint_for_ids
from prefloop.datasets_spec import (
    DROPS,
    ContractError,
    TableSpec,
    attach_suite,
    check_readable,
    check_rows,
    run_suite,
)
from prefloop.errors import UserError
from prefloop.storage import ArtifactExistsError, ArtifactRef, ArtifactStore, StoreError, fingerprint

logger = logging.getLogger("prefloop")


class StageConfig(BaseModel):
    """Base of every stage config: frozen, and unknown keys are an error (typos must not pass).

    ``run_options`` names the fields that say how a stage runs, not what it computes (e.g. the
    training stages' ``{"training": {"distributed"}}``: the number of data-parallel processes): they
    are left out of :meth:`content`, from which the artifact id and the manifest's ``config`` are
    made, so two runs that differ only there share one id. A stage records the ones it used in its
    metrics.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    run_options: ClassVar[dict[str, Any]] = {}

    def content(self) -> dict[str, Any]:
        """The config as it enters the artifact id and the manifest: JSON values, run options left out."""
        return self.model_dump(mode="json", exclude=self.run_options or None)


class StageInputError(ValueError):
    pass


@dataclass(frozen=True)
class StageSpec:
    name: str
    version: str
    config_model: type[StageConfig]
    output_kind: str
    inputs: Mapping[str, str]  # role -> expected artifact kind
    output_table: TableSpec | None = None  # None for file artifacts (models)
    optional_inputs: frozenset[str] = frozenset()
    description: str = ""
    # The Prefect work pool whose workers run this stage when the loop dispatches stages to
    # deployments: "gpu" for stages that run a model at scale (sampling, training, evaluation).
    pool: str = "cpu"
    # Called with the store and the result once the output is in the store (computed or found), e.g. to
    # remove a training stage's checkpoints, which the published model supersedes.
    after_publish: Callable[[ArtifactStore, StageResult], None] | None = None
    # The module that holds the stage (the registry fills it in): its code, and the project code it
    # imports, is part of every output id (prefloop.code_identity).
    module: str = ""
    # Code the stage picks at run time from its config (a labeler, a plugin): modules or functions
    # whose code joins the output id too.
    code_dependencies: Callable[[Any], Iterable[Any]] | None = None
    # Refuse to publish a table with no rows left (an import whose every source row was bad): the
    # error lists the drop reasons, and nothing is written.
    refuse_empty_output: bool = False


@dataclass
class StageOutput:
    """What ``compute`` hands back; :func:`execute` validates and writes it."""

    table: pa.Table | None = None
    drops: pa.Table | None = None  # rows the stage itself removed, with reasons
    extra_tables: dict[str, tuple[pa.Table, TableSpec]] = field(default_factory=dict)
    files_dir: Path | None = None
    remove_files_dir: bool = True  # files_dir is a scratch directory of the stage: removed once published
    metrics: dict[str, Any] = field(default_factory=dict)


class StageResult(BaseModel):
    """The small, serialisable answer of a stage: where its output is and what happened."""

    stage: str
    output: str  # kind/id
    cached: bool
    rows: int = 0
    drops: dict[str, int] = {}
    metrics: dict[str, Any] = {}
    seconds: float = 0.0
    name: str | None = None

    @property
    def ref(self) -> ArtifactRef:
        return ArtifactRef.parse(self.output)


StageCaller = Callable[[str, dict[str, str], dict[str, Any], str, str], "StageResult"]
"""How a flow runs a stage: ``call(stage_name, inputs, config, store_uri, ref_name)`` — directly, as a
Prefect task, or dispatched to a work pool (``prefloop.flows.loop``)."""

ProgressFactory = Callable[[int, str], contextlib.AbstractContextManager[Callable[[int], None]]]


@contextlib.contextmanager
def _no_progress(total: int, description: str) -> Iterator[Callable[[int], None]]:
    yield lambda advance=1: None


_progress_factory: ProgressFactory = _no_progress


def get_progress_factory() -> ProgressFactory:
    """The progress display currently installed (so a wrapper can chain onto it)."""
    return _progress_factory


def set_progress_factory(factory: ProgressFactory | None) -> None:
    """Install how long work reports progress (the CLI draws rich bars; tests draw nothing)."""
    global _progress_factory
    _progress_factory = factory or _no_progress


@dataclass
class StageContext:
    spec: StageSpec
    config: Any
    inputs: dict[str, ArtifactRef]
    store: ArtifactStore
    output_id: str

    def read(self, role: str, table_spec: TableSpec, table: str = "data") -> pa.Table:
        """Read an input table, checked against the schema this stage expects."""
        ref = self.inputs[role]
        data = self.store.read_table(ref, table)
        return check_readable(data, table_spec, source=f"input '{role}' ({ref})")

    def has(self, role: str) -> bool:
        return role in self.inputs

    def model_dir(self, role: str) -> Path:
        return self.store.local_files(self.inputs[role])

    def progress(self, total: int, description: str) -> contextlib.AbstractContextManager[Callable[[int], None]]:
        """A progress reporter: ``with ctx.progress(n, "steps") as advance: advance(1)``."""
        return _progress_factory(total, f"{self.spec.name}: {description}")


def done_total_callback(advance: Callable[[int], None]) -> Callable[[int, int], None]:
    """Adapt an ``advance(k)`` reporter to the backends' ``progress(done, total)`` callbacks."""
    seen = [0]

    def report(done: int, total: int) -> None:
        advance(done - seen[0])
        seen[0] = done

    return report


def resolve_inputs(spec: StageSpec, inputs: Mapping[str, ArtifactRef | str], store: ArtifactStore) -> dict[str, ArtifactRef]:
    unknown = sorted(set(inputs) - set(spec.inputs))
    missing = sorted(set(spec.inputs) - set(inputs) - spec.optional_inputs)
    roles = ", ".join(f"{r}={k}" for r, k in spec.inputs.items())
    if unknown or missing:
        problem = f"unknown input role(s) {unknown}" if unknown else f"missing input role(s) {missing}"
        raise StageInputError(f"stage '{spec.name}': {problem}; it takes {roles} (optional: {sorted(spec.optional_inputs) or 'none'})")
    resolved = {}
    for role, value in inputs.items():
        ref = value if isinstance(value, ArtifactRef) else store.resolve(str(value))
        if ref.kind != spec.inputs[role]:
            raise StageInputError(
                f"stage '{spec.name}': input '{role}' must be a {spec.inputs[role]} artifact, "
                f"but {value} is a {ref.kind} artifact ({ref})"
            )
        resolved[role] = ref
    return resolved


def parse_config(spec: StageSpec, config: StageConfig | Mapping[str, Any] | None) -> StageConfig:
    if isinstance(config, spec.config_model):
        return config
    if isinstance(config, BaseModel):
        config = config.model_dump()
    try:
        return spec.config_model.model_validate(dict(config or {}))
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in error.errors())
        raise StageInputError(
            f"stage '{spec.name}': invalid config ({problems}). "
            f"Valid keys: {', '.join(spec.config_model.model_fields)}"
        ) from None


@dataclass(frozen=True)
class OutputIdentity:
    """A stage run's output ref, known before any work, and the code identity it was made with."""

    ref: ArtifactRef
    code: CodeIdentity
    code_used: str  # the fingerprint in the id: the code's own, or an earlier one it reuses by record

    def manifest_record(self) -> dict[str, Any]:
        return self.code.manifest_record(self.code_used)


def output_identity(spec: StageSpec, inputs: Mapping[str, ArtifactRef], config: StageConfig,
                    store: ArtifactStore | None = None,
                    compute: Callable[[StageContext], StageOutput] | None = None) -> OutputIdentity:
    """The output's ref: a hash of the stage, its config, its inputs' ids and its code fingerprint."""
    module = spec.module or (compute.__module__ if compute is not None else "")
    code = code_identity(spec, config, module, compute)
    used = fingerprint_for_ids(store, spec.name, code.fingerprint)
    artifact_id = fingerprint(spec.name, spec.version, config.content(), {r: str(ref) for r, ref in inputs.items()},
                              code=used)
    return OutputIdentity(ArtifactRef(spec.output_kind, artifact_id), code, used)


def output_ref(spec: StageSpec, inputs: Mapping[str, ArtifactRef], config: StageConfig,
               store: ArtifactStore | None = None) -> ArtifactRef:
    return output_identity(spec, inputs, config, store).ref


def lookup(spec: StageSpec, inputs: Mapping[str, ArtifactRef | str], config: StageConfig | Mapping[str, Any] | None,
           store: ArtifactStore, name: str | None = None) -> StageResult | None:
    """The stage's result if this exact stage (same inputs, config and version) already ran, else
    None — without running anything. Inputs and config are checked as :func:`execute` checks them."""
    started = time.perf_counter()
    parsed = parse_config(spec, config)
    ref = output_ref(spec, resolve_inputs(spec, inputs, store), parsed, store)
    return _found(spec, store, ref, name, started)


def _found(spec: StageSpec, store: ArtifactStore, ref: ArtifactRef, name: str | None, started: float) -> StageResult | None:
    if not store.exists(ref):
        return None
    # Found: mark it used now, so a concurrent gc's grace period covers it until its ref is set.
    store.touch(ref)
    manifest = store.read_manifest(ref)
    if name:
        store.set_ref(name, ref, note=f"{spec.name} (cached)")
    logger.info("stage %s: cached %s", spec.name, ref)
    return StageResult(
        stage=spec.name, output=str(ref), cached=True, rows=manifest.rows, drops=manifest.drops,
        metrics=manifest.metrics, seconds=time.perf_counter() - started, name=name,
    )


def execute(
    spec: StageSpec,
    compute: Callable[[StageContext], StageOutput],
    inputs: Mapping[str, ArtifactRef | str],
    config: StageConfig | Mapping[str, Any] | None,
    store: ArtifactStore,
    name: str | None = None,
) -> StageResult:
    """Run one stage, or look up its output if this exact stage already ran."""
    started = time.perf_counter()
    if name:
        store.check_ref_name(name)  # a bad output name fails before any work, not after the publish
    parsed = parse_config(spec, config)
    resolved = resolve_inputs(spec, inputs, store)
    identity = output_identity(spec, resolved, parsed, store, compute)
    ref = identity.ref
    found = _found(spec, store, ref, name, started)
    if found is not None:
        if spec.after_publish is not None:
            spec.after_publish(store, found)
        return found
    context = StageContext(spec=spec, config=parsed, inputs=resolved, store=store, output_id=ref.id)
    output = compute(context)
    try:
        manifest = _write(spec, parsed, resolved, store, identity, output)
    finally:
        if output.files_dir is not None and output.remove_files_dir:
            shutil.rmtree(output.files_dir, ignore_errors=True)
    if name:
        store.set_ref(name, ref, note=spec.name)
    logger.info("stage %s: wrote %s (%d rows)", spec.name, ref, manifest.rows)
    result = StageResult(
        stage=spec.name, output=str(ref), cached=False, rows=manifest.rows, drops=manifest.drops,
        metrics=manifest.metrics, seconds=time.perf_counter() - started, name=name,
    )
    if spec.after_publish is not None:
        spec.after_publish(store, result)
    return result


def _write(spec: StageSpec, config: StageConfig, inputs: dict[str, ArtifactRef], store: ArtifactStore,
           identity: OutputIdentity, output: StageOutput):
    """Apply each table's contract and publish the artifact.

    Row rules run first (the kept rows are what gets written); the great-expectations suite then runs
    on them, and only when every suite has passed are the Parquet parts written and the manifest
    committed — a failing suite raises before anything is written, so nothing is published.
    """
    if spec.output_table is None and output.files_dir is None:
        raise StoreError(f"stage '{spec.name}' produced neither a table nor files; nothing was written")
    pending: list[tuple[str, TableSpec, pa.Table, Any]] = []
    if spec.output_table is not None:
        if output.table is None:
            raise ContractError(f"stage '{spec.name}' produced no table; nothing was written")
        pending.append(("data", spec.output_table, output.table, f"output of stage '{spec.name}'"))
    for table_name, (table, table_spec) in output.extra_tables.items():
        pending.append((table_name, table_spec, table, f"table '{table_name}' of stage '{spec.name}'"))
    checked = [(name, table_spec, check_rows(table, table_spec, source), source)
               for name, table_spec, table, source in pending]

    # The stage's own drops and every contract's quarantined rows form one ``drops`` table; the
    # manifest's counts are derived from it, so the two cannot disagree.
    drop_tables = [result.drops for _, _, result, _ in checked if result.drops.num_rows]
    if output.drops is not None and output.drops.num_rows:
        drop_tables.insert(0, output.drops.select(DROPS.column_names).cast(DROPS.schema))
    drop_counts = dict(Counter(r for t in drop_tables for r in t.column("reason").to_pylist()))
    if spec.refuse_empty_output and spec.output_table is not None and checked[0][2].kept.num_rows == 0:
        reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(drop_counts.items()))
        raise UserError(f"stage '{spec.name}': no row is left to publish ({reasons or 'the input has no rows'}), so "
                        "nothing was written; fix the source (see the reasons) and run it again")

    try:
        return _publish(spec, config, inputs, store, identity, output, checked, drop_tables, drop_counts)
    except ArtifactExistsError:
        # A concurrent run of the same stage published first: same id, same content, so its
        # artifact stands and this write is a no-op.
        return store.read_manifest(identity.ref)


def _publish(spec: StageSpec, config: StageConfig, inputs: dict[str, ArtifactRef], store: ArtifactStore,
             identity: OutputIdentity, output: StageOutput, checked: list, drop_tables: list[pa.Table],
             drop_counts: dict[str, int]):
    """Run every suite, then write the tables and files and commit: a failing suite raises before anything
    is written. (Running the suites in a thread while the Parquet parts were encoded was measured slower:
    the suite holds the GIL and stalls the encoder, benchmarks/store_write.py.)"""
    validation = {name: attach_suite(result, run_suite(result.kept, table_spec), table_spec, source).report
                  for name, table_spec, result, source in checked}
    ref = identity.ref
    with store.writer(ref.kind, ref.id) as writer:
        for name, table_spec, result, _ in checked:
            writer.write_table(result.kept, name, table_spec.schema_id, table_spec.version)
        if drop_tables:
            writer.write_table(pa.concat_tables(drop_tables), "drops", DROPS.schema_id, DROPS.version)
        if output.files_dir is not None:
            writer.add_directory(output.files_dir)
        return writer.commit(
            stage=spec.name,
            stage_version=spec.version,
            config=config.content(),
            seed=getattr(config, "seed", None),
            inputs={role: str(r) for role, r in inputs.items()},
            metrics=output.metrics,
            validation=validation,
            drops=drop_counts,
            code=identity.manifest_record(),
        )
