"""Render the Kubernetes Job that a ``gpu``-pool stage run gets, and check it against the Kubernetes API schema.

Rendering is prefect-kubernetes' own, the two steps its worker takes for every flow run:
``KubernetesWorkerJobConfiguration.from_template_and_values`` fills the base job template's
``{{ placeholders }}`` from the work pool's variable defaults overlaid with the deployment's
``job_variables`` (``work_pool.job_variables`` in ``prefect.yaml``, then any overrides given here),
and ``prepare_for_flow_run`` turns the result into a manifest (the ``env`` mapping becomes a list of
``EnvVar``, the command string becomes ``args``, labels are slugified, ``generateName`` is set).

The manifest is then checked against the models of the ``kubernetes`` Python client, which are
generated from the Kubernetes OpenAPI schema: every key must be a field of the model at its place
(the client itself silently drops unknown keys, so this walk is ours), every value of the field's
type, every quantity parseable (``kubernetes.utils.parse_quantity``), every label a valid label, and
the deserialized ``V1Job`` must have its required fields (the client's own client-side validation).

    pip install prefect-kubernetes           # brings the kubernetes client
    .venv/bin/python infra/k8s/render.py --deployment stage-train --set gpus=2 \\
        --set env.PREFLOOP_STORE=s3://bucket/store

prints the Job as JSON, or the schema errors (exit code 1).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import types
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "infra" / "k8s" / "gpu-base-job-template.json"

# prefect-kubernetes (0.8) refuses a manifest without these two keys in the *pod* spec (its
# ``_get_base_job_manifest`` check), although they are Job fields; the API server drops them with a
# warning (unknown fields are "Warn", not "Strict", by default), so they are the only tolerated extras.
PREFECT_REQUIRED_EXTRAS = {"spec.template.spec.parallelism", "spec.template.spec.completions"}

# Fields whose Kubernetes type is resource.Quantity: the OpenAPI schema (and so the client) says
# string, but the API accepts a JSON number too, which is what a bare integer placeholder renders to.
QUANTITY_FIELDS = {("V1ResourceRequirements", "limits"), ("V1ResourceRequirements", "requests"),
                   ("V1EmptyDirVolumeSource", "size_limit")}
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
# The client's type names: "List[V1Container]", "Dict[str, str]", "Optional[...]" (kubernetes >= 35),
# "list[V1Container]", "dict(str, str)" before.
_LIST = re.compile(r"^[Ll]ist\[(.*)\]$")
_DICT = re.compile(r"^(?:Dict\[|dict\()[^,]*, (.*)[\])]$")
_OPTIONAL = re.compile(r"^Optional\[(.*)\]$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def load_template(path: Path = TEMPLATE) -> dict[str, Any]:
    return json.loads(path.read_text())


def deployment_job_variables(name: str, prefect_yaml: Path = ROOT / "prefect.yaml") -> dict[str, Any]:
    """The ``job_variables`` a deployment of ``prefect.yaml`` gives its work pool ({} when none)."""
    deployments = {d["name"]: d for d in yaml.safe_load(prefect_yaml.read_text())["deployments"]}
    if name not in deployments:
        raise KeyError(f"prefect.yaml has no deployment '{name}' (it has: {', '.join(sorted(deployments))})")
    return dict(deployments[name].get("work_pool", {}).get("job_variables") or {})


class _NoApi:
    """Stands in for the Prefect client: the template references no blocks or Prefect variables, so
    rendering never calls the API (an attribute lookup here would mean it tried to, and fails loudly)."""


def render_job(template: dict[str, Any], job_variables: dict[str, Any], deployment_name: str = "stage-train",
               flow_name: str | None = None, flow_run_name: str = "render-check") -> dict[str, Any]:
    """The Job manifest prefect-kubernetes' worker would submit for one flow run of the deployment (its
    flow named after it, ``prefloop-<deployment>``, as prefloop names its stage flows)."""
    from prefect.client.schemas.objects import Flow, FlowRun
    from prefect.client.schemas.responses import DeploymentResponse
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    configuration = asyncio.run(KubernetesWorkerJobConfiguration.from_template_and_values(
        base_job_template=template, values=job_variables, client=_NoApi()))
    flow = Flow(name=flow_name or f"prefloop-{deployment_name}")
    deployment = DeploymentResponse(name=deployment_name, flow_id=flow.id, job_variables=job_variables)
    flow_run = FlowRun(flow_id=flow.id, name=flow_run_name, deployment_id=deployment.id)
    configuration.prepare_for_flow_run(flow_run=flow_run, deployment=deployment, flow=flow,
                                       worker_name="render-check")
    return configuration.job_manifest


def schema_errors(manifest: dict[str, Any], kind: str = "V1Job") -> list[str]:
    """Every place where ``manifest`` departs from the Kubernetes schema of ``kind``; [] when it conforms."""
    from kubernetes import client

    errors: list[str] = []
    normalized = _walk(manifest, kind, "", errors, client)
    errors += _label_errors(manifest)
    if errors:
        return errors
    # Then the client's own model: required fields (a container's name) and value types. From
    # kubernetes 35 on the models are pydantic with extra="forbid", which repeats the unknown-field
    # check; older clients check required fields when deserializing.
    model = getattr(client.models, kind)
    try:
        if hasattr(model, "model_validate"):
            model.model_validate(normalized)
        else:
            client.ApiClient().deserialize(types.SimpleNamespace(data=json.dumps(normalized)), kind)
    except ValueError as error:  # pydantic's ValidationError is a ValueError
        errors.append(f"{kind}: {error}")
    return errors


def _walk(value: Any, type_name: str, path: str, errors: list[str], client: Any, quantity: bool = False) -> Any:
    """Check ``value`` against the client's type ``type_name``, appending to ``errors``; returns the value
    with numeric quantities as strings and the tolerated extras dropped (what the client's model takes)."""
    where = path or "(root)"
    if value is None:
        return None  # an unset optional field; required ones are the client model's check
    type_name = _OPTIONAL.sub(r"\1", type_name)
    if (match := _LIST.match(type_name)):
        if not isinstance(value, list):
            errors.append(f"{where}: expected a list, got {type(value).__name__} {value!r}")
            return value
        return [_walk(item, match.group(1), f"{path}[{index}]", errors, client, quantity)
                for index, item in enumerate(value)]
    if (match := _DICT.match(type_name)):
        if not isinstance(value, dict):
            errors.append(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
            return value
        return {key: _walk(item, match.group(1), f"{path}.{key}", errors, client, quantity)
                for key, item in value.items()}
    if quantity:
        _check_quantity(value, where, errors)
        return str(value)
    if type_name in _PRIMITIVES:
        if not _PRIMITIVES[type_name](value):
            errors.append(f"{where}: expected {type_name}, got {type(value).__name__} {value!r}")
        return value
    if type_name == "object":
        return value  # IntOrString and free-form fields
    model = getattr(client.models, type_name)
    if not isinstance(value, dict):
        errors.append(f"{where}: expected a {type_name} mapping, got {type(value).__name__} {value!r}")
        return value
    attributes = {json_key: attribute for attribute, json_key in model.attribute_map.items()}
    checked = {}
    for key, item in value.items():
        field_path = f"{path}.{key}" if path else key
        if key not in attributes:
            if field_path not in PREFECT_REQUIRED_EXTRAS:
                errors.append(f"{field_path}: unknown field of {type_name} (known: {', '.join(sorted(attributes))})")
            continue
        attribute = attributes[key]
        checked[key] = _walk(item, model.openapi_types[attribute], field_path, errors, client,
                             (type_name, attribute) in QUANTITY_FIELDS)
    return checked


_PRIMITIVES = {
    "str": lambda v: isinstance(v, str),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
    "datetime": lambda v: isinstance(v, str),
    "date": lambda v: isinstance(v, str),
}


def _check_quantity(value: Any, where: str, errors: list[str]) -> None:
    from kubernetes.utils import parse_quantity

    if isinstance(value, bool) or not isinstance(value, int | float | str):
        errors.append(f"{where}: expected a quantity (e.g. 16Gi, 8, 500m), got {value!r}")
        return
    try:
        parse_quantity(value)
    except ValueError:
        errors.append(f"{where}: '{value}' is not a Kubernetes quantity (e.g. 16Gi, 8, 500m)")


def _label_errors(manifest: dict[str, Any]) -> list[str]:
    errors = []
    metadata_blocks = [("metadata", manifest.get("metadata") or {}),
                       ("spec.template.metadata", ((manifest.get("spec") or {}).get("template") or {}).get("metadata") or {})]
    for where, metadata in metadata_blocks:
        for key, value in (metadata.get("labels") or {}).items():
            prefix, _, name = key.rpartition("/")
            if (prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix))) \
                    or len(name) > 63 or not _LABEL_NAME.match(name):
                errors.append(f"{where}.labels: '{key}' is not a valid label key")
            if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE.match(value):
                errors.append(f"{where}.labels.{key}: {value!r} is not a valid label value")
    return errors


def _parse_override(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--set takes KEY=VALUE (e.g. gpus=2), got '{text}'")
    return key, yaml.safe_load(raw)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deployment", default="stage-train", help="deployment of prefect.yaml (its job_variables)")
    parser.add_argument("--template", type=Path, default=TEMPLATE)
    parser.add_argument("--set", dest="overrides", type=_parse_override, action="append", default=[],
                        help="job variable KEY=VALUE (YAML value; dotted keys such as env.NAME=... merge)")
    args = parser.parse_args()
    job_variables = deployment_job_variables(args.deployment) | dict(args.overrides)
    manifest = render_job(load_template(args.template), job_variables, deployment_name=args.deployment)
    errors = schema_errors(manifest)
    if errors:
        sys.exit("the rendered Job does not conform to the Kubernetes schema:\n  " + "\n  ".join(errors))
    print(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()
