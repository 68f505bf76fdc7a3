"""Code identity: a fingerprint of the source that decides what a stage computes.

An artifact's id hashes the stage's name, version, config and inputs *and* this fingerprint, so a
change to the code that makes an artifact gives a store miss, never a stale hit — without anyone
remembering to bump a version (HF ``datasets`` hashes a ``map`` function's code the same way).

What is hashed, for one stage:

- every project module the stage's module reaches through its imports (a static walk of the
  ``import`` statements, function-level ones included, so lazily imported backends and recipes
  count), plus the packages that contain them;
- modules and functions the stage names at run time from its config (``StageSpec.code_dependencies``:
  the ``label`` stage's labeler, which may be a user's plugin function outside the project — then
  its own source is hashed);
- the versions of torch, transformers and tokenizers when the stage runs a model (its closure
  reaches the backends or the log-prob module): a new library version may sample or train
  differently.

Each module is hashed as its syntax tree without docstrings, so editing a comment, a docstring or
the layout of a line changes nothing; any change to what the code does changes the fingerprint.
Modules that move bytes or orchestrate but do not decide content are left out
(:data:`NOT_CONTENT`: the store, the registry, the loop config, Prefect orchestration, the CLI,
reports), so adding a stage or fixing the CLI does not invalidate a store.

Reusing artifacts across a change known to be harmless is explicit and recorded:
``prefloop code reuse STAGE --note "why"`` writes ``code-aliases/<stage>.json`` in the store,
mapping the current fingerprint to the one the existing artifacts were made with; ids then use the
old fingerprint, and each manifest records both (``code.fingerprint`` and ``code.used``). Without
such a record, nothing is reused.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.metadata
import importlib.util
import inspect
import json
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefloop.errors import UserError

if TYPE_CHECKING:
    from prefloop.stage import StageSpec
    from prefloop.storage import ArtifactStore

PROJECT = "prefloop"
# Modules that do not decide what a stage computes: where bytes go and how work is scheduled.
NOT_CONTENT = (
    "prefloop.storage", "prefloop.tasks.registry", "prefloop.config", "prefloop.orchestration",
    "prefloop.flows", "prefloop.cli", "prefloop.report", "prefloop.environment", "prefloop.lazy",
    "prefloop.code_identity", "prefloop.errors",
)
# A stage whose code reaches one of these runs a model: the libraries' versions join its identity.
MODEL_CODE = ("prefloop.forward", "prefloop.backends")
MODEL_LIBRARIES = ("torch", "transformers", "tokenizers")

SourceReader = Callable[[str], str | None]


def _is_content(module: str) -> bool:
    return (module == PROJECT or module.startswith(PROJECT + ".")) and not any(
        module == excluded or module.startswith(excluded + ".") for excluded in NOT_CONTENT)


def _origin(module: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    return Path(spec.origin)


def read_module_source(module: str) -> str | None:
    """The source text of a project module, or None if it is not a Python module (a name that
    ``from package import name`` binds to an attribute, not a submodule)."""
    origin = _origin(module)
    return origin.read_text(encoding="utf-8") if origin is not None else None


def _without_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def source_hash(source: str) -> str:
    """sha256 of the code's syntax tree without docstrings: comments and layout do not count."""
    tree = _without_docstrings(ast.parse(source))
    return hashlib.sha256(ast.dump(tree, annotate_fields=False, include_attributes=False).encode()).hexdigest()


def _package_of(module: str, source_is_package: bool) -> str:
    return module if source_is_package else module.rpartition(".")[0]


def imported_modules(module: str, source: str) -> set[str]:
    """Project modules named by the ``import`` statements anywhere in ``source`` (of ``module``)."""
    is_package = (_origin(module) or Path("x.py")).name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = _package_of(module, is_package).split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            found.add(base)
            # ``from package import name``: name may be a submodule (hashed) or an attribute (the
            # package itself is already counted).
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name.startswith(PROJECT)}


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


@functools.cache
def _installed_module(name: str) -> tuple[str, frozenset[str]] | None:
    """(source hash, imported project modules) of an installed module; read once per process."""
    source = read_module_source(name)
    return None if source is None else (source_hash(source), frozenset(imported_modules(name, source)))


def module_closure(roots: Iterable[str], read: SourceReader | None = None) -> dict[str, str]:
    """Every content module reachable from ``roots`` by static imports (with their packages), each
    with the hash of its source. ``read`` replaces reading the installed sources (tests)."""
    hashes: dict[str, str] = {}
    pending = [name for root in roots for name in (root, *_parents(root))]
    seen: set[str] = set()
    while pending:
        name = pending.pop()
        if name in seen or not _is_content(name):
            continue
        seen.add(name)
        if read is None:
            info = _installed_module(name)
        else:
            source = read(name)
            info = None if source is None else (source_hash(source), frozenset(imported_modules(name, source)))
        if info is None:
            continue
        hashes[name] = info[0]
        for imported in info[1]:
            pending.extend([imported, *_parents(imported)])
    return dict(sorted(hashes.items()))


@dataclass(frozen=True)
class CodeIdentity:
    """What a stage's code fingerprint is made of, and the fingerprint itself."""

    modules: Mapping[str, str]  # module -> source hash
    extra: Mapping[str, str] = field(default_factory=dict)  # plugin source hashes, library versions
    fingerprint: str = ""

    def manifest_record(self, used: str) -> dict[str, Any]:
        """What the artifact's manifest records: the fingerprint, the one its id used, and the parts."""
        return {"fingerprint": self.fingerprint, "used": used,
                "modules": {name: digest[:12] for name, digest in self.modules.items()}, "extra": dict(self.extra)}


def _library_versions() -> dict[str, str]:
    versions = {}
    for library in MODEL_LIBRARIES:
        try:
            versions[f"library:{library}"] = importlib.metadata.version(library)
        except importlib.metadata.PackageNotFoundError:
            versions[f"library:{library}"] = "absent"
    return versions


def _dependency(item: Any) -> tuple[str | None, tuple[str, str] | None]:
    """A code dependency named at run time: a project module (to walk), or the hash of outside code."""
    if isinstance(item, str):
        return item, None
    module = getattr(item, "__module__", None) or ""
    if module.startswith(PROJECT):
        return module, None
    qualified = f"{module}.{getattr(item, '__qualname__', repr(item))}"
    try:
        return None, (f"code:{qualified}", source_hash(inspect.getsource(item)))
    except (OSError, TypeError, SyntaxError, IndentationError):
        # Code whose source cannot be read cannot be identified: never reuse what it made.
        return None, (f"code:{qualified}", f"unhashable-{uuid.uuid4().hex}")


def code_identity(spec: StageSpec, config: Any, module: str, compute: Callable | None = None,
                  read: SourceReader | None = None) -> CodeIdentity:
    """The code identity of stage ``spec`` (defined in ``module``) under ``config``; ``compute``, when
    given, counts too (a stage defined outside the project, e.g. in a user's script, is identified
    by its compute function's source)."""
    roots, extra = [module] if module else [], {}
    dependencies = list(spec.code_dependencies(config) if spec.code_dependencies else ())
    for item in ([compute] if compute is not None else []) + dependencies:
        name, outside = _dependency(item)
        if name is not None:
            roots.append(name)
        if outside is not None:
            extra[outside[0]] = outside[1]
    modules = module_closure(sorted(set(roots)), read)
    if any(name == code or name.startswith(code + ".") for name in modules for code in MODEL_CODE):
        extra |= _library_versions()
    payload = json.dumps({"modules": modules, "extra": extra}, sort_keys=True, separators=(",", ":"))
    return CodeIdentity(modules=modules, extra=dict(sorted(extra.items())),
                        fingerprint=hashlib.sha256(payload.encode()).hexdigest()[:24])


# ---------------------------------------------------------------------------------------------
# deliberate reuse across a harmless code change
# ---------------------------------------------------------------------------------------------
def _aliases_path(store: ArtifactStore, stage: str) -> str:
    return f"{store.base}/code-aliases/{stage}.json"


def code_aliases(store: ArtifactStore, stage: str) -> list[dict[str, Any]]:
    """The recorded reuse decisions of ``stage`` in ``store``, oldest first."""
    path = _aliases_path(store, stage)
    if not store.fs.exists(path):
        return []
    with store.fs.open(path, "rb") as handle:
        return json.loads(handle.read())


def fingerprint_for_ids(store: ArtifactStore | None, stage: str, fingerprint: str) -> str:
    """The code fingerprint ids are made with: ``fingerprint``, unless the store records that it
    reuses the artifacts of an earlier one (followed through chains of such records)."""
    if store is None:
        return fingerprint
    mapping = {record["current"]: record["reuses"] for record in code_aliases(store, stage)}
    seen = {fingerprint}
    while fingerprint in mapping and mapping[fingerprint] not in seen:
        fingerprint = mapping[fingerprint]
        seen.add(fingerprint)
    return fingerprint


def record_code_reuse(store: ArtifactStore, stage: str, current: str, reuses: str, note: str) -> dict[str, Any]:
    """Record that ``stage``'s code ``current`` reuses the artifacts made by code ``reuses``."""
    if not note.strip():
        raise UserError("say why the code change is harmless (--note): the record is what a later reader trusts")
    if current == reuses:
        raise UserError(f"stage '{stage}': the current code fingerprint is already {reuses}; nothing to reuse")
    records = code_aliases(store, stage)
    record = {"current": current, "reuses": reuses, "note": note,
              "at": datetime.now(UTC).isoformat(timespec="seconds")}
    store.fs.makedirs(f"{store.base}/code-aliases", exist_ok=True)
    with store.fs.open(_aliases_path(store, stage), "wb") as handle:
        handle.write(json.dumps([*records, record], indent=2).encode("utf-8"))
    return record
