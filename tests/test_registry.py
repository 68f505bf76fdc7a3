"""The stage registry is the single list of stages, and the layers stay apart.

- every stage spec in the code, every loop-config section, every per-stage flow, every stage
  deployment in prefect.yaml and every CLI stage choice is named by the registry, and the reverse;
- no stage module imports Prefect, and the pure cores run with Prefect unimportable;
- reading a loop config imports no compute machinery (models, backends, trainers, Prefect);
- stages share code through ``prefloop.tasks.common``, never by importing each other, and every
  module imports on its own (no import cycles);
- every module says what it owns, and none is over 400 lines without saying why;
- importing prefloop changes no environment variable.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml
from prefect import Flow
from typer.testing import CliRunner

from prefloop.cli import app
from prefloop.config import LoopConfig, LoopSettings
from prefloop.flows import stages as stage_flows
from prefloop.stage import StageSpec
from prefloop.tasks.registry import STAGES, deployable_stages

ROOT = Path(__file__).resolve().parents[1]
# The import roots of the project (the design card's folders are mapped into the prefloop namespace).
PACKAGES = ("prefloop", "prefloop.tasks", "prefloop.flows", "prefloop.storage", "prefloop.datasets_spec")
LINE_LIMIT = 400
SIZE_REASON = "over 400 lines:"  # the phrase a longer module's docstring uses to say why


def project_modules(root: str = "") -> list[str]:
    names: set[str] = set()
    for package_name in PACKAGES:
        package = importlib.import_module(package_name)
        names.add(package_name)
        for info in pkgutil.walk_packages(package.__path__, prefix=f"{package_name}."):
            names.add(info.name)
    return sorted(name for name in names if name.startswith(root))


def module_file(name: str) -> Path:
    return Path(importlib.util.find_spec(name).origin)


def run_python(code: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


# ---------------------------------------------------------------------------------------------
# one list
# ---------------------------------------------------------------------------------------------
def test_every_stage_spec_in_the_code_is_registered_and_agrees_with_its_entry() -> None:
    specs: dict[str, StageSpec] = {}
    for name in project_modules("prefloop.tasks"):
        for value in vars(importlib.import_module(name)).values():
            if isinstance(value, StageSpec):
                specs[value.name] = value
    assert set(specs) == set(STAGES), (set(specs) ^ set(STAGES))
    for entry in STAGES.values():
        spec = entry.spec
        assert spec is specs[entry.name], entry.name
        assert (spec.name, spec.output_kind, dict(spec.inputs), spec.optional_inputs, spec.pool) == (
            entry.name, entry.output, dict(entry.inputs), entry.optional_inputs, entry.pool), entry.name
        assert entry.optional_inputs <= set(entry.inputs), entry.name


def test_loop_config_sections_are_the_registry_sections() -> None:
    sections = {section.field: entry for entry in STAGES.values() for section in entry.sections}
    stage_fields = set(LoopConfig.model_fields) - set(LoopSettings.model_fields)
    assert stage_fields == set(sections)
    for field, entry in sections.items():
        annotation = LoopConfig.model_fields[field].annotation
        accepted = getattr(annotation, "__args__", (annotation,))
        assert entry.spec.config_model in accepted, field
        assert isinstance(getattr(LoopConfig(), field), entry.spec.config_model), field


def test_flows_deployments_and_cli_choices_are_the_registry_stages() -> None:
    deployable = {entry.name: entry for entry in deployable_stages()}
    flows = {name: value for name, value in vars(stage_flows).items() if isinstance(value, Flow)}
    assert set(flows) == {entry.flow_attribute for entry in deployable.values()}
    assert set(stage_flows.STAGE_FLOWS) == set(deployable)
    for entry in deployable.values():
        assert flows[entry.flow_attribute].name == entry.flow_name

    deployments = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    stage_deployments = {d["name"]: d for d in deployments if d["entrypoint"].startswith("flows/stages.py:")}
    missing = [f"  - {{name: {entry.deployment}, entrypoint: flows/stages.py:{entry.flow_attribute}, work_pool: *{entry.pool}}}"
               for entry in deployable.values() if entry.deployment not in stage_deployments]
    assert not missing, "prefect.yaml lacks the deployments of registered stages; add:\n" + "\n".join(missing)
    assert set(stage_deployments) == {entry.deployment for entry in deployable.values()}
    for entry in deployable.values():
        deployment = stage_deployments[entry.deployment]
        assert deployment["entrypoint"] == f"flows/stages.py:{entry.flow_attribute}", entry.name
        assert deployment["work_pool"]["name"] == entry.pool, entry.name
    for deployment in deployments:  # every other deployment points at a flow that exists
        file, attribute = deployment["entrypoint"].split(":")
        module = importlib.import_module("prefloop.flows." + Path(file).stem)
        assert isinstance(getattr(module, attribute), Flow), deployment["name"]

    listed = CliRunner().invoke(app, ["stages"])
    assert listed.exit_code == 0, listed.output
    first_cells = [line.replace("│", " ").split()[:1] for line in listed.output.splitlines()]
    shown = {cell[0] for cell in first_cells if cell and cell[0] in STAGES}
    assert shown == set(deployable)
    unknown = CliRunner().invoke(app, ["stage", "no-such-stage"])
    assert unknown.exit_code == 2 and "no stage named 'no-such-stage'" in unknown.output
    assert all(name in unknown.output for name in deployable)


# ---------------------------------------------------------------------------------------------
# layers
# ---------------------------------------------------------------------------------------------
def test_stage_cores_need_no_prefect(tmp_path) -> None:
    """Every stage module (and the loop config) imports with Prefect made unimportable, and a stage
    computes and publishes its artifact without it."""
    out = run_python(f"""
        import importlib, sys

        class NoPrefect:
            def find_spec(self, name, path=None, target=None):
                if name == "prefect" or name.startswith("prefect."):
                    raise ImportError(f"{{name}} is blocked in this test")
                return None

        sys.meta_path.insert(0, NoPrefect())
        import prefloop.config
        from prefloop.storage import ArtifactStore
        from prefloop.tasks.registry import STAGES, run_stage
        for entry in STAGES.values():
            entry.load()
        result = run_stage("prompts", {{}}, {{"n_train": 4, "n_heldout": 2}}, ArtifactStore({str(tmp_path)!r}))
        print(result.rows, sorted(m for m in sys.modules if m.split(".")[0] == "prefect"))
    """)
    assert out.split() == ["6", "[]"]


def test_reading_a_loop_config_imports_no_compute_machinery() -> None:
    heavy = ("torch", "transformers", "tokenizers", "prefect", "prefloop.backends.hf", "prefloop.backends.vllm",
             "prefloop.forward", "prefloop.orchestration", "prefloop.flows", "prefloop.tasks.training.optim",
             "prefloop.tasks.training.recipes")
    out = run_python(f"""
        import sys
        from prefloop.config import load_loop_config
        for name in ("demo", "mcts_dpo", "rso", "smoke"):
            load_loop_config(f"{ROOT}/configs/{{name}}.yaml")
        heavy = {heavy!r}
        print(sorted(m for m in sys.modules if m.startswith(heavy)))
    """)
    assert out.strip() == "[]", out


def _stage_units() -> dict[str, str]:
    """Each stage's unit: its module, or the package of a stage module named ``stage``."""
    units = {}
    for entry in STAGES.values():
        unit = entry.module.removesuffix(".stage")
        units[unit] = entry.name
    return units


def _imported_modules(name: str) -> set[str]:
    tree = ast.parse(module_file(name).read_text(encoding="utf-8"))
    found = set()
    package = name if module_file(name).name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return found


def test_stages_share_code_only_through_the_common_layer() -> None:
    units = _stage_units()

    def unit_of(module: str) -> str | None:
        return next((unit for unit in units if module == unit or module.startswith(unit + ".")), None)

    problems = []
    for name in project_modules("prefloop.tasks"):
        own = unit_of(name)
        in_common = name.startswith("prefloop.tasks.common")
        if own is None and not in_common:
            continue
        for imported in _imported_modules(name):
            other = unit_of(imported)
            if other is not None and other != own:
                problems.append(f"{name} imports {imported} (stage '{units[other]}')")
    assert not problems, "\n".join(problems)


def test_every_module_imports_on_its_own() -> None:
    """No import cycles: each module imports first in an interpreter that has loaded no project module."""
    out = run_python(f"""
        import importlib, sys, traceback
        failed = []
        for name in {project_modules()!r}:
            for loaded in [m for m in sys.modules if m == "prefloop" or m.startswith("prefloop.")]:
                del sys.modules[loaded]
            try:
                importlib.import_module(name)
            except Exception:
                failed.append(name + ": " + traceback.format_exc(limit=3))
        print(len(failed))
        print("\\n".join(failed))
    """)
    assert out.splitlines()[0] == "0", out


# ---------------------------------------------------------------------------------------------
# module hygiene
# ---------------------------------------------------------------------------------------------
def test_every_module_says_what_it_owns_and_long_ones_say_why() -> None:
    problems = []
    for name in project_modules():
        source = module_file(name).read_text(encoding="utf-8")
        docstring = ast.get_docstring(ast.parse(source)) or ""
        if not docstring.strip():
            problems.append(f"{name}: no module docstring")
        lines = source.count("\n")
        if lines > LINE_LIMIT and SIZE_REASON not in docstring.lower():
            problems.append(f"{name}: {lines} lines and no '{SIZE_REASON}' reason in its docstring")
    assert not problems, "\n".join(problems)


def test_importing_prefloop_changes_no_environment_variable() -> None:
    env = {key: value for key, value in os.environ.items()
           if key not in ("PREFECT_HOME", "DO_NOT_TRACK", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM",
                          "PREFECT_SERVER_ANALYTICS_ENABLED", "GX_ANALYTICS_ENABLED")}
    out = run_python("""
        import json, os
        before = dict(os.environ)
        import prefloop, prefloop.config, prefloop.stage, prefloop.storage, prefloop.report
        from prefloop.tasks.registry import STAGES
        for entry in STAGES.values():
            entry.load()
        after = dict(os.environ)
        print(json.dumps(sorted(set(after.items()) ^ set(before.items()))))
    """, env=env)
    assert json.loads(out) == []
