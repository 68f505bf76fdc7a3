"""The training part of a round: the reference log-probs (once per round), then the train stage.

Which models play which role follows the iteration policy (``reference_policy``, recorded in every
train manifest):

=============== ======================== ======================================================
policy          train's ``reference``    reference log-probs
=============== ======================== ======================================================
fixed           the SFT model            stage ``reference`` on the SFT model
previous_round  the round's start policy stage ``reference`` on that policy
mixture         the SFT model            stage ``reference``: SFT mixed with the start policy (INPO)
soft_sync       the round's start policy none: the reference moves during training (TR-DPO)
=============== ======================== ======================================================

With ``off_policy_ratio`` > 0, the previous round's filtered pairs are the ``off_policy`` input of
both stages.

The robust losses need no input of their own: the train stage reads ε from its ``preferences`` input,
which is the filter's output — its ``confidence`` column, or with ``label_flip_rate_source:
filter_estimate`` the ``estimated_flip_rate`` in its manifest.
"""

from __future__ import annotations

from typing import Any

from prefloop.stage import StageCaller, StageResult
from prefloop.storage import ArtifactNotFoundError, ArtifactStore


def reference_model(reference_policy: str, policy: str, sft_policy: str) -> str:
    """The model the train stage (and the round's KL evaluation) takes as the reference."""
    return sft_policy if reference_policy in ("fixed", "mixture") else policy


def previous_pairs(store: str, run_name: str, round_index: int) -> str | None:
    """The previous round's filtered pairs of this run, if it made any."""
    if round_index <= 1:
        return None
    try:
        return str(ArtifactStore(store).resolve(f"{run_name}/round-{round_index - 1}/preferences-filtered"))
    except ArtifactNotFoundError:
        return None


def reference_and_train(call: StageCaller, train_config: dict[str, Any], run_name: str, round_index: int,
                        preferences: str, policy: str, sft_policy: str, store: str) -> list[StageResult]:
    """Run stage ``reference`` (unless the reference is soft-synced) and stage ``train``; the train
    result comes last."""
    prefix = f"{run_name}/round-{round_index}"
    policy_name = train_config["reference_policy"]
    inputs = {"preferences": preferences, "policy": policy,
              "reference": reference_model(policy_name, policy, sft_policy)}
    off_policy = previous_pairs(store, run_name, round_index) if train_config["off_policy_ratio"] > 0 else None
    if off_policy is not None:
        inputs["off_policy"] = off_policy
    results = []
    if policy_name != "soft_sync":
        reference_inputs = {role: inputs[role] for role in ("preferences", "reference", "off_policy") if role in inputs}
        reference_config: dict[str, Any] = {"max_length": train_config["training"]["max_length"]}
        if policy_name == "mixture":
            reference_inputs["mixture_with"] = policy
            reference_config["mixture_weight"] = train_config["mixture_weight"]
        logps = call("reference", reference_inputs, reference_config, store, f"{prefix}/reference-logps")
        results.append(logps)
        inputs["reference_logps"] = logps.output
    results.append(call("train", inputs, train_config, store, f"{prefix}/policy"))
    return results
