"""The training part of the loop: where round 1 starts (the starting policy), and per round the
reference log-probs (once per round), then the train stage.

The starting policy (round 0's) is the embedded SFT model by default; with the loop setting
``policy`` it is a user's model — a ref in the store, or a save_pretrained directory imported by
stage ``import-model`` — optionally fine-tuned by stage ``sft`` on ``demonstrations`` first
(:func:`starting_policy`). Every check a user's model must pass runs before anything is written.

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

The loop config refuses a policy paired with a loss it is not defined for (``mixture`` is INPO and needs
loss ``ipo`` with ``ipo_tau`` = η and ``mixture_weight`` = τ/η; ``sppo`` needs ``previous_round``), and so
does stage ``train`` (``tasks.training.configs.check_iteration_policy``).

With ``off_policy_ratio`` > 0, the previous round's filtered pairs are the ``off_policy`` input of
both stages.

The robust losses need no input of their own: the train stage reads ε from its ``preferences`` input,
which is the filter's output — its ``confidence`` column, or with ``label_flip_rate_source:
filter_estimate`` the ``estimated_flip_rate`` in its manifest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefloop.errors import UserError
from prefloop.stage import StageCaller, StageResult
from prefloop.storage import ArtifactNotFoundError, ArtifactStore
from prefloop.tasks.common.models import UnsafeModelError, check_model_dir

DEMONSTRATION_ROLES = {"preferences": "demonstrations", "samples": "demonstration_samples"}


def policy_directory(policy: str) -> Path | None:
    """The local directory ``policy`` names, or None when it is a store ref; a path that looks like one
    (``./…``, ``/…``, ``~/…``) but does not exist is an error rather than a ref lookup."""
    path = Path(policy).expanduser()
    if path.is_dir():
        return path
    if policy.startswith(("/", "./", "../", "~")) or path.exists():
        raise UserError(f"policy '{policy}' is not a directory: give the folder model.save_pretrained(DIR) and "
                        "tokenizer.save_pretrained(DIR) wrote, or a model ref in the store ('prefloop ls')")
    return None


def check_starting_policy(policy: str, demonstrations: str | None, store: str) -> None:
    """Refuse a starting policy (and demonstrations) that the loop could not use, before it writes anything:
    the import-model checks (safetensors only, no custom code, a causal LM), a loadable tokenizer with an
    eos token; a ref must name a model artifact, demonstrations a preferences or samples artifact."""
    directory = policy_directory(policy)
    target = ArtifactStore(store)
    if directory is not None:
        check_model_dir(directory)
        _check_tokenizer(directory)
    else:
        ref = target.resolve(policy)
        if ref.kind != "model":
            raise UserError(f"policy '{policy}' is a {ref.kind} artifact ({ref}); the starting policy must be a model: "
                            "import one with 'prefloop import model DIR' or give the directory itself")
    if demonstrations is not None:
        ref = target.resolve(demonstrations)
        if ref.kind not in DEMONSTRATION_ROLES:
            raise UserError(f"demonstrations '{demonstrations}' is a {ref.kind} artifact ({ref}); SFT imitates a "
                            "preferences artifact's chosen responses or a samples artifact's completions: import one "
                            "with 'prefloop import preferences FILE' or 'prefloop import samples FILE'")


def _check_tokenizer(directory: Path) -> None:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=False, local_files_only=True)
    except Exception as error:  # noqa: BLE001 - any failure means the directory has no usable tokenizer
        raise UnsafeModelError(f"{directory}: its tokenizer does not load ({type(error).__name__}: {error}); save it "
                               "beside the model with tokenizer.save_pretrained(DIR)") from None
    if tokenizer.eos_token_id is None:
        raise UnsafeModelError(f"{directory}: the tokenizer has no eos token, so generation cannot stop; set "
                               "tokenizer.eos_token and save it again")


def starting_policy(call: StageCaller, policy: str, demonstrations: str | None, sft_config: dict[str, Any],
                    run_name: str, store: str) -> tuple[str, list[StageResult]]:
    """Round 0's policy from a user's model: imported (a directory) or looked up (a ref) as
    ``RUN/starting-policy``, then — with ``demonstrations`` — fine-tuned by stage ``sft``. The result
    is ``RUN/round-0/policy``; returns it and the stages that ran."""
    directory = policy_directory(policy)
    target = ArtifactStore(store)
    stages: list[StageResult] = []
    if directory is not None:
        imported = call("import-model", {}, {"source": str(directory)}, store, f"{run_name}/starting-policy")
        stages.append(imported)
        start = imported.output
    else:
        start = str(target.resolve(policy))
        target.set_ref(f"{run_name}/starting-policy", target.resolve(start), note=f"loop setting policy: {policy}")
    if demonstrations is None:
        target.set_ref(f"{run_name}/round-0/policy", target.resolve(start), note="the starting policy, untrained")
        return start, stages
    shown = target.resolve(demonstrations)
    inputs = {"policy": start, DEMONSTRATION_ROLES[shown.kind]: str(shown)}
    warm = call("sft", inputs, sft_config, store, f"{run_name}/round-0/policy")
    return warm.output, [*stages, warm]


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
