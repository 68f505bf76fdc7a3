"""The deployment files agree with the code: every stage has a deployment on the pool its spec
names, the Kubernetes GPU job template is complete, the compose file wires PostgreSQL."""

import json
from pathlib import Path

import yaml
from prefect.utilities.templating import find_placeholders

from prefloop.flows import stages as stage_flows
from prefloop.tasks.registry import deployable_stages

ROOT = Path(__file__).resolve().parents[1]


def test_every_stage_is_deployed_on_the_pool_its_spec_names():
    deployments = {d["name"]: d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]}
    for entry in deployable_stages():
        deployment = deployments.get(f"stage-{entry.name}")
        assert deployment is not None, f"prefect.yaml has no deployment 'stage-{entry.name}'"
        assert deployment["work_pool"]["name"] == entry.spec.pool == entry.pool, entry.name
        file, flow_name = deployment["entrypoint"].split(":")
        assert file == "flows/stages.py" and getattr(stage_flows, flow_name).name == f"prefloop-stage-{entry.name}"
    assert {entry.pool for entry in deployable_stages()} <= {"cpu", "gpu"}
    assert deployments["loop"]["parameters"]["dispatch"] == "pools"


def test_kubernetes_gpu_template_defines_every_placeholder_and_requests_gpus():
    template = json.loads((ROOT / "infra/k8s/gpu-base-job-template.json").read_text())
    used = {placeholder.name for placeholder in find_placeholders(template["job_configuration"])}
    defined = set(template["variables"]["properties"])
    assert used == defined, (used - defined, defined - used)
    container = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus }}"
    assert template["variables"]["properties"]["gpus"]["default"] >= 1


def test_compose_runs_prefect_on_postgres_with_a_worker_per_pool():
    compose = yaml.safe_load((ROOT / "infra/compose.postgres.yaml").read_text())["services"]
    assert compose["prefect"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert "prefect server start" in compose["prefect"]["command"]
    for pool in ("cpu", "gpu"):
        assert f"--pool {pool}" in compose[f"worker-{pool}"]["command"]
        assert (ROOT / compose[f"worker-{pool}"]["build"]["dockerfile"]).exists()
