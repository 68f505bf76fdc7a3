"""Prefect flows of the loop: one round, and the whole multi-round run.

The flows only wire stages together by artifact reference; every stage's work and identity live
in its task (``prefloop.tasks``). Rerunning a finished run is a series of store lookups
(:func:`lookup_loop`), made before Prefect is imported.

Importing this module does not import Prefect: ``round_flow`` and ``loop_flow`` are built on first
access (``from prefloop.flows.loop import loop_flow``, or Prefect loading the entrypoint
``flows/loop.py:loop_flow``), by the module's ``__getattr__`` at the end.

Over 400 lines: a round's wiring (its stages, the optional ones included: CREAM's rewards, reward-model
labels), the run around the rounds and its lookup share one reading order; the heavier parts of the
wiring (starting policy, reward models, reference + train) live in :mod:`prefloop.flows.training`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel

from prefloop.config import LoopConfig
from prefloop.errors import UserError
from prefloop.flows.training import (
    check_reward_model,
    check_starting_policy,
    label_with_reward_model,
    labeling_reward_model,
    reference_and_train,
    reference_model,
    starting_policy,
)
from prefloop.orchestration import (
    call_stage_task,
    lookup_caller,
    publish_round_report,
    publish_run_report,
    run_stage_deployment,
    wait_for_artifacts,
)
from prefloop.stage import StageCaller, StageResult
from prefloop.storage import DEFAULT_STORE, ArtifactNotFoundError, ArtifactStore
from prefloop.tasks.importing.stage import ImportSource
from prefloop.tasks.registry import run_stage, stage_entry


class RoundSummary(BaseModel):
    round: int
    policy: str
    metrics: str
    stages: list[StageResult]


class LoopSummary(BaseModel):
    name: str
    store: str
    rounds: list[RoundSummary]

    @property
    def stages(self) -> list[StageResult]:
        return [s for r in self.rounds for s in r.stages]


def prefect_caller(stage: str, inputs: dict[str, str], config: dict[str, Any], store: str,
                   name: str) -> StageResult:
    """Run a stage as its Prefect task (visible in the UI, with its artifacts)."""
    return call_stage_task(stage, inputs, config, store, name)


def pool_caller(stage: str, inputs: dict[str, str], config: dict[str, Any], store: str,
                name: str) -> StageResult:
    """Stages whose registry entry names the ``gpu`` pool run as their deployment on a worker of that
    pool; the others run here, as tasks of the calling flow."""
    if stage_entry(stage).pool == "cpu":
        return prefect_caller(stage, inputs, config, store, name)
    return run_stage_deployment(stage, inputs, config, store, name)


Dispatch = Literal["local", "pools"]
CALLERS: dict[str, StageCaller] = {"local": prefect_caller, "pools": pool_caller}


def direct_caller(stage: str, inputs: dict[str, str], config: dict[str, Any], store: str,
                  name: str) -> StageResult:
    """Run a stage's pure core, without Prefect (same artifacts, same ids)."""
    return run_stage(stage, inputs, config, ArtifactStore(store), name)


def _seeded(section: BaseModel, config: LoopConfig, round_index: int, **updates) -> dict:
    """A stage config for one round: the loop seed and round folded into the stage's own seed."""
    data = section.model_dump()
    if "seed" in data:
        data["seed"] = data["seed"] + config.seed + 1000 * round_index
    if "round" in data:
        data["round"] = round_index
    return data | updates


_DEFERRED_FLOWS: dict[str, tuple[Callable[..., Any], dict[str, Any]]] = {}


def _deferred_flow(**options: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``@flow(**options)``, made on first access of the module attribute (see :func:`__getattr__`)."""
    def register(function: Callable[..., Any]) -> Callable[..., Any]:
        _DEFERRED_FLOWS[function.__name__] = (function, options)
        return function

    return register


def run_round(config: LoopConfig, round_index: int, policy: str, sft_policy: str, prompts_ref: str,
              baseline: str, store: str, previous_metrics: str | None = None, reward_model: str | None = None,
              call: StageCaller = direct_caller, publish: bool = False,
              label_reward_model: str | None = None, previous_policy: str | None = None) -> RoundSummary:
    """One round: sample → label → construct (or, with construction method mcts, mcts → pair-trees) → filter →
    train → evaluate.

    With ``label_reward_model`` (the loop setting ``reward_model``'s model) stage ``label-rm`` labels the
    samples instead of stage ``label``: construction ranks them by the reward (an ensemble's aggregate),
    and the filter gets an ensemble's member labels as its ``ensemble_labels`` input.

    With ``filter.consistency_confidence`` (CREAM) stage ``label-policy`` scores the round's samples twice
    (:func:`cream_rewards`): by ``policy`` and by ``previous_policy`` (the policy that started the round
    before), and the filter sets each pair's confidence from how well the two rankings agree. Without a
    previous policy (round 1) there is nothing to compare: the filter runs with consistency off, and says so.

    The evaluation is paired with the SFT model's (``baseline``) and the previous round's
    (``previous_metrics``) on the same held-out prompts, measures the KL to this round's DPO
    reference and, when that reference is not the starting policy (``previous_round``,
    ``soft_sync`` from round 2), also to the starting policy (``start``: ``kl_to_start``, the drift
    a moving reference hides), and the reward under ``reward_model`` when one is given.
    """
    prefix = f"{config.name}/round-{round_index}"
    ensemble_labels: str | None = None
    if config.construction.method == "mcts":
        # MCTS-DPO: step-level tree search and the pairs of its trees replace sample → label → construct.
        trees = call("mcts", {"policy": policy, "prompts": prompts_ref}, _seeded(config.mcts, config, round_index),
                     store, f"{prefix}/trees")
        pairs = call("pair-trees", {"trees": trees.output}, config.pair_trees.model_dump(), store,
                     f"{prefix}/preferences")
        built = [trees, pairs]
    else:
        samples = call("sample", {"policy": policy, "prompts": prompts_ref},
                       _seeded(config.sampling, config, round_index), store, f"{prefix}/samples")
        construction = _seeded(config.construction, config, round_index)
        if label_reward_model is None or config.reward_model is None:
            labels = call("label", {"samples": samples.output, "prompts": prompts_ref}, config.label.model_dump(),
                          store, f"{prefix}/labels")
        else:
            scored = label_with_reward_model(call, label_reward_model, samples.output,
                                             config.reward_model.label_config(), store, f"{prefix}/labels")
            labels, ensemble_labels = scored.result, scored.ensemble_labels
            construction["labeler"] = construction["labeler"] or scored.scorer
        pairs = call("construct", {"samples": samples.output, "labels": labels.output}, construction, store,
                     f"{prefix}/preferences")
        built = [samples, labels, pairs]
    # Decontaminated against the prompts this round evaluates on (their held-out split); CHES and the
    # embedding similarity, when configured, read the hidden states of the policy about to be trained.
    filter_inputs = {"preferences": pairs.output, "eval_prompts": prompts_ref}
    if ensemble_labels is not None:
        filter_inputs["ensemble_labels"] = ensemble_labels
    if config.filter.ches_top_fraction is not None or config.filter.near_duplicate_similarity is not None:
        filter_inputs["policy"] = policy
    filter_config = config.filter.model_dump()
    if config.filter.consistency_confidence and config.construction.method != "mcts":
        if previous_policy is None:
            _round_logger(call).warning(
                "round %d: filter.consistency_confidence (CREAM) compares the rankings of this round's and the "
                "previous round's policy, and round %d has no previous policy: its pairs keep their confidence "
                "(consistency starts in round 2)", round_index, round_index)
            filter_config["consistency_confidence"] = False
        else:
            rewards = cream_rewards(config, call, samples.output, policy, previous_policy, sft_policy, store, prefix)
            built.extend(rewards)
            filter_inputs |= {"consistency_labels": rewards[0].output, "previous_labels": rewards[1].output}
    kept = call("filter", filter_inputs, filter_config, store, f"{prefix}/preferences-filtered")
    warn_if_rankings_disagree(call, round_index, kept)
    stages = [*built, kept]
    new_policy = policy
    reference = reference_model(config.reference_policy, policy, sft_policy)
    if kept.rows == 0:
        # Every prompt was all-correct or all-wrong: nothing to prefer. The round keeps its policy
        # (and says so) rather than failing the whole run.
        _logger().warning("round %d built no preference pairs: the policy is carried over untrained", round_index)
    else:
        train_config = _seeded(config.train, config, round_index, reference_policy=config.reference_policy)
        train_config["training"] = _seeded(config.train.training, config, round_index)
        # Stage 'reference' (log-probs once per round, per the iteration policy) then stage 'train'.
        *reference_logps, trained = reference_and_train(call, train_config, config.name, round_index, kept.output,
                                                        policy, sft_policy, store)
        stages.extend([*reference_logps, trained])
        new_policy = trained.output
    metrics = call("evaluate",
                   _evaluation_inputs(new_policy, prompts_ref, reference, reward_model, baseline=baseline,
                                      previous=previous_metrics, preferences=kept.output,
                                      start=sft_policy if reference != sft_policy else None),
                   _seeded(config.evaluation, config, round_index), store, f"{prefix}/metrics")
    stages.append(metrics)
    if publish:
        publish_round_report(store, config.name, round_index)
    return RoundSummary(round=round_index, policy=new_policy, metrics=metrics.output, stages=stages)


@_deferred_flow(name="prefloop-round", log_prints=True)
def round_flow(config: LoopConfig, round_index: int, policy: str, sft_policy: str, prompts_ref: str,
               baseline: str, store: str = DEFAULT_STORE, previous_metrics: str | None = None,
               reward_model: str | None = None, dispatch: Dispatch = "local",
               label_reward_model: str | None = None, previous_policy: str | None = None) -> RoundSummary:
    """One round as a Prefect flow (each stage a task); see :func:`run_round` and :func:`loop_flow`
    for ``dispatch``."""
    try:
        return run_round(config, round_index, policy, sft_policy, prompts_ref, baseline, store, previous_metrics,
                         reward_model, call=CALLERS[dispatch], publish=True, label_reward_model=label_reward_model,
                         previous_policy=previous_policy)
    finally:
        wait_for_artifacts()


def cream_rewards(config: LoopConfig, call: StageCaller, samples: str, policy: str, previous_policy: str,
                  sft_policy: str, store: str, prefix: str) -> list[StageResult]:
    """CREAM's two rankings of a round's samples (Wang et al. 2024), by stage ``label-policy``:
    ``PREFIX/policy-rewards`` (the filter's ``consistency_labels``) by the round's policy and
    ``PREFIX/previous-policy-rewards`` (``previous_labels``) by the previous round's.

    Each model's reward is its DPO implicit reward log π − log π_ref against the starting policy
    ``sft_policy`` — one reference for every round, as the authors measure every iteration against M0 —
    and, for the starting policy itself (the previous policy of round 2, which has no model before it), its
    length-normalised log-likelihood, the authors' reward of M0. A policy measured against itself would
    score every sample 0, which ranks nothing.
    """
    def scored_by(model: str, name: str) -> StageResult:
        inputs = {"samples": samples, "policy": model}
        if model != sft_policy:
            inputs["reference"] = sft_policy
        return call("label-policy", inputs, config.policy_rewards.model_dump(), store, f"{prefix}/{name}")

    if policy == previous_policy:
        _round_logger(call).warning(
            "%s: the previous round trained nothing, so this round's policy is the previous one and CREAM's two "
            "rankings agree by construction (consistency 1 for every prompt)", prefix)
    return [scored_by(policy, "policy-rewards"), scored_by(previous_policy, "previous-policy-rewards")]


def warn_if_rankings_disagree(call: StageCaller, round_index: int, filtered: StageResult) -> None:
    """CREAM's confidence is below ½ on average when the two rankings disagree more than they agree (mean
    Kendall τ < 0): the round then trains its pairs at ε near ½, close to no signal. Say so, with the likely
    cause (measured on the embedded task in round 2: the starting policy's likelihood against an implicit
    reward that contains −log π₀) and the way out."""
    consistency = filtered.metrics.get("consistency_mean")
    if consistency is None or consistency >= 0.5:
        return
    cause = (" In round 2 the previous policy is the starting one, ranked by its likelihood against an implicit "
             "reward log π − log π₀ that contains −log π₀, so the two tend to disagree by construction."
             if round_index == 2 else "")
    _round_logger(call).warning(
        "round %d: CREAM's two rankings of the samples disagree more than they agree (mean consistency %.2f < 0.5, "
        "i.e. Kendall τ < 0), so its pairs train at ε = min(1 − C, ½) near ½: close to no signal.%s If the pairs' "
        "labels are reliable (a verifier's), set filter.consistency_confidence: false (README, 'Consistency across "
        "rounds')", round_index, consistency, cause)


def _round_logger(call: StageCaller) -> logging.Logger | logging.LoggerAdapter:
    """The run's logger; the plain ``prefloop`` logger for a lookup, which must not import Prefect."""
    return logging.getLogger("prefloop") if call is lookup_caller else _logger()


def _logger() -> logging.Logger | logging.LoggerAdapter:
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("prefloop")


def _evaluation_inputs(policy: str, prompts_ref: str, reference: str, reward_model: str | None,
                       **optional: str | None) -> dict[str, str]:
    """The evaluate stage's inputs; optional roles without an artifact are left out."""
    inputs = {"policy": policy, "prompts": prompts_ref, "reference": reference, "reward_model": reward_model, **optional}
    return {role: ref for role, ref in inputs.items() if ref is not None}


def task_prompts(config: LoopConfig, store: str, call: StageCaller) -> tuple[str, list[StageResult]]:
    """The prompts the rounds sample (split ``train``) and evaluate on (``heldout``), as ``RUN/prompts``.

    The embedded task's (section ``prompts``) by default; with ``prompt_source`` the user's: a prompts
    artifact, or a source imported by stage ``import-prompts`` (``RUN/imported-prompts`` when it is
    split afterwards), its split rewritten by prompt hash by stage ``split-prompts`` when
    ``prompt_split`` is set. Which training prompts each round samples is the sampling (or mcts)
    section's ``max_prompts`` and ``new_prompts_each_round``.
    """
    name, source = config.name, config.prompt_source
    if source is None:
        made = call("prompts", {}, _seeded(config.prompts, config, 0), store, f"{name}/prompts")
        return made.output, [made]
    target = ArtifactStore(store)
    stages: list[StageResult] = []
    final_name = f"{name}/prompts"
    if isinstance(source, ImportSource):
        imported = call("import-prompts", {}, source.task_config(), store,
                        f"{name}/imported-prompts" if config.prompt_split is not None else final_name)
        stages.append(imported)
        prompts = imported.output
    else:
        prompts = str(target.resolve(source))
    if config.prompt_split is not None:
        # The loop seed is not folded in: runs with other seeds are compared on the same held-out prompts.
        split = call("split-prompts", {"prompts": prompts}, config.prompt_split.model_dump(), store, final_name)
        stages.append(split)
        prompts = split.output
    elif not isinstance(source, ImportSource):
        target.set_ref(final_name, target.resolve(prompts), note=f"loop setting prompt_source: {source}")
    check_user_prompts(config, target, prompts)
    return prompts, stages


def check_user_prompts(config: LoopConfig, store: ArtifactStore, prompts: str) -> None:
    """A user's prompts must have training and held-out prompts, and reference answers when the
    verifier labels them (evaluation checks held-out answers the same way)."""
    import pyarrow.compute as pc

    from prefloop.tasks.common.labelers import find_labeler
    from prefloop.tasks.labeling import VERIFIER

    table = store.read_table(store.resolve(prompts))
    sampled = config.mcts.split if config.construction.method == "mcts" else config.sampling.split
    for split, use in ((sampled, "sample"), (config.evaluation.split, "evaluate on")):
        if not pc.sum(pc.equal(table.column("split"), split)).as_py():
            raise UserError(f"the prompts {prompts} have no '{split}' prompts to {use}; splits found: "
                            f"{sorted(set(table.column('split').to_pylist()))}. Set prompt_split: {{heldout_fraction: "
                            "0.1}} (or {heldout_size: N}) to hold out prompts by hash")
    if config.reward_model is not None or find_labeler(config.label.labeler) is not VERIFIER:
        return
    answers = table.column("reference_answer").to_pylist() if "reference_answer" in table.column_names else []
    missing = sum(1 for answer in answers if answer is None or not str(answer).strip()) + table.num_rows - len(answers)
    if missing:
        raise UserError(f"{missing} of the {table.num_rows} prompts in {prompts} have no reference answer, which the "
                        f"verifier labeler (label.labeler: {config.label.labeler}) and the evaluation check answers "
                        "against: map one when importing (prompt_source: {source: FILE, map: {reference_answer: "
                        "FIELD}}) or label with a reward model")


def _check_sources(config: LoopConfig, store: str, models: bool = True) -> None:
    """What the user brings is checked before the run writes anything. ``models``: also load the tokenizers
    of a reward model and the policy to compare their vocabularies (a lookup-only rerun skips that: what it
    finds was checked when it was written, and it must not pay for loading tokenizers)."""
    if config.policy is not None:
        check_starting_policy(config.policy, config.demonstrations, store)
    if config.reward_model is not None and models:
        check_reward_model(config.reward_model, config.policy, config.filter, store)
    if isinstance(config.prompt_source, str):
        try:
            ref = ArtifactStore(store).resolve(config.prompt_source)
        except ArtifactNotFoundError as error:
            raise UserError(f"prompt_source: {error}. To import a file, give an import spec: prompt_source: "
                            f"{{source: {config.prompt_source}, map: {{prompt: FIELD}}}}") from None
        if ref.kind != "prompts":
            raise UserError(f"prompt_source '{config.prompt_source}' is a {ref.kind} artifact ({ref}), not prompts: "
                            "import prompts with 'prefloop import prompts FILE --map prompt=FIELD' or give an import "
                            "spec {source: FILE, map: {...}}")


def run_loop(config: LoopConfig, store: str = DEFAULT_STORE, reward_model: str | None = None,
             call: StageCaller = direct_caller, publish: bool = False) -> LoopSummary:
    """The starting policy and its evaluation (round 0), then ``config.rounds`` rounds.

    The starting policy is the embedded SFT model, or the loop setting ``policy`` (fine-tuned on
    ``demonstrations`` when given); the prompts are the embedded task's or ``prompt_source``'s
    (:func:`task_prompts`). With the loop setting ``reward_model`` a reward model labels the rounds: the
    user's, or trained by stage ``train-rm`` before round 1 (:func:`~prefloop.flows.training.labeling_reward_model`);
    every evaluation then reports its mean reward too. ``reward_model`` (a model artifact ref, optional)
    is the reward model of the evaluations instead (the labeling one when not given). Without Prefect by
    default; :func:`loop_flow` runs the same wiring as a flow.
    """
    store = ArtifactStore(store).uri
    name = config.name
    _check_sources(config, store, models=call is not lookup_caller)
    task_prompts_ref, prompt_stages = task_prompts(config, store, call)
    if config.policy is None:
        sft_prompts = call("prompts", {}, _seeded(config.sft_prompts, config, 0), store, f"{name}/sft-prompts")
        warm = call("sft", {"prompts": sft_prompts.output}, _seeded(config.sft, config, 0), store,
                    f"{name}/round-0/policy")
        start, start_stages = warm.output, [sft_prompts, *prompt_stages, warm]
    else:
        start, start_stages = starting_policy(call, config.policy, config.demonstrations,
                                              _seeded(config.sft, config, 0), name, store)
        start_stages = [*prompt_stages, *start_stages]
    label_reward_model = None
    if config.reward_model is not None:
        label_reward_model, reward_stages = labeling_reward_model(call, config.reward_model, start, config.seed, name,
                                                                  store)
        start_stages = [*start_stages, *reward_stages]
        reward_model = reward_model or label_reward_model
    # Round 0 is the starting policy against itself as reference: its KL is 0 by definition (not computed).
    base = call("evaluate", _evaluation_inputs(start, task_prompts_ref, start, reward_model),
                _seeded(config.evaluation, config, 0), store, f"{name}/round-0/metrics")
    if publish:
        publish_round_report(store, name, 0)
    rounds = [RoundSummary(round=0, policy=start, metrics=base.output, stages=[*start_stages, base])]
    policy, previous_policy = start, None
    for round_index in range(1, config.rounds + 1):
        summary = run_round(config, round_index, policy, start, task_prompts_ref, base.output, store,
                            previous_metrics=rounds[-1].metrics, reward_model=reward_model, call=call,
                            publish=publish, label_reward_model=label_reward_model, previous_policy=previous_policy)
        rounds.append(summary)
        previous_policy, policy = policy, summary.policy
    if publish:
        publish_run_report(store, name)
    return LoopSummary(name=name, store=store, rounds=rounds)


def lookup_loop(config: LoopConfig, store: str = DEFAULT_STORE, reward_model: str | None = None) -> LoopSummary:
    """A finished run's summary from the store alone: :func:`run_loop`'s wiring walked with
    :func:`~prefloop.orchestration.lookup_caller`, which looks each stage up and computes nothing.

    Every stage is then a stored StageResult (``cached``), so the wiring takes the branches the run
    took. Raises :class:`~prefloop.orchestration.StageNotInStore` at the first stage that would have
    to compute; the refs of the stages found before it are set, as a run sets them. Imports no Prefect
    and publishes no Prefect artifact: ``prefloop run`` calls it first, so a finished run is reprinted
    without starting Prefect's throw-away server, and a run with work left runs as a flow.
    """
    return run_loop(config, store, reward_model, call=lookup_caller, publish=False)


@_deferred_flow(name="prefloop-loop", log_prints=True)
def loop_flow(config: LoopConfig, store: str = DEFAULT_STORE, reward_model: str | None = None,
              dispatch: Dispatch = "local") -> LoopSummary:
    """The multi-round loop as a Prefect flow: every stage a task run named after its output
    (``NAME/round-K/samples``), each round's report an artifact.

    Rounds are not subflows: a flow run costs about a second of fixed orchestration on top of its
    tasks, which the round boundaries do not need (the store already records them).

    Args:
        config: the loop config (the same model as configs/*.yaml).
        store: artifact store path or URI; with dispatch "pools" every worker must reach it.
        reward_model: optional reward-model artifact; every evaluation then reports its mean reward.
        dispatch: "local" runs every stage in this flow run; "pools" sends the stages whose spec names
            the gpu pool (sft, sample, train, evaluate, ...) to their deployments, run by workers of
            the gpu pool, and runs the rest here.
    """
    try:
        return run_loop(config, store, reward_model, call=CALLERS[dispatch], publish=True)
    finally:
        wait_for_artifacts()


# The flows above are plain functions until first read: Prefect is imported, and the flow made, then.
for _name in _DEFERRED_FLOWS:
    del globals()[_name]
del _name


def __getattr__(name: str) -> Any:
    """``round_flow`` and ``loop_flow`` as Prefect flows, made on first access (PEP 562): importing
    Prefect costs 1.5 s or more, which a cached rerun (:func:`lookup_loop`) does not pay."""
    if name not in _DEFERRED_FLOWS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from prefect import flow

    function, options = _DEFERRED_FLOWS[name]
    made = flow(**options)(function)
    globals()[name] = made
    return made
