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

A reward model that labels the rounds (loop setting ``reward_model``) is ready before round 1
(:func:`labeling_reward_model`): the user's, imported or looked up as ``RUN/reward-model``, or trained
there by stage ``train-rm`` from the starting policy on the user's pairs (``RUN/reward-preferences``
when imported). A reward model the user brings must score the policy's own tokens: it is checked
(:func:`check_reward_model`) with the other sources, before anything is written. Each round's samples
are labeled with it by :func:`label_with_reward_model` (stage ``label-rm``: every member, plus an
ensemble's aggregate), which the data-only flow uses too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefloop.config import RewardModelSetting, ensemble_filter_keys
from prefloop.errors import UserError
from prefloop.stage import StageCaller, StageResult
from prefloop.storage import ArtifactNotFoundError, ArtifactStore
from prefloop.tasks.common.models import UnsafeModelError, check_model_dir
from prefloop.tasks.importing.stage import ImportSource

# label-rm names an ensemble's aggregate "rm-ensemble:<model-id>/<aggregate>", its members "rm:<model-id>…".
AGGREGATE_LABELER_PREFIX = "rm-ensemble:"
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

    from prefloop.chat import check_chat_template

    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
    if not any((directory / name).exists() for name in names):
        raise UnsafeModelError(f"{directory}: no tokenizer files ({', '.join(names)}); the loop tokenises prompts "
                               "with the model's own tokenizer: save it beside the model with "
                               "tokenizer.save_pretrained(DIR)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=False, local_files_only=True)
    except Exception as error:  # noqa: BLE001 - any failure means the directory has no usable tokenizer
        raise UnsafeModelError(f"{directory}: its tokenizer does not load ({type(error).__name__}: {error}); save it "
                               "beside the model with tokenizer.save_pretrained(DIR)") from None
    if tokenizer.eos_token_id is None:
        raise UnsafeModelError(f"{directory}: the tokenizer has no eos token, so generation cannot stop; set "
                               "tokenizer.eos_token and save it again")
    # A template that raises is refused here, before the loop imports the prompts (nothing written).
    check_chat_template(tokenizer)


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


# ----------------------------------------------------------------------------------------------
# The reward model that labels the rounds
# ----------------------------------------------------------------------------------------------
def _resolve(store: ArtifactStore, given: str, setting: str, kind: str, fix: str) -> str:
    try:
        ref = store.resolve(given)
    except ArtifactNotFoundError as error:
        raise UserError(f"{setting}: {error}. {fix}") from None
    if ref.kind != kind:
        raise UserError(f"{setting} '{given}' is a {ref.kind} artifact ({ref}), not {kind}. {fix}")
    return str(ref)


def _tokenizer_vocabulary(directory: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory, trust_remote_code=False, local_files_only=True).get_vocab()
    except Exception as error:  # noqa: BLE001 - any failure means the directory has no usable tokenizer
        raise UnsafeModelError(f"{directory}: its tokenizer does not load ({type(error).__name__}: {error}); save it "
                               "beside the model with tokenizer.save_pretrained(DIR)") from None


def _policy_vocabulary(policy: str | None, store: ArtifactStore) -> tuple[dict[str, int], str]:
    """The starting policy's vocabulary (the embedded character tokenizer's without ``policy``)."""
    if policy is None:
        from prefloop.embedded.tokenizer import build_tokenizer

        return build_tokenizer().get_vocab(), "the embedded policy"
    directory = policy_directory(policy)
    if directory is None:
        directory = store.local_files(store.resolve(policy))
    return _tokenizer_vocabulary(directory), f"the policy '{policy}'"


def _check_reward_member(member: Path, policy_vocabulary: dict[str, int], policy_name: str, given: str) -> None:
    """One member: a one-label sequence classifier whose tokenizer has exactly the policy's vocabulary."""
    import json

    settings = json.loads((member / "config.json").read_text(encoding="utf-8"))
    architectures = settings.get("architectures") or []
    labels = len(settings.get("id2label") or {}) or settings.get("num_labels", 2)
    if not any(name.endswith("ForSequenceClassification") for name in architectures) or labels != 1:
        raise UserError(f"reward_model.model '{given}' is a {', '.join(architectures) or 'model'} with {labels} "
                         "label(s), not a reward model (a one-label sequence classifier, e.g. "
                         "LlamaForSequenceClassification with num_labels=1, as train-rm writes): train one with "
                         "reward_model: {preferences: REF}")
    vocabulary = _tokenizer_vocabulary(member)
    if vocabulary != policy_vocabulary:
        only_reward = sorted(set(vocabulary) - set(policy_vocabulary))[:5]
        only_policy = sorted(set(policy_vocabulary) - set(vocabulary))[:5]
        moved = sum(1 for token, index in vocabulary.items() if policy_vocabulary.get(token, index) != index)
        raise UserError(
            f"reward_model.model '{given}' has another vocabulary than {policy_name} ({len(vocabulary)} vs "
            f"{len(policy_vocabulary)} tokens; only in the reward model: {only_reward}, only in the policy: "
            f"{only_policy}, {moved} shared token(s) with other ids): it would score the policy's completions in "
            "tokens it was not trained on. Train a reward model from the policy instead (reward_model: "
            "{preferences: REF, members: k} initialises train-rm from the starting policy), or give one trained "
            "with the policy's tokenizer")


def check_reward_model(setting: RewardModelSetting, policy: str | None, filter_config: Any, store: str) -> None:
    """Refuse a reward model the loop could not label with, before anything is written: a ``model`` must be a
    one-label sequence classifier (every member of an ensemble) whose tokenizer has the starting policy's
    vocabulary, and a single model cannot feed the filter's ensemble rules; ``preferences`` given as a ref
    must name a preferences artifact."""
    target = ArtifactStore(store)
    if setting.preferences is not None:
        if not isinstance(setting.preferences, ImportSource):
            _resolve(target, setting.preferences, "reward_model.preferences", "preferences",
                     "Import pairs with 'prefloop import preferences FILE --map prompt=F --map chosen=F --map "
                     "rejected=F', or give an import spec {source: FILE, map: {...}}")
        return
    from prefloop.tasks.training.recipes.reward_model import reward_model_members

    given = str(setting.model)
    directory = policy_directory(given)
    if directory is not None:
        check_model_dir(directory)
        _check_tokenizer(directory)
        members = [directory]
    else:
        ref = _resolve(target, given, "reward_model.model", "model",
                       "Import a reward model with 'prefloop import model DIR' or give its directory")
        members = reward_model_members(target.local_files(target.resolve(ref)))
    keys = ensemble_filter_keys(filter_config)
    if keys and len(members) < 2:
        raise UserError(f"filter.{', filter.'.join(keys)} compare an ensemble's members, but reward_model.model "
                         f"'{given}' is one model: give an ensemble (train-rm with ensemble_size k, or reward_model: "
                         "{preferences: REF, members: k}), or unset them")
    policy_vocabulary, policy_name = _policy_vocabulary(policy, target)
    for member in members:
        _check_reward_member(member, policy_vocabulary, policy_name, given)


def labeling_reward_model(call: StageCaller, setting: RewardModelSetting, start: str | None, loop_seed: int,
                          run_name: str, store: str) -> tuple[str, list[StageResult]]:
    """The reward model that labels the rounds, as ``RUN/reward-model``, and the stages that made it.

    ``model``: imported (a directory, stage ``import-model``) or looked up (a ref). ``preferences``:
    imported if an import spec (``RUN/reward-preferences``), then stage ``train-rm`` trains
    ``members`` reward models initialised from the starting policy ``start`` (its backbone and
    tokenizer, so the reward model reads the policy's tokens) and stores each member's standardisation;
    that needs ``start`` (the data-only flow, which has no policy, passes None and takes ``model`` only).
    """
    target = ArtifactStore(store)
    name = f"{run_name}/reward-model"
    if setting.model is not None:
        directory = policy_directory(setting.model)
        if directory is not None:
            imported = call("import-model", {}, {"source": str(directory)}, store, name)
            return imported.output, [imported]
        ref = target.resolve(setting.model)
        target.set_ref(name, ref, note=f"loop setting reward_model.model: {setting.model}")
        return str(ref), []
    if start is None:
        raise UserError("reward_model.preferences trains a reward model from the starting policy, but there is none "
                         "here: give reward_model: {model: REF} (e.g. trained with 'prefloop stage train-rm')")
    stages: list[StageResult] = []
    if isinstance(setting.preferences, ImportSource):
        imported = call("import-preferences", {}, setting.preferences.task_config(), store,
                        f"{run_name}/reward-preferences")
        stages.append(imported)
        pairs = imported.output
    else:
        pairs = str(target.resolve(str(setting.preferences)))
        target.set_ref(f"{run_name}/reward-preferences", target.resolve(pairs),
                       note=f"loop setting reward_model.preferences: {setting.preferences}")
    trained = call("train-rm", {"preferences": pairs, "policy": start}, setting.train_config(loop_seed), store, name)
    return trained.output, [*stages, trained]


@dataclass(frozen=True)
class RewardLabels:
    """Samples labeled by a reward model (stage ``label-rm``): the labels artifact, the labeler whose scores
    construction ranks by (an ensemble's aggregate, or the single model) and the ensemble's member labelers."""

    result: StageResult
    scorer: str
    members: tuple[str, ...]

    @property
    def ensemble_labels(self) -> str | None:
        """The filter's ``ensemble_labels`` input: the labels of an ensemble's members (None for one model)."""
        return self.result.output if len(self.members) > 1 else None


def label_with_reward_model(call: StageCaller, reward_model: str, samples: str, label_config: dict[str, Any],
                            store: str, name: str) -> RewardLabels:
    """Score ``samples`` with every member of ``reward_model`` plus (for an ensemble) their aggregate over the
    members' standardised rewards (stage ``label-rm``; ``label_config`` is its config, e.g.
    :meth:`prefloop.config.RewardModelSetting.label_config`)."""
    labels = call("label-rm", {"reward_model": reward_model, "samples": samples}, label_config, store, name)
    labelers = list(labels.metrics["labelers"])
    aggregates = [labeler for labeler in labelers if labeler.startswith(AGGREGATE_LABELER_PREFIX)]
    members = tuple(labeler for labeler in labelers if labeler not in aggregates)
    return RewardLabels(labels, aggregates[0] if aggregates else members[0], members)
