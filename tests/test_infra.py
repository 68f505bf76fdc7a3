"""The deployment files agree with the code and with the schemas they are read by.

- every stage has a deployment on the pool its spec names;
- the Kubernetes GPU base job template renders, the way prefect-kubernetes' worker renders it, into
  a Job that conforms to the Kubernetes API schema (the `kubernetes` client's models, unknown fields
  refused), with each gpu deployment's job_variables from prefect.yaml and with overrides;
- the Dockerfiles, read statically: every COPY source exists and reaches the build context (the
  per-Dockerfile .dockerignore), every package folder `pip install .` needs is copied, the pinned
  torch is the Makefile's and within pyproject's range, every command they (and the compose file)
  start exists in the CLI or is a worker of one of prefloop's pools, the store lies on the volume;
- the CPU worker image builds and runs a stage against a mounted store where a container runtime
  answers (slow; skipped with the reason elsewhere);
- the compose file wires PostgreSQL (tests/test_infra_postgres.py runs the server on it).
"""

import copy
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import prefect
import pytest
import yaml
from packaging.requirements import Requirement
from prefect.utilities.templating import find_placeholders

from prefloop.flows import deploy
from prefloop.flows import stages as stage_flows
from prefloop.storage import ArtifactStore
from prefloop.tasks.registry import deployable_stages

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "infra/k8s/gpu-base-job-template.json"
DOCKERFILES = {"cpu": ROOT / "infra/Dockerfile.cpu", "gpu": ROOT / "infra/Dockerfile.gpu"}
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PREFECT_YAML = yaml.safe_load((ROOT / "prefect.yaml").read_text())
COMPOSE = yaml.safe_load((ROOT / "infra/compose.postgres.yaml").read_text())["services"]


def test_every_stage_is_deployed_on_the_pool_its_spec_names():
    deployments = {d["name"]: d for d in PREFECT_YAML["deployments"]}
    for entry in deployable_stages():
        deployment = deployments.get(f"stage-{entry.name}")
        assert deployment is not None, f"prefect.yaml has no deployment 'stage-{entry.name}'"
        assert deployment["work_pool"]["name"] == entry.spec.pool == entry.pool, entry.name
        file, flow_name = deployment["entrypoint"].split(":")
        assert file == "flows/stages.py" and getattr(stage_flows, flow_name).name == f"prefloop-stage-{entry.name}"
    assert {entry.pool for entry in deployable_stages()} <= {"cpu", "gpu"}
    assert deployments["loop"]["parameters"]["dispatch"] == "pools"


# --- Kubernetes ---------------------------------------------------------------------------------------


def test_kubernetes_gpu_template_defines_every_placeholder_and_requests_gpus():
    template = json.loads(TEMPLATE.read_text())
    used = {placeholder.name for placeholder in find_placeholders(template["job_configuration"])}
    defined = set(template["variables"]["properties"])
    assert used == defined, (used - defined, defined - used)
    container = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus }}"
    assert template["variables"]["properties"]["gpus"]["default"] >= 1


@pytest.fixture(scope="module")
def k8s_render():
    """infra/k8s/render.py as a module (prefect-kubernetes and kubernetes must be installed)."""
    pytest.importorskip("prefect_kubernetes", reason="pip install prefect-kubernetes (brings kubernetes)")
    pytest.importorskip("kubernetes")
    spec = importlib.util.spec_from_file_location("prefloop_k8s_render", ROOT / "infra/k8s/render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def gpu_deployments() -> list[str]:
    return [d["name"] for d in PREFECT_YAML["deployments"] if d["work_pool"]["name"] == "gpu"]


def test_every_gpu_deployment_renders_to_a_valid_kubernetes_job(k8s_render):
    template = k8s_render.load_template()
    assert gpu_deployments(), "prefect.yaml has no deployment on the gpu pool"
    for name in gpu_deployments():
        job_variables = k8s_render.deployment_job_variables(name)
        manifest = k8s_render.render_job(template, job_variables, deployment_name=name)
        assert k8s_render.schema_errors(manifest) == [], name
        pod = manifest["spec"]["template"]["spec"]
        container = pod["containers"][0]
        defaults = {key: spec.get("default") for key, spec in template["variables"]["properties"].items()}
        expected = defaults | job_variables
        assert container["resources"]["limits"]["nvidia.com/gpu"] == expected["gpus"] >= 1, name
        assert container["image"] == expected["image"]
        # The worker's command starts the flow run; the env mapping became Kubernetes' EnvVar list.
        assert container["args"] == ["prefect", "flow-run", "execute"]
        env = {item["name"]: item["value"] for item in container["env"]}
        assert env["PREFLOOP_STORE"].startswith("/data/") and "PREFECT__FLOW_RUN_ID" in env
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
        assert claims == [expected["store_claim"]]
        assert manifest["metadata"]["labels"]["prefect.io/deployment-name"] == name
        assert manifest["metadata"]["generateName"].endswith("-")


def test_job_variables_override_the_pool_defaults_and_still_validate(k8s_render):
    template = k8s_render.load_template()
    overrides = {"gpus": 4, "image": "registry.example/prefloop-gpu:1.2", "memory": "200Gi",
                 "env": {"PREFLOOP_STORE": "s3://bucket/store"}, "node_selector": {"gpu": "h100"}}
    manifest = k8s_render.render_job(template, overrides)
    assert k8s_render.schema_errors(manifest) == []
    pod = manifest["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"] == {"memory": "200Gi", "nvidia.com/gpu": 4}
    assert container["image"] == overrides["image"] and pod["nodeSelector"] == {"gpu": "h100"}
    env = {item["name"]: item["value"] for item in container["env"]}
    # A deployment's env is merged into the pool's default env, not put in its place.
    assert env["PREFLOOP_STORE"] == "s3://bucket/store" and env["PREFLOOP_PROJECT_DIR"] == "/opt/prefloop"


def test_the_schema_check_refuses_what_kubernetes_refuses(k8s_render):
    manifest = k8s_render.render_job(k8s_render.load_template(), {})
    assert k8s_render.schema_errors(manifest) == []

    def broken(change):
        bad = copy.deepcopy(manifest)
        change(bad["spec"]["template"]["spec"], bad)
        return "\n".join(k8s_render.schema_errors(bad))

    # A field put one level off (tolerations belong to the pod, not the container).
    assert "containers[0].tolerations: unknown field of V1Container" in broken(
        lambda pod, _: pod["containers"][0].__setitem__("tolerations", pod["tolerations"]))
    assert "spec.backoffLimt: unknown field of V1JobSpec" in broken(
        lambda _, job: job["spec"].__setitem__("backoffLimt", 0))
    assert "is not a Kubernetes quantity" in broken(
        lambda pod, _: pod["containers"][0]["resources"]["limits"].__setitem__("memory", "64GB"))
    assert "expected a list" in broken(lambda pod, _: pod["containers"][0].__setitem__("args", "prefect run"))
    assert "is not a valid label value" in broken(
        lambda _, job: job["metadata"]["labels"].__setitem__("prefloop/stage", "stage train"))
    assert "name" in broken(lambda pod, _: pod["containers"][0].pop("name"))  # required field


# --- Dockerfiles, statically ----------------------------------------------------------------------------


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    joined, current = [], ""
    for line in dockerfile.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        joined.append(current)
        current = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1]) for text in joined]


def copy_sources(dockerfile: Path) -> list[str]:
    sources = []
    for op, args in instructions(dockerfile):
        words = [w for w in shlex.split(args) if not w.startswith("--")]
        if op in ("COPY", "ADD") and "--from" not in args:
            sources += words[:-1]
    return sources


def ignore_rules(dockerfile: Path) -> tuple[list[str], list[str]]:
    """(excluded patterns, re-included paths) of the Dockerfile's own .dockerignore."""
    lines = [line.strip() for line in Path(f"{dockerfile}.dockerignore").read_text().splitlines()]
    rules = [line for line in lines if line and not line.startswith("#")]
    return [r for r in rules if not r.startswith("!")], [r[1:] for r in rules if r.startswith("!")]


@pytest.mark.parametrize("pool", DOCKERFILES)
def test_every_copy_source_exists_and_reaches_the_build_context(pool):
    dockerfile = DOCKERFILES[pool]
    sources = copy_sources(dockerfile)
    assert sources, f"{dockerfile.name} copies nothing"
    missing = [s for s in sources if not (ROOT / s).exists()]
    assert not missing, f"{dockerfile.name} copies {missing}, which are not in the repository"
    excluded, included = ignore_rules(dockerfile)
    assert excluded[0] == "*", "the .dockerignore is an allow-list: '*' first, then '!path' per COPY source"
    assert sorted(sources) == sorted(included), (
        f"{dockerfile.name}.dockerignore lets in {sorted(included)} but the image copies {sorted(sources)}")
    # `pip install .` builds the packages pyproject maps from these folders: each must be in the image.
    package_dirs = set(PYPROJECT["tool"]["setuptools"]["package-dir"].values())
    assert package_dirs <= set(sources), package_dirs - set(sources)
    assert {"pyproject.toml", PYPROJECT["project"]["readme"]} <= set(sources)


def pip_pins(dockerfile: Path) -> dict[str, str]:
    """name -> version of every `pkg==version` pip installs into prefloop's environment (the separate
    vLLM environment, /opt/vllm, has its own pins and is left out)."""
    pins = {}
    for op, args in instructions(dockerfile):
        for command in args.split("&&") if op == "RUN" else []:
            if "pip install" not in command or "/opt/vllm" in command:
                continue
            for word in shlex.split(command):
                if match := re.fullmatch(r"([A-Za-z0-9_.-]+)==([A-Za-z0-9_.+-]+)", word):
                    pins[match.group(1).lower()] = match.group(2)
    return pins


@pytest.mark.parametrize("pool", DOCKERFILES)
def test_pinned_packages_match_the_makefile_and_pyproject(pool):
    pins = pip_pins(DOCKERFILES[pool])
    makefile_torch = re.search(r"torch==([0-9][0-9.]*)", (ROOT / "Makefile").read_text()).group(1)
    assert pins.get("torch") == makefile_torch, (pins, makefile_torch)
    requirements = {Requirement(r).name.lower(): Requirement(r) for r in PYPROJECT["project"]["dependencies"]}
    for name, version in pins.items():
        if name in requirements:
            assert requirements[name].specifier.contains(version, prereleases=True), (
                f"{DOCKERFILES[pool].name} pins {name}=={version}, outside pyproject's {requirements[name]}")
    base = next(args for op, args in instructions(DOCKERFILES[pool]) if op == "FROM")
    python = re.match(r"python:(\d+\.\d+)", base).group(1)
    from packaging.specifiers import SpecifierSet
    assert SpecifierSet(PYPROJECT["project"]["requires-python"]).contains(f"{python}.0"), base


def cli_commands() -> set[str]:
    import typer

    from prefloop.cli import app
    return set(typer.main.get_command(app).commands)


def check_command(argv: list[str], where: str) -> None:
    """A command an image or service starts is a prefloop sub-command, or a Prefect worker of a
    prefloop pool of the pool's worker type, or the Prefect server."""
    program, *rest = argv
    if program == "prefloop":
        assert "prefloop" in PYPROJECT["project"]["scripts"], where
        assert rest and (rest[0] in cli_commands() or rest[0] == "--help"), f"{where}: no 'prefloop {rest[:1]}'"
    elif program == "prefect" and rest[:2] == ["worker", "start"]:
        options = dict(zip(rest[2::2], rest[3::2], strict=False))
        pool = options.get("--pool")
        assert pool in deploy.WORK_POOLS, f"{where}: pool {pool!r} is not one of {list(deploy.WORK_POOLS)}"
        assert options.get("--type") == deploy.WORK_POOLS[pool], f"{where}: pool {pool} takes type " \
            f"{deploy.WORK_POOLS[pool]}, not {options.get('--type')}"
    else:
        assert program == "prefect" and rest[:2] == ["server", "start"], f"{where}: unknown command {argv}"


def usage_commands(dockerfile: Path, image: str) -> list[list[str]]:
    """The commands after IMAGE in the `docker run ... IMAGE COMMAND` lines of the header comment."""
    commands, text = [], ""
    for line in dockerfile.read_text().splitlines():
        if not line.startswith("#"):
            break
        text += line.lstrip("#").strip()
        if text.endswith("\\"):
            text = text[:-1] + " "
            continue
        words, text = (shlex.split(text) if text.startswith("docker run ") else []), ""
        if image in words:
            commands.append(words[words.index(image) + 1:])
    return commands


def test_every_started_command_exists():
    for pool, dockerfile in DOCKERFILES.items():
        cmd = next(args for op, args in reversed(instructions(dockerfile)) if op in ("CMD", "ENTRYPOINT"))
        check_command(json.loads(cmd), dockerfile.name)
        # The `docker run` usage lines at the top of each Dockerfile start commands too.
        usage = usage_commands(dockerfile, f"prefloop-{pool}")
        assert usage, f"{dockerfile.name} has no 'docker run ... prefloop-{pool} COMMAND' usage line"
        for argv in usage:
            check_command(argv, f"{dockerfile.name} usage")
    for name, service in COMPOSE.items():
        if "command" in service:
            check_command(shlex.split(service["command"]), f"compose service {name}")


def environment(dockerfile: Path) -> dict[str, str]:
    env = {}
    for op, args in instructions(dockerfile):
        if op == "ENV":
            env |= dict(word.split("=", 1) for word in shlex.split(args))
    return env


@pytest.mark.parametrize("pool", DOCKERFILES)
def test_the_store_lies_on_the_volume_every_runner_mounts(pool):
    dockerfile = DOCKERFILES[pool]
    env = environment(dockerfile)
    volume = next(args for op, args in instructions(dockerfile) if op == "VOLUME").strip()
    assert env["PREFLOOP_STORE"].startswith(volume + "/"), (env["PREFLOOP_STORE"], volume)
    workdir = next(args for op, args in instructions(dockerfile) if op == "WORKDIR").strip()
    assert env["PREFLOOP_PROJECT_DIR"] == workdir  # prefect.yaml's pull step cds there
    assert f"store:{volume}" in COMPOSE[f"worker-{pool}"]["volumes"]
    if pool == "gpu":
        template = json.loads(TEMPLATE.read_text())
        container = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
        mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
        assert mounts["store"] == volume
        assert template["variables"]["properties"]["env"]["default"] == {
            "PREFLOOP_STORE": env["PREFLOOP_STORE"], "PREFLOOP_PROJECT_DIR": env["PREFLOOP_PROJECT_DIR"]}


def test_compose_runs_prefect_on_postgres_with_a_worker_per_pool():
    assert COMPOSE["prefect"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert "prefect server start" in COMPOSE["prefect"]["command"]
    # The server image is the Prefect the project runs (client and server of one version).
    image_version = re.match(r"prefecthq/prefect:([0-9.]+)-python", COMPOSE["prefect"]["image"]).group(1)
    assert image_version == prefect.__version__ == PREFECT_YAML["prefect-version"]
    for pool in ("cpu", "gpu"):
        assert f"--pool {pool}" in COMPOSE[f"worker-{pool}"]["command"]
        assert (ROOT / COMPOSE[f"worker-{pool}"]["build"]["dockerfile"]).exists()


# --- The CPU image, built and run -----------------------------------------------------------------------


def container_runtime() -> tuple[str | None, str]:
    """(the docker or podman executable that answers, "") or (None, why none does)."""
    reasons = []
    for name in ("docker", "podman"):
        executable = shutil.which(name)
        if executable is None:
            reasons.append(f"no {name} on PATH")
            continue
        try:
            probe = subprocess.run([executable, "info"], capture_output=True, text=True, timeout=30)
        except subprocess.TimeoutExpired:
            reasons.append(f"'{name} info' did not answer within 30 s")
            continue
        if probe.returncode == 0:
            return executable, ""
        last = (probe.stderr.strip().splitlines() or ["(no output)"])[-1]
        reasons.append(f"'{name} info' failed (only the client is installed?): {last}")
    return None, "; ".join(reasons)


@pytest.mark.slow
def test_cpu_image_builds_and_runs_a_stage_against_a_mounted_store(tmp_path):
    runtime, reason = container_runtime()
    if runtime is None:
        pytest.skip(f"no container runtime answers here: {reason}")
    tag = "prefloop-cpu:test"
    # The CPU wheel of torch is a few hundred MB where PyPI's default is several GB of CUDA packages.
    torch_args = os.environ.get("PREFLOOP_TORCH_PIP_ARGS", "--index-url https://download.pytorch.org/whl/cpu")
    build = subprocess.run([runtime, "build", "-f", "infra/Dockerfile.cpu", "-t", tag,
                            "--build-arg", f"TORCH_PIP_ARGS={torch_args}", "."],
                           cwd=ROOT, capture_output=True, text=True, timeout=3600)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    default = subprocess.run([runtime, "run", "--rm", tag], capture_output=True, text=True, timeout=300)
    assert default.returncode == 0 and "stage" in default.stdout, default.stdout + default.stderr

    data = tmp_path / "data"
    data.mkdir()
    # As the caller's user, so the store's files are the caller's; Prefect's home on the volume too.
    run = subprocess.run([runtime, "run", "--rm", "--user", f"{os.getuid()}:{os.getgid()}",
                          "-e", "HOME=/data", "-e", "PREFECT_HOME=/data/prefect-home", "-v", f"{data}:/data",
                          tag, "prefloop", "stage", "prompts", "--config", "configs/smoke.yaml",
                          "--name", "smoke/prompts"], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    store = ArtifactStore(data / "store")  # the image's PREFLOOP_STORE, /data/store, seen from the host
    ref = store.refs()["smoke/prompts"]
    store.verify(ref)
    smoke = yaml.safe_load((ROOT / "configs/smoke.yaml").read_text())["prompts"]
    assert store.read_table(ref).num_rows == smoke["n_train"] + smoke["n_heldout"]


def test_container_runtime_reports_why_none_answers(monkeypatch, tmp_path):
    """The skip reason names what is missing; a runtime that answers `info` is taken."""
    monkeypatch.setenv("PATH", str(tmp_path))
    assert container_runtime() == (None, "no docker on PATH; no podman on PATH")
    fake = tmp_path / "podman"
    fake.write_text("#!/bin/sh\n[ \"$1\" = info ] && exit 0\nexit 1\n")
    fake.chmod(0o755)
    broken = tmp_path / "docker"
    broken.write_text("#!/bin/sh\necho 'Cannot connect to the Docker daemon' >&2\nexit 1\n")
    broken.chmod(0o755)
    assert container_runtime() == (str(fake), "")
    fake.unlink()
    runtime, reason = container_runtime()
    assert runtime is None and "'docker info' failed" in reason and "Cannot connect" in reason


def test_the_project_directory_can_be_named_for_an_installed_package(tmp_path, monkeypatch):
    from prefloop.flows.deploy import project_dir

    # The images install prefloop non-editable and set PREFLOOP_PROJECT_DIR to their copy of the project.
    (tmp_path / "prefect.yaml").write_text("name: prefloop\n")
    monkeypatch.setenv("PREFLOOP_PROJECT_DIR", str(tmp_path))
    assert project_dir() == tmp_path
    monkeypatch.setenv("PREFLOOP_PROJECT_DIR", str(tmp_path / "elsewhere"))  # no prefect.yaml there: the checkout
    assert (project_dir() / "prefect.yaml").exists() and project_dir() != tmp_path / "elsewhere"
