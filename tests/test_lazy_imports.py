"""Commands that only look artifacts up must not import torch or transformers (seconds per command).

A cached rerun of a finished loop imports the config, the flows and every stage module; the heavy
libraries are bound with ``prefloop.lazy.deferred_import`` and load only when a stage computes.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from prefloop.lazy import deferred_import

HEAVY = ("torch", "transformers", "tokenizers")


def test_config_flows_and_stage_modules_import_without_torch() -> None:
    code = textwrap.dedent("""
        import importlib, pkgutil, sys
        import prefloop.cli, prefloop.config, prefloop.flows.loop, prefloop.flows.data, prefloop.flows.stages
        import prefloop.tasks, prefloop.tasks.common, prefloop.tasks.training, prefloop.backends
        for package in (prefloop.tasks, prefloop.tasks.common, prefloop.tasks.training, prefloop.backends):
            for info in pkgutil.iter_modules(package.__path__):
                importlib.import_module(f"{package.__name__}.{info.name}")
        from prefloop.tasks.registry import STAGES
        specs = [entry.spec for entry in STAGES.values()]
        assert len(specs) == len(STAGES)
        loaded = sorted(name for name in sys.modules if name.split(".")[0] in {heavy})
        print(loaded)
        assert not loaded, loaded
    """).replace("{heavy}", repr(set(HEAVY)))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_deferred_module_imports_on_first_use_and_caches_attributes() -> None:
    import json

    proxy = deferred_import("json")
    assert "dumps" not in vars(proxy)
    assert proxy.dumps({"a": 1}) == '{"a": 1}'
    assert vars(proxy)["dumps"] is json.dumps  # cached: later reads are plain attribute lookups
    assert proxy.__name__ == "json"


def test_deferred_module_forwards_patches_to_the_real_module(monkeypatch) -> None:
    import json

    proxy = deferred_import("json")
    assert proxy.dumps is json.dumps
    monkeypatch.setattr(proxy, "dumps", lambda value: "patched")
    assert json.dumps(1) == "patched" and proxy.dumps(1) == "patched"
    monkeypatch.undo()
    assert proxy.dumps(1) == "1"
