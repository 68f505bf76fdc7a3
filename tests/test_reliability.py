"""The reliability battery's CI form: ``benchmarks/reliability.py --quick`` must find nothing wrong.

It runs a smoke loop with outside sockets refused, a handful of bad inputs through the CLI, 3
SIGKILLs with resumes and 3+3 concurrent writers with gc looping: about two minutes on 2 cores, run
by ``make test`` (the issue asks for the battery in CI in a shortened form; ``make reliability`` runs
the full one).
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BATTERY = ROOT / "benchmarks" / "reliability.py"


def _battery():
    spec = importlib.util.spec_from_file_location("reliability_battery", BATTERY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_store_digest_sees_every_change(tmp_path):
    """The byte-identity check the bad-input cases rely on: any added, removed or changed path shows."""
    battery = _battery()
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f").write_bytes(b"x")
    before = battery.tree_digest(tmp_path)
    (tmp_path / "a" / "f").write_bytes(b"y")
    (tmp_path / "tmp").mkdir()
    assert battery.tree_changes(before, battery.tree_digest(tmp_path)) == ["+tmp", "~a/f"]
    assert battery.error_line("noise\nerror: bad thing\n") == "error: bad thing"
    assert battery.error_line("Traceback (most recent call last):\n  File x\n") == ""


def test_quick_battery_finds_nothing_wrong(tmp_path):
    out = tmp_path / "figures.json"
    done = subprocess.run([sys.executable, str(BATTERY), "--quick", "--json", str(out)], capture_output=True,
                          text=True, cwd=ROOT, timeout=900)
    assert out.exists(), done.stdout[-3000:] + done.stderr[-3000:]
    figures = json.loads(out.read_text())
    report = done.stdout[-4000:]
    assert figures["bad_inputs"]["tried"] >= 8, report
    assert figures["bad_inputs"]["mishandled_cases"] == [], report
    kills = figures["kills"]
    assert (kills["corrupt_found"], kills["wrong_recomputes"], kills["different_final_ids"]) == (0, 0, 0), report
    assert kills["survived"] == kills["kills"] == 3, report
    concurrency = figures["concurrency"]
    assert concurrency["lost"] == concurrency["corrupt"] == concurrency["writer_failures"] == [], report
    assert concurrency["unexpected_folders"] == [], report
    assert figures["offline"]["outside_connection_attempts"] == 0, report
    assert done.returncode == 0, report


def test_kill_check_finds_half_visible_tampered_and_dangling(tmp_path):
    """What the kill part counts as corrupt: a folder without manifest, a damaged file, a ref to nothing."""
    import pyarrow as pa

    from prefloop.storage import ArtifactRef, ArtifactStore

    battery = _battery()
    store = ArtifactStore(tmp_path)
    for artifact_id in ("good00000000", "bad000000000"):
        with store.writer("reliability", artifact_id) as writer:
            writer.write_table(pa.table({"i": list(range(100))}))
            writer.commit(stage="reliability", stage_version="1")
        store.set_ref(f"r/{artifact_id}", ArtifactRef("reliability", artifact_id))
    assert battery.validate_store(tmp_path) == []
    part = tmp_path / "artifacts/reliability/bad000000000/data/part-00000.parquet"
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    (tmp_path / "artifacts/reliability/half00000000/data").mkdir(parents=True)
    (tmp_path / "refs/r/gone.json").write_text('{"name": "r/gone", "target": "reliability/gone00000000", "log": []}')
    problems = battery.validate_store(tmp_path)
    assert len(problems) == 3, problems
    assert any("bad000000000: validate exit" in p for p in problems)
    assert any("half00000000: folder without manifest" in p for p in problems)
    assert any("ref r/gone" in p for p in problems)


def test_socket_guard_refuses_and_records_outside_connections(tmp_path):
    """The offline check: a non-loopback connect and name lookup are refused and logged, loopback is not."""
    battery = _battery()
    env, log = battery.guarded_env(tmp_path)
    probe = ("import socket\n"
             "for target in [('10.255.255.1', 80), ('127.0.0.1', 9)]:\n"
             "    s = socket.socket(); s.settimeout(0.5)\n"
             "    try: s.connect(target)\n"
             "    except OSError: pass\n"
             "try: socket.getaddrinfo('example.com', 443)\n"
             "except OSError: pass\n")
    subprocess.run([sys.executable, "-c", probe], env=env, check=True, timeout=60)
    attempts = log.read_text().splitlines()
    assert attempts == ["connect ('10.255.255.1', 80)", "getaddrinfo 'example.com'"]
