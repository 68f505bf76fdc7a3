"""The reliability battery: bad inputs, SIGKILLs mid-run, concurrent writers with gc, and offline runs.

``make reliability`` (or ``python benchmarks/reliability.py``) measures, through the entry points a
user has (the ``prefloop`` CLI as a subprocess; the store API for the concurrency part):

1. **Bad inputs** — each case runs one command against a store holding a finished smoke loop. A
   case is handled when the command exits non-zero, prints a readable ``error`` line (no
   traceback, no "internal error") and every file under the store root is byte-identical
   afterwards (sha256 of every path, nothing excluded). A store a case changed is restored from a
   pristine copy before the next case, so one mishandled case cannot hide another.
2. **Kills** — ``prefloop run --config configs/smoke.yaml --no-prefect`` is SIGKILLed (its whole
   process group) after a seeded random delay spread over a whole run. Then every artifact is
   validated with ``prefloop validate`` (in-process, through the same CLI code), artifact folders
   without a manifest and refs to missing artifacts are counted as corrupt/half-visible, and the run
   is resumed: it must end with the reference run's ids and compute only the stages whose artifact
   was not already there ("wrong recomputes" counts any stage computed beyond those, or an artifact
   the reference run does not have).
3. **Concurrency** — N processes write the same artifact id and N write different ids into one store
   while another process runs ``gc`` in a loop. Writers point a ref at what they published; the
   moment between publish and ref is covered by gc's grace period. Afterwards: one folder per id,
   every artifact verifies, every published different-id artifact is still there.
4. **Offline** — the uninterrupted reference run (a whole smoke loop) runs with a ``sitecustomize``
   that refuses and records every socket connection and name lookup that is not loopback.

``--quick`` (the CI form, used by ``tests/test_reliability.py``): a subset of the bad inputs, 3 kills
and 3 writers. ``--json OUT`` writes every figure; ``--markdown OUT`` the README table of bad inputs.

Over 400 lines: the battery's cases are data (one small function per bad input) and its four parts
share the store fixtures and the CLI runner; splitting it would scatter one measurement.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
CLI = [sys.executable, "-c", "from prefloop.cli import main; main()"]
BASE_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
            "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "GX_ANALYTICS_ENABLED": "false",
            "COLUMNS": "200", "PREFECT_HOME": os.environ.get("PREFECT_HOME", str(ROOT / ".prefect"))}
BASE_ENV.pop("PREFLOOP_STORE", None)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def cli(args: list[str], env: dict[str, str] | None = None, timeout: float = 300,
        cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, errors="replace", timeout=timeout,
                          env=env or BASE_ENV, cwd=cwd or ROOT)


def tree_digest(root: Path) -> dict[str, str]:
    """Every path under ``root`` -> sha256 of its bytes ("dir" for folders): nothing excluded."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            found[os.path.relpath(os.path.join(dirpath, name), root)] = "dir"
        for name in filenames:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as handle:
                found[os.path.relpath(path, root)] = hashlib.sha256(handle.read()).hexdigest()
    return found


def tree_changes(before: dict[str, str], after: dict[str, str]) -> list[str]:
    changes = [f"+{p}" for p in sorted(set(after) - set(before))]
    changes += [f"-{p}" for p in sorted(set(before) - set(after))]
    changes += [f"~{p}" for p in sorted(set(before) & set(after)) if before[p] != after[p]]
    return changes


def error_line(text: str) -> str:
    """The first line that reads as an error message (rich's ``error:`` or click's usage box)."""
    for line in text.splitlines():
        stripped = line.strip(" │╭╮╰╯─")
        if re.match(r"(?i)(error|internal error)\b", stripped) or "Error:" in stripped:
            return stripped
    return ""


def outcome_line(text: str) -> str:
    """What a command that did not fail reported: its ``->`` line, imported rows and drop reasons."""
    kept = []
    for line in text.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃]", line) if c.strip()]
        if " -> " in line and not kept:
            kept.append(line.strip())
        elif cells and (cells[0].startswith("dropped:") or cells[0] == "imported") and len(cells) > 1:
            kept.append(f"{cells[0]} {cells[1]}")
    return "; ".join(kept)


def refs_of(store_root: Path) -> dict[str, str]:
    refs = {}
    base = store_root / "refs"
    for path in sorted(base.rglob("*.json")) if base.exists() else []:
        try:
            refs[path.relative_to(base).as_posix()[:-5]] = json.loads(path.read_text())["target"]
        except (ValueError, KeyError):
            refs[path.relative_to(base).as_posix()[:-5]] = "<unreadable>"
    return refs


def artifact_dirs(store_root: Path) -> list[Path]:
    base = store_root / "artifacts"
    return sorted(p for p in base.glob("*/*") if p.is_dir()) if base.exists() else []


def code_digest() -> str:
    """sha256 of the project's Python sources: ids are code-aware, so a change means a new reference."""
    digest = hashlib.sha256()
    for package in ("prefloop", "storage", "tasks", "flows", "datasets_spec"):
        for path in sorted((ROOT / package).rglob("*.py")):
            digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def can_mount() -> bool:
    probe = Path(tempfile.mkdtemp(prefix="prefloop-mount-"))
    try:
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(probe)],
                            capture_output=True).returncode == 0
        if ok:
            subprocess.run(["umount", str(probe)], capture_output=True)
        return ok
    except OSError:
        return False
    finally:
        shutil.rmtree(probe, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# 1. bad inputs
# ----------------------------------------------------------------------------------------------
@dataclass
class Case:
    name: str
    quick: bool = False
    skipped: str = ""
    command: str = ""
    exit_code: int | None = None
    message: str = ""
    store_unchanged: bool | None = None
    handled: bool | None = None
    problem: str = ""


@dataclass
class Ctx:
    store: Path  # the store the case runs against (restored from ``pristine`` after each case)
    pristine: Path
    work: Path  # scratch folder for input files
    mount_ok: bool
    refs: dict[str, str] = field(default_factory=dict)

    def model_dir(self) -> Path:
        kind_id = self.refs["smoke/round-0/policy"]
        return self.store / "artifacts" / kind_id / "files"


def _pairs(count: int = 4, **overrides) -> dict[str, list]:
    columns = {"pair_id": [f"p{i}" for i in range(count)], "prompt_id": [f"q{i}" for i in range(count)],
               "prompt": [f"Q: {i}+1?" for i in range(count)], "chosen": [f"A:{i + 1}" for i in range(count)],
               "rejected": [f"A:{i + 2}" for i in range(count)], "score_chosen": [1.0] * count,
               "score_rejected": [0.0] * count, "margin": [1.0] * count}
    columns.update(overrides)
    return columns


def _parquet(path: Path, columns: dict[str, list]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)
    return path


def _yaml(ctx: Ctx, name: str, text: str) -> Path:
    path = ctx.work / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def _store_args(ctx: Ctx) -> list[str]:
    return ["--store", str(ctx.store)]


def _import(ctx: Ctx, kind: str, path: Path, *extra: str) -> list[str]:
    return ["import", kind, str(path), *extra, *_store_args(ctx)]


def _first_part(ctx: Ctx, ref: str) -> Path:
    return sorted((ctx.store / "artifacts" / ctx.refs[ref] / "data").glob("part-*.parquet"))[0]


def _copy_model(ctx: Ctx, name: str, drop: tuple[str, ...] = ()) -> Path:
    target = ctx.work / name
    shutil.copytree(ctx.model_dir(), target)
    for pattern in drop:
        for path in target.glob(pattern):
            path.unlink()
    return target


# Each case prepares its inputs (it may change the store: that state is the "before") and returns
# the CLI arguments. Cases marked quick also run in --quick.
def case_corrupt_parquet(ctx):
    path = ctx.work / "corrupt.parquet"
    path.write_bytes(b"PAR1" + os.urandom(2048))
    return _import(ctx, "preferences", path)


def case_truncated_parquet(ctx):
    path = _parquet(ctx.work / "full.parquet", _pairs(200))
    data = path.read_bytes()
    (ctx.work / "truncated.parquet").write_bytes(data[: len(data) // 2])
    return _import(ctx, "preferences", ctx.work / "truncated.parquet")


def case_missing_column(ctx):
    columns = _pairs()
    del columns["rejected"]
    return _import(ctx, "preferences", _parquet(ctx.work / "missing.parquet", columns))


def case_renamed_column(ctx):
    columns = _pairs()
    columns["chosen_text"] = columns.pop("chosen")
    return _import(ctx, "preferences", _parquet(ctx.work / "renamed.parquet", columns))


def case_wrong_types(ctx):
    return _import(ctx, "preferences", _parquet(ctx.work / "types.parquet", _pairs(
        chosen=[[1, 2]] * 4, rejected=[{"x": 1}] * 4, margin=["high"] * 4)))


def case_nan_scores(ctx):
    nan, inf = float("nan"), float("inf")
    return _import(ctx, "preferences", _parquet(ctx.work / "nan.parquet", _pairs(
        score_chosen=[nan, inf, nan, -inf], score_rejected=[0.0, nan, inf, 0.0], margin=[nan, inf, -inf, nan])))


def case_empty_table(ctx):
    return _import(ctx, "preferences", _parquet(ctx.work / "empty.parquet", _pairs(0)))


def case_chosen_equals_rejected(ctx):
    columns = _pairs()
    columns["rejected"] = list(columns["chosen"])
    return _import(ctx, "preferences", _parquet(ctx.work / "same.parquet", columns))


def case_enormous_text(ctx):
    path = ctx.work / "huge.jsonl"
    with open(path, "w", encoding="utf-8") as handle:
        handle.write('{"prompt": "')
        for _ in range(50):
            handle.write("x" * (1 << 20))
        handle.write('", "reference_answer": "1"}\n')
    return _import(ctx, "prompts", path)


def case_non_utf8(ctx):
    path = ctx.work / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "caf\xe9 \xff\xfe", "reference_answer": "1"}\n' * 3)
    return _import(ctx, "prompts", path)


def case_unknown_config_key(ctx):
    return ["stage", "prompts", "--config", str(_yaml(ctx, "unknown.yaml", "n_train: 4\nn_trian: 8\n")),
            *_store_args(ctx)]


def case_unknown_loop_key(ctx):
    text = SMOKE.read_text(encoding="utf-8") + "\nround: 3\n"
    return ["run", "--config", str(_yaml(ctx, "unknown_loop.yaml", text)), "--no-prefect", *_store_args(ctx)]


def case_malformed_yaml(ctx):
    return ["run", "--config", str(_yaml(ctx, "malformed.yaml", "name: smoke\nrounds: [1, 2\n  seed: :\n")),
            "--no-prefect", *_store_args(ctx)]


def case_yaml_not_mapping(ctx):
    return ["run", "--config", str(_yaml(ctx, "list.yaml", "- rounds\n- 2\n")), "--no-prefect", *_store_args(ctx)]


def case_wrong_config_type(ctx):
    return ["stage", "prompts", "--config", str(_yaml(ctx, "wrongtype.yaml", "n_train: many\n")), *_store_args(ctx)]


def case_missing_config_file(ctx):
    return ["run", "--config", str(ctx.work / "no-such.yaml"), "--no-prefect", *_store_args(ctx)]


def case_traversal_ref(ctx):
    return ["show", "../../etc/passwd", *_store_args(ctx)]


def case_absolute_ref(ctx):
    return ["export", "/etc/passwd", "--out", str(ctx.work / "abs-out"), *_store_args(ctx)]


def case_traversal_input(ctx):
    return ["stage", "filter", "--input", "preferences=../refs/smoke/round-1/preferences", *_store_args(ctx)]


def case_traversal_name(ctx):
    return ["stage", "prompts", "--config", str(_yaml(ctx, "small.yaml", "n_train: 4\nn_heldout: 0\n")),
            "--name", "../../escaped", *_store_args(ctx)]


def case_tampered_validate(ctx):
    part = _first_part(ctx, "smoke/round-1/preferences")
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    return ["validate", "smoke/round-1/preferences", *_store_args(ctx)]


def case_tampered_use(ctx):
    part = _first_part(ctx, "smoke/round-1/preferences")
    data = bytearray(part.read_bytes())
    data[len(data) // 3] ^= 0x01
    part.write_bytes(bytes(data))
    return ["stage", "filter", "--input", "preferences=smoke/round-1/preferences", "--config",
            str(_yaml(ctx, "filter.yaml", "{}\n")), *_store_args(ctx)]


def case_tampered_manifest(ctx):
    manifest = ctx.store / "artifacts" / ctx.refs["smoke/round-1/samples"] / "manifest.json"
    doc = json.loads(manifest.read_text())
    entry = doc["tables"]["data"]["files"][0]
    entry["sha256"] = "0" * 64
    manifest.write_text(json.dumps(doc, indent=2, sort_keys=True))
    return ["export", "smoke/round-1/samples", "--format", "jsonl", "--out", str(ctx.work / "tm-out"),
            *_store_args(ctx)]


def case_pickled_model(ctx):
    target = _copy_model(ctx, "pickled", drop=("*.safetensors",))
    (target / "pytorch_model.bin").write_bytes(b"\x80\x04\x95" + os.urandom(256))
    return ["import", "model", str(target), *_store_args(ctx)]


def case_auto_map_model(ctx):
    target = _copy_model(ctx, "automap")
    config = json.loads((target / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (target / "config.json").write_text(json.dumps(config))
    (target / "modeling_evil.py").write_text("raise SystemExit('custom code ran')\n")
    return ["import", "model", str(target), *_store_args(ctx)]


def case_no_tokenizer(ctx):
    return ["import", "model", str(_copy_model(ctx, "notok", drop=("tokenizer*", "special_tokens*", "vocab*",
                                                                    "merges*"))), *_store_args(ctx)]


def case_unknown_stage(ctx):
    return ["stage", "no-such-stage", *_store_args(ctx)]


def case_unknown_role(ctx):
    return ["stage", "filter", "--input", "preferences=smoke/round-1/preferences", "--input",
            "bogus=smoke/prompts", *_store_args(ctx)]


def case_wrong_kind(ctx):
    return ["stage", "filter", "--input", "preferences=smoke/round-0/policy", *_store_args(ctx)]


def case_dangling_ref_show(ctx):
    (ctx.store / "refs" / "dangling.json").write_text(json.dumps(
        {"name": "dangling", "target": "preferences/000000000000000000000000", "log": []}))
    return ["show", "dangling", *_store_args(ctx)]


def case_dangling_ref_ls(ctx):
    case_dangling_ref_show(ctx)
    return ["ls", *_store_args(ctx)]


def case_corrupt_ref_json(ctx):
    (ctx.store / "refs" / "broken.json").write_text('{"name": "broken", "target": ')
    return ["ls", *_store_args(ctx)]


def case_corrupt_ref_gc(ctx):
    (ctx.store / "refs" / "broken.json").write_text("not json at all")
    return ["gc", "--dry-run", *_store_args(ctx)]


def case_duplicate_labels(ctx):
    import pyarrow as pa

    sys.path.insert(0, str(ROOT))
    from prefloop.storage import ArtifactRef, ArtifactStore

    store = ArtifactStore(ctx.store)
    labels_ref = ArtifactRef.parse(ctx.refs["smoke/round-1/labels"])
    table = store.read_table(labels_ref)
    again = table.set_column(table.schema.get_field_index("label_id"), "label_id",
                             pa.array([f"{v}-dup" for v in table.column("label_id").to_pylist()]))
    flipped = again.set_column(again.schema.get_field_index("score"), "score",
                               pa.array([1.0 - s for s in again.column("score").to_pylist()], pa.float64()))
    manifest = store.read_manifest(labels_ref)
    with store.writer("labels", "dup0labels000000000000000") as writer:
        writer.write_table(pa.concat_tables([table, flipped.cast(table.schema)]), schema_id=manifest.schema_id,
                           schema_version=manifest.schema_version)
        writer.commit(stage="label", stage_version=manifest.stage_version, inputs=manifest.inputs)
    store.set_ref("bad/duplicate-labels", ArtifactRef("labels", "dup0labels000000000000000"))
    return ["stage", "construct", "--input", f"samples={ctx.refs['smoke/round-1/samples']}", "--input",
            "labels=bad/duplicate-labels", *_store_args(ctx)]


def case_export_existing(ctx):
    out = ctx.work / "existing-out"
    out.mkdir(exist_ok=True)
    (out / "keep.txt").write_text("user data")
    return ["export", "smoke/round-1/preferences", "--out", str(out), *_store_args(ctx)]


def case_bad_input_syntax(ctx):
    return ["stage", "filter", "--input", "smoke/round-1/preferences", *_store_args(ctx)]


def case_unknown_export_format(ctx):
    return ["export", "smoke/round-1/preferences", "--format", "xlsx", "--out", str(ctx.work / "fmt-out"),
            *_store_args(ctx)]


def case_import_missing_source(ctx):
    return _import(ctx, "preferences", ctx.work / "nowhere.parquet")


def case_readonly_store(ctx):
    if not ctx.mount_ok:
        raise Skip("cannot mount a read-only tmpfs here (needs root and mount); chmod does not stop root")
    mount = ctx.work / "ro-store"
    mount.mkdir()
    _mount(mount, "size=64m")
    shutil.copytree(ctx.pristine, mount, dirs_exist_ok=True)
    subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
    ctx.store = mount
    return ["stage", "prompts", "--config", str(_yaml(ctx, "ro.yaml", "n_train: 4\nn_heldout: 0\nseed: 7\n")),
            "--name", "ro/prompts", *_store_args(ctx)]


def case_full_disk(ctx):
    if not ctx.mount_ok:
        raise Skip("cannot mount a small tmpfs here (needs root and mount)")
    used = sum(p.stat().st_size for p in ctx.pristine.rglob("*") if p.is_file())
    mount = ctx.work / "full-store"
    mount.mkdir()
    _mount(mount, f"size={(used // 1024) + 2048}k")
    shutil.copytree(ctx.pristine, mount, dirs_exist_ok=True)
    ctx.store = mount
    path = ctx.work / "big.jsonl"
    rng = random.Random(3)
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(20000):
            text = "".join(rng.choice("abcdefghij0123456789 ") for _ in range(200))
            handle.write(json.dumps({"prompt": f"{i}: {text}", "reference_answer": str(i)}) + "\n")
    return _import(ctx, "prompts", path)


class Skip(Exception):
    pass


MOUNTS: list[Path] = []


def _mount(path: Path, options: str) -> None:
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True, capture_output=True)
    MOUNTS.append(path)


CASES: list[tuple[str, Callable[[Ctx], list[str]], bool]] = [
    ("corrupt Parquet (random bytes)", case_corrupt_parquet, True),
    ("truncated Parquet", case_truncated_parquet, False),
    ("schema drift: missing column 'rejected'", case_missing_column, False),
    ("schema drift: 'chosen' renamed 'chosen_text'", case_renamed_column, False),
    ("wrong types (list/struct text, string margin)", case_wrong_types, False),
    ("NaN/inf scores and margins", case_nan_scores, True),
    ("empty table", case_empty_table, False),
    ("chosen == rejected", case_chosen_equals_rejected, False),
    ("enormous text (50 MB prompt)", case_enormous_text, False),
    ("non-UTF-8 JSONL", case_non_utf8, False),
    ("unknown stage-config key", case_unknown_config_key, False),
    ("unknown loop-config key", case_unknown_loop_key, False),
    ("malformed YAML", case_malformed_yaml, True),
    ("YAML that is a list, not a mapping", case_yaml_not_mapping, False),
    ("config value of the wrong type", case_wrong_config_type, False),
    ("missing config file", case_missing_config_file, False),
    ("path-traversal ref (show ../../etc/passwd)", case_traversal_ref, True),
    ("absolute-path ref (export /etc/passwd)", case_absolute_ref, False),
    ("path-traversal input ref", case_traversal_input, False),
    ("path-traversal output ref name (--name ../../x)", case_traversal_name, False),
    ("tampered Parquet part: validate", case_tampered_validate, True),
    ("tampered Parquet part: used as a stage input", case_tampered_use, False),
    ("tampered checksum in manifest: export", case_tampered_manifest, False),
    ("pickled model (pytorch_model.bin only)", case_pickled_model, True),
    ("model config with auto_map (custom code)", case_auto_map_model, False),
    ("model without tokenizer", case_no_tokenizer, False),
    ("unknown stage name", case_unknown_stage, False),
    ("unknown input role", case_unknown_role, False),
    ("input of the wrong kind (model as preferences)", case_wrong_kind, False),
    ("--input without ROLE=", case_bad_input_syntax, False),
    ("dangling ref: show", case_dangling_ref_show, True),
    ("dangling ref: ls", case_dangling_ref_ls, False),
    ("ref file with corrupt JSON: ls", case_corrupt_ref_json, False),
    ("ref file with corrupt JSON: gc --dry-run", case_corrupt_ref_gc, False),
    ("duplicate labels for a sample (construct)", case_duplicate_labels, False),
    ("export onto an existing non-empty folder", case_export_existing, False),
    ("unknown export format", case_unknown_export_format, False),
    ("import of a missing file", case_import_missing_source, False),
    ("store on a read-only filesystem", case_readonly_store, True),
    ("full disk (tiny tmpfs)", case_full_disk, False),
]


# Commands that list or report may go on with a warning instead of failing: listing a store with a
# dangling ref still lists the rest.
WARNING_IS_ENOUGH = {"dangling ref: ls"}


def run_bad_inputs(base_store: Path, work: Path, quick: bool) -> list[Case]:
    pristine = work / "pristine"
    shutil.copytree(base_store, pristine)
    ctx = Ctx(store=work / "store", pristine=pristine, work=work, mount_ok=can_mount(), refs=refs_of(pristine))
    results = []
    for name, prepare, in_quick in CASES:
        if quick and not in_quick:
            continue
        case = Case(name=name, quick=in_quick)
        shutil.rmtree(work / "store", ignore_errors=True)
        shutil.copytree(pristine, work / "store")
        ctx.store = work / "store"
        try:
            args = prepare(ctx)
        except Exception as reason:  # noqa: BLE001 - a case that cannot be set up is reported, not fatal
            case.skipped = str(reason) if isinstance(reason, Skip) else f"setup failed: {type(reason).__name__}: {reason}"
            results.append(case)
            print(f"  [skip] {name}: {reason}", flush=True)
            continue
        case.command = "prefloop " + " ".join(a.replace(str(work), "$WORK") for a in args)
        before = tree_digest(ctx.store)
        try:
            done = cli(args, timeout=300)
            case.exit_code, output = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired:
            case.exit_code, output = None, "timed out after 300 s"
        changes = tree_changes(before, tree_digest(ctx.store))
        case.store_unchanged = not changes
        output = output.replace(str(work), "$WORK")  # the README table shows no machine's paths
        case.message = error_line(output) or outcome_line(output) or (output.strip().splitlines() or [""])[-1][:200]
        problems = []
        if case.exit_code in (0, None):
            problems.append("exit code 0" if case.exit_code == 0 else "timed out")
        warned = name in WARNING_IS_ENOUGH and case.exit_code == 0 and re.search(r"(?m)^\s*warning:", output)
        if warned:
            problems.clear()
            case.message = next(line.strip() for line in output.splitlines() if line.strip().startswith("warning:"))
        elif "Traceback" in output or re.search(r"(?i)internal error", output) or not error_line(output):
            problems.append("traceback / internal error / no error line")
        if changes:
            problems.append(f"store changed: {', '.join(changes[:3])}{' …' if len(changes) > 3 else ''}")
        if name.startswith("export onto") and (work / "existing-out" / "keep.txt").read_text() != "user data":
            problems.append("the existing output was overwritten")
        case.problem = "; ".join(problems)
        case.handled = not problems
        results.append(case)
        print(f"  [{'ok' if case.handled else 'MISHANDLED'}] {name}: exit {case.exit_code}: {case.message[:110]}"
              + (f"  <- {case.problem}" if case.problem else ""), flush=True)
        _unmount_all()
    return results


def _unmount_all() -> None:
    while MOUNTS:
        subprocess.run(["umount", "-l", str(MOUNTS.pop())], capture_output=True)


def markdown_table(cases: list[Case]) -> str:
    lines = ["| bad input | exit | message | store unchanged | handled |", "|---|---|---|---|---|"]
    for case in cases:
        if case.skipped:
            lines.append(f"| {case.name} | – | skipped: {case.skipped} | – | – |")
            continue
        message = case.message.replace("|", "\\|")[:160]
        lines.append(f"| {case.name} | {case.exit_code} | {message} | {'yes' if case.store_unchanged else 'NO'} | "
                     f"{'yes' if case.handled else 'NO: ' + case.problem.replace('|', '/')} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# 2. kills
# ----------------------------------------------------------------------------------------------
def validate_store(store_root: Path) -> list[str]:
    """Corrupt or half-visible things in a store: each artifact through ``prefloop validate``."""
    from typer.testing import CliRunner

    from prefloop.cli import app

    problems = []
    runner = CliRunner()
    for folder in artifact_dirs(store_root):
        kind_id = f"{folder.parent.name}/{folder.name}"
        if not (folder / "manifest.json").exists():
            problems.append(f"{kind_id}: folder without manifest (half-visible)")
            continue
        result = runner.invoke(app, ["validate", kind_id, "--store", str(store_root)])
        if result.exit_code != 0:
            problems.append(f"{kind_id}: validate exit {result.exit_code}: {result.output.strip()[-200:]}")
    for name, target in refs_of(store_root).items():
        if target == "<unreadable>" or not (store_root / "artifacts" / target / "manifest.json").exists():
            problems.append(f"ref {name} -> {target}: points at nothing")
    return problems


def run_kills(kills: int, reference: Path, ref_seconds: float, work: Path, seed: int) -> dict:
    rng = random.Random(seed)
    survived = corrupt = wrong = mismatched = rebuilt = 0
    details = []
    index = attempts = 0
    ref_digest = code_digest()
    upper = ref_seconds + 2.0
    while index < kills and attempts < 3 * kills:
        attempts += 1
        if code_digest() != ref_digest:
            # Artifact ids are code-aware: once the sources change, the old reference ids are stale.
            print("  the project's sources changed: rebuilding the reference run", flush=True)
            shutil.rmtree(reference, ignore_errors=True)
            ref_digest = code_digest()
            cli(["run", "--config", str(SMOKE), "--no-prefect", "--store", str(reference)], timeout=900)
            rebuilt += 1
            continue
        ref_refs = refs_of(reference)
        ref_artifacts = {f"{p.parent.name}/{p.name}" for p in artifact_dirs(reference)}
        store = work / f"kill-{index}"
        shutil.rmtree(store, ignore_errors=True)
        delay = rng.uniform(0.5, upper)
        started = time.perf_counter()
        process = subprocess.Popen([*CLI, "run", "--config", str(SMOKE), "--no-prefect", "--store", str(store)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=BASE_ENV, cwd=ROOT,
                                   start_new_session=True)
        try:
            process.wait(timeout=delay)
            finished_first = True
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            finished_first = False
        killed_at = time.perf_counter() - started
        if finished_first:
            # The run was faster than the bound (the reference ran under load): no kill happened, so
            # this attempt does not count; later kills are drawn over the run's real length.
            upper = max(1.0, killed_at - 0.2)
            print(f"  run finished after {killed_at:.1f}s, before its kill: drawing kills over that", flush=True)
            shutil.rmtree(store, ignore_errors=True)
            continue
        problems = validate_store(store)
        before = {f"{p.parent.name}/{p.name}" for p in artifact_dirs(store) if (p / "manifest.json").exists()}
        resumed = cli(["run", "--config", str(SMOKE), "--no-prefect", "--store", str(store)], timeout=600)
        match = re.search(r"(\d+) stages: (\d+) computed, (\d+) cached", resumed.stdout)
        final = refs_of(store)
        after = {f"{p.parent.name}/{p.name}" for p in artifact_dirs(store) if (p / "manifest.json").exists()}
        needed = {target for target in final.values()} - before
        computed = int(match.group(2)) if match else -1
        extra = sorted(after - ref_artifacts)
        wrong_here = (max(0, computed - len(needed)) if match else 1) + len(extra)
        same = final == ref_refs and resumed.returncode == 0
        problems += validate_store(store) if not problems else []
        if code_digest() != ref_digest:
            print(f"  kill {index + 1}: the project's sources changed during it; repeated", flush=True)
            shutil.rmtree(store, ignore_errors=True)
            continue
        survived += int(not problems and same and not wrong_here)
        corrupt += int(bool(problems))
        wrong += wrong_here
        mismatched += int(not same)
        details.append({"kill": index, "delay_s": round(killed_at, 2), "finished_before_kill": finished_first,
                        "artifacts_before_resume": len(before), "computed_on_resume": computed,
                        "expected_to_compute": len(needed), "corrupt": problems, "extra_artifacts": extra,
                        "same_ids_as_reference": same,
                        "resume_error": "" if resumed.returncode == 0 else (resumed.stderr or resumed.stdout)[-400:]})
        print(f"  kill {index + 1}/{kills} at {killed_at:5.1f}s: {len(before):2d} artifacts before resume, "
              f"computed {computed} (expected {len(needed)}), corrupt {len(problems)}, "
              f"same ids {'yes' if same else 'NO'}", flush=True)
        shutil.rmtree(store, ignore_errors=True)
        index += 1
    return {"kills": index, "survived": survived, "corrupt_found": corrupt, "wrong_recomputes": wrong,
            "different_final_ids": mismatched,
            "reference_rebuilt_after_code_changes": rebuilt, "details": details}


# ----------------------------------------------------------------------------------------------
# 3. concurrent writers with gc
# ----------------------------------------------------------------------------------------------
WRITER = """
import json, sys, time
import pyarrow as pa
from prefloop.storage import ArtifactRef, ArtifactStore, ArtifactExistsError
store_root, artifact_id, ref_name, rows, start_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
store = ArtifactStore(store_root)
table = pa.table({"i": pa.array(range(rows), pa.int64()), "text": [f"row {i} of {artifact_id[:4]}" for i in range(rows)]})
time.sleep(max(0.0, start_at - time.time()))
status = "published"
try:
    with store.writer("reliability", artifact_id) as writer:
        writer.write_table(table)
        writer.commit(stage="reliability", stage_version="1")
except ArtifactExistsError:
    status = "existed"
store.set_ref(ref_name, ArtifactRef("reliability", artifact_id))
print(json.dumps({"id": artifact_id, "status": status}))
"""

GC_LOOP = """
import sys, time
from prefloop.storage import ArtifactStore
store, stop_after = ArtifactStore(sys.argv[1]), float(sys.argv[2])
rounds = 0
while time.time() < stop_after:
    store.gc()
    rounds += 1
    time.sleep(0.005)
print(rounds)
"""


def run_concurrency(writers: int, work: Path) -> dict:
    store = work / "concurrent"
    shutil.rmtree(store, ignore_errors=True)
    store.mkdir(parents=True)
    start_at = time.time() + 4.0
    gc_process = subprocess.Popen([sys.executable, "-c", GC_LOOP, str(store), str(start_at + 25)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=BASE_ENV)
    jobs = []
    for i in range(writers):
        jobs.append(("same", subprocess.Popen(
            [sys.executable, "-c", WRITER, str(store), "same" + "0" * 20, f"same/{i}", "200000", str(start_at)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=BASE_ENV)))
        jobs.append(("different", subprocess.Popen(
            [sys.executable, "-c", WRITER, str(store), f"diff{i:020d}", f"different/{i}", "200000", str(start_at)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=BASE_ENV)))
    reports, failures = [], []
    for group, job in jobs:
        out, err = job.communicate(timeout=300)
        if job.returncode == 0:
            reports.append({"group": group, **json.loads(out.strip().splitlines()[-1])})
        else:
            failures.append(f"{group} writer exit {job.returncode}: {err.strip()[-300:]}")
    gc_out, gc_err = gc_process.communicate(timeout=120)
    if gc_process.returncode != 0:
        failures.append(f"gc loop exit {gc_process.returncode}: {gc_err.strip()[-300:]}")
    sys.path.insert(0, str(ROOT))
    from prefloop.storage import ArtifactRef, ArtifactStore

    reader = ArtifactStore(store)
    folders = [p.name for p in (store / "artifacts" / "reliability").iterdir()] if (
        store / "artifacts" / "reliability").exists() else []
    expected = {"same" + "0" * 20} | {f"diff{i:020d}" for i in range(writers)}
    corrupt, lost = [], []
    for artifact_id in sorted(expected):
        ref = ArtifactRef("reliability", artifact_id)
        try:
            reader.verify(ref)
        except Exception as error:  # noqa: BLE001 - every failure is a finding, reported as such
            (lost if "not in the store" in str(error) else corrupt).append(f"{artifact_id}: {error}")
    published = sum(1 for r in reports if r["group"] == "same" and r["status"] == "published")
    return {"writers_same_id": writers, "writers_different_ids": writers, "writer_failures": failures,
            "same_id_published_by": published, "artifact_folders": len(folders),
            "unexpected_folders": sorted(set(folders) - expected), "lost": lost, "corrupt": corrupt,
            "gc_rounds": int(gc_out.strip() or 0) if gc_out.strip().isdigit() else gc_out.strip()[-100:],
            "leftover_tmp": sorted(p.name for p in (store / "tmp").iterdir()) if (store / "tmp").exists() else [],
            "protection": "writers point a ref at their artifact right after publishing; the moment between "
                          "publish and ref relies on gc's grace period"}


# ----------------------------------------------------------------------------------------------
# 4. offline: the reference run with outside sockets refused
# ----------------------------------------------------------------------------------------------
GUARD = """
import os, socket
_LOG = os.environ["PREFLOOP_SOCKET_LOG"]
_LOCAL_NAMES = {"localhost", "127.0.0.1", "::1", "0.0.0.0", "", None}

def _record(what):
    with open(_LOG, "a") as handle:
        handle.write(what + "\\n")

def _local(address):
    if isinstance(address, (str, bytes)):  # AF_UNIX
        return True
    host = address[0] if address else ""
    return host in _LOCAL_NAMES or str(host).startswith("127.")

_connect, _connect_ex, _getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo

def connect(self, address):
    if not _local(address):
        _record(f"connect {address!r}")
        raise ConnectionRefusedError(f"reliability battery: outside connection to {address!r} refused")
    return _connect(self, address)

def connect_ex(self, address):
    if not _local(address):
        _record(f"connect_ex {address!r}")
        return 111
    return _connect_ex(self, address)

def getaddrinfo(host, *args, **kwargs):
    name = host.decode() if isinstance(host, bytes) else host
    if name not in _LOCAL_NAMES and not str(name).startswith("127."):
        _record(f"getaddrinfo {name!r}")
        raise socket.gaierror(f"reliability battery: name lookup of {name!r} refused")
    return _getaddrinfo(host, *args, **kwargs)

socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = connect, connect_ex, getaddrinfo
"""


def guarded_env(work: Path) -> tuple[dict[str, str], Path]:
    """Environment of a process whose outside sockets are refused, and the log of its attempts."""
    guard_dir = work / "socket-guard"
    guard_dir.mkdir(parents=True, exist_ok=True)
    (guard_dir / "sitecustomize.py").write_text(GUARD)
    log = work / "socket-attempts.log"
    log.write_text("")
    env = {**BASE_ENV, "PYTHONPATH": os.pathsep.join(filter(None, [str(guard_dir), BASE_ENV.get("PYTHONPATH")])),
           "PREFLOOP_SOCKET_LOG": str(log)}
    return env, log


def offline_reference_run(store: Path, work: Path) -> tuple[dict, float]:
    env, log = guarded_env(work)
    started = time.perf_counter()
    done = cli(["run", "--config", str(SMOKE), "--no-prefect", "--store", str(store)], env=env, timeout=900)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"the reference smoke run failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    attempts = [line for line in log.read_text().splitlines() if line]
    return {"outside_connection_attempts": len(attempts), "attempts": attempts[:20],
            "run_seconds": round(seconds, 1)}, seconds


# ----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the CI form: a few bad inputs, 3 kills, 3 writers")
    parser.add_argument("--kills", type=int, default=None, help="SIGKILLs during smoke runs (default 50; 3 quick)")
    parser.add_argument("--writers", type=int, default=None, help="concurrent writers per group (default 8; 3 quick)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--json", type=Path, help="write every figure to this JSON file")
    parser.add_argument("--markdown", type=Path, help="write the README table of bad inputs here")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one, removed at the end)")
    args = parser.parse_args(argv)
    kills = args.kills if args.kills is not None else (3 if args.quick else 50)
    writers = args.writers if args.writers is not None else (3 if args.quick else 8)
    work = args.work or Path(tempfile.mkdtemp(prefix="prefloop-reliability-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        print("reference smoke run (offline: outside sockets refused) …", flush=True)
        reference = work / "reference"
        offline, ref_seconds = offline_reference_run(reference, work)
        print(f"  {offline['run_seconds']} s, outside connection attempts: {offline['outside_connection_attempts']}")
        print("bad inputs …", flush=True)
        cases = run_bad_inputs(reference, work / "bad", args.quick)
        print(f"kills ({kills}) …", flush=True)
        kill_figures = run_kills(kills, reference, ref_seconds, work / "kills", args.seed)
        print(f"concurrent writers ({writers} same id + {writers} different ids, gc looping) …", flush=True)
        concurrency = run_concurrency(writers, work / "concurrency")
    finally:
        _unmount_all()
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    tried = [c for c in cases if not c.skipped]
    mishandled = [c for c in tried if not c.handled]
    figures = {
        "bad_inputs": {"tried": len(tried), "mishandled": len(mishandled), "skipped": len(cases) - len(tried),
                       "mishandled_cases": [f"{c.name}: {c.problem}" for c in mishandled],
                       "cases": [asdict(c) for c in cases]},
        "kills": kill_figures, "concurrency": concurrency, "offline": offline,
        "seconds": round(time.perf_counter() - started, 1),
    }
    summary = [
        ("bad inputs tried / mishandled", f"{len(tried)} / {len(mishandled)} ({len(cases) - len(tried)} skipped)"),
        ("kills survived / corrupt found / wrong recomputes",
         f"{kill_figures['survived']}/{kills} / {kill_figures['corrupt_found']} / {kill_figures['wrong_recomputes']}"
         f" (final ids differ: {kill_figures['different_final_ids']})"),
        ("concurrent writers: folders / lost / corrupt / failures",
         f"{concurrency['artifact_folders']} for {writers + 1} ids / {len(concurrency['lost'])} / "
         f"{len(concurrency['corrupt'])} / {len(concurrency['writer_failures'])} (gc rounds: {concurrency['gc_rounds']})"),
        ("offline: outside connection attempts", str(offline["outside_connection_attempts"])),
        ("total time", f"{figures['seconds']} s"),
    ]
    print("\nmishandled bad inputs:" if mishandled else "\nno mishandled bad inputs")
    for case in mishandled:
        print(f"  - {case.name}: {case.problem}")
    width = max(len(k) for k, _ in summary)
    print("\nreliability battery" + (" (quick)" if args.quick else ""))
    for key, value in summary:
        print(f"  {key.ljust(width)}  {value}")
    table = markdown_table(cases)
    if args.markdown:
        args.markdown.write_text(table + "\n", encoding="utf-8")
    if args.json:
        args.json.write_text(json.dumps({**figures, "markdown": table}, indent=2), encoding="utf-8")
    failed = (mishandled or kill_figures["corrupt_found"] or kill_figures["wrong_recomputes"]
              or kill_figures["different_final_ids"] or concurrency["lost"] or concurrency["corrupt"]
              or concurrency["writer_failures"] or concurrency["unexpected_folders"]
              or offline["outside_connection_attempts"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
