"""Iteration policies: INPO mixture, TR-DPO soft sync, the margin-descending order, off-policy mixing, which
losses each policy is defined for, how the round wires the reference and train stages for each policy, and
how rounds chain: round k samples from, trains and evaluates exactly the policy round k − 1 trained (and
measures its KL to the starting policy when the reference is not it)."""

import copy

import pyarrow as pa
import pytest
import torch

from prefloop.config import ConfigFileError, LoopConfig, load_loop_config
from prefloop.embedded.arithmetic import make_problems
from prefloop.embedded.model import TinyLlamaConfig, build_model
from prefloop.embedded.tokenizer import build_tokenizer
from prefloop.flows import training as round_training
from prefloop.flows.loop import run_loop
from prefloop.stage import StageResult
from prefloop.tasks.registry import run_stage, stage_entry
from prefloop.tasks.training.configs import DPOConfig, check_iteration_policy
from prefloop.tasks.training.losses import LossHyperparameters, SequenceLogps, get_loss
from prefloop.tasks.training.optim import example_order
from prefloop.tasks.training.preference import TrainConfig, margin_descending_order
from prefloop.tasks.training.recipes.dpo import ReferenceLogps, SoftSync, geometric_mixture, train_dpo

TINY = TinyLlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                       max_position_embeddings=64)


def test_geometric_mixture_weights_the_log_probs() -> None:
    sft = ReferenceLogps(chosen=torch.tensor([-2.0, -1.0]), rejected=torch.tensor([-4.0, -8.0]))
    previous = ReferenceLogps(chosen=torch.tensor([-6.0, -3.0]), rejected=torch.tensor([-2.0, -4.0]))
    mixed = geometric_mixture(sft, previous, 0.25)
    # 0.25·(−2) + 0.75·(−6) = −5; 0.25·(−1) + 0.75·(−3) = −2.5; 0.25·(−4) + 0.75·(−2) = −2.5; −2 − 3 = −5
    assert mixed.chosen.tolist() == [-5.0, -2.5]
    assert mixed.rejected.tolist() == [-2.5, -5.0]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        geometric_mixture(sft, previous, 1.5)


def test_soft_sync_moves_the_reference_toward_the_policy() -> None:
    policy, reference = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        policy.weight.fill_(1.0)
        reference.weight.fill_(0.0)
    sync = SoftSync(alpha=0.6, every=2)
    sync.apply(policy, reference)
    assert reference.weight.item() == pytest.approx(0.6)  # 0.6·1 + 0.4·0
    sync.apply(policy, reference)
    assert reference.weight.item() == pytest.approx(0.84)  # 0.6·1 + 0.4·0.6
    with pytest.raises(ValueError, match="alpha"):
        SoftSync(alpha=0.0, every=1)


def _pairs(count: int) -> list[tuple[str, str, str]]:
    return [(p.prompt, p.solution, p.solution.rsplit("A:", 1)[0] + f"A:{int(p.answer) + 1}")
            for p in make_problems(count, seed=3)]


def test_soft_synced_reference_is_updated_every_k_steps() -> None:
    tokenizer = build_tokenizer()
    start = build_model(TINY, len(tokenizer), seed=0, tokenizer=tokenizer)
    config = DPOConfig(max_steps=4, batch_size=4, learning_rate=1e-2, beta=0.5)

    def trained(every: int) -> tuple[torch.nn.Module, torch.nn.Module, list[dict]]:
        policy, moving = copy.deepcopy(start), copy.deepcopy(start)
        history = train_dpo(policy, moving, tokenizer, _pairs(8), config, soft_sync=SoftSync(alpha=0.5, every=every))
        return policy, moving, history

    policy, moving, history = trained(every=2)
    unsynced_policy, still, _ = trained(every=100)
    first = next(iter(start.state_dict()))
    assert torch.equal(still.state_dict()[first], start.state_dict()[first])  # never synced
    assert not torch.equal(moving.state_dict()[first], start.state_dict()[first])
    # The synced reference changes the loss from step 3 on, so the runs part ways only then.
    assert history[0]["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert not torch.equal(policy.state_dict()[first], unsynced_policy.state_dict()[first])


class MemoryCheckpointer:
    def __init__(self):
        self.saved = None

    def load(self):
        return self.saved

    def save(self, checkpoint) -> None:
        self.saved = copy.deepcopy(checkpoint)


def test_a_resumed_soft_sync_run_restores_the_moving_reference() -> None:
    tokenizer = build_tokenizer()
    start = build_model(TINY, len(tokenizer), seed=0, tokenizer=tokenizer)
    config = DPOConfig(max_steps=5, batch_size=4, learning_rate=1e-2, beta=0.5, checkpoint_every=2)
    sync = SoftSync(alpha=0.5, every=2)
    policy, moving = copy.deepcopy(start), copy.deepcopy(start)
    train_dpo(policy, moving, tokenizer, _pairs(8), config, soft_sync=sync)

    def stop_at_step_3(done: int, total: int) -> None:
        if done == 3:
            raise KeyboardInterrupt

    checkpointer = MemoryCheckpointer()
    killed_policy, killed_reference = copy.deepcopy(start), copy.deepcopy(start)
    with pytest.raises(KeyboardInterrupt):
        train_dpo(killed_policy, killed_reference, tokenizer, _pairs(8), config, progress=stop_at_step_3,
                  soft_sync=sync, checkpointer=checkpointer)
    assert checkpointer.saved.step == 2 and set(checkpointer.saved.extra) == {"reference"}
    # A fresh process: fresh copies of the start weights, state from the checkpoint.
    resumed_policy, resumed_reference = copy.deepcopy(start), copy.deepcopy(start)
    train_dpo(resumed_policy, resumed_reference, tokenizer, _pairs(8), config, soft_sync=sync,
              checkpointer=checkpointer)
    for expected, actual in ((policy, resumed_policy), (moving, resumed_reference)):
        assert all(torch.equal(a, b) for a, b in zip(expected.state_dict().values(), actual.state_dict().values(),
                                                     strict=True))


def test_margin_descending_order_is_one_order_replayed_every_epoch() -> None:
    assert margin_descending_order([1.0, 3.0, 2.0, 0.5], seed=0) == [1, 2, 0, 3]
    ties = margin_descending_order([1.0, 1.0, 1.0, 5.0], seed=0)
    assert ties[0] == 3 and sorted(ties[1:]) == [0, 1, 2]
    with pytest.raises(ValueError, match="margin for every pair"):
        margin_descending_order([1.0, None], seed=0)
    # Every epoch walks the same order; without one, epochs are seeded permutations.
    assert example_order(4, 3, 3, seed=0, fixed_order=[1, 2, 0, 3]) == [[1, 2, 0], [3, 1, 2], [0, 3, 1]]
    assert example_order(4, 3, 3, seed=0) != example_order(4, 3, 3, seed=0, fixed_order=[1, 2, 0, 3])
    assert TrainConfig(order="margin_descending").order == "margin_descending"
    assert TrainConfig().order == "shuffled"


@pytest.mark.parametrize(("old", "new"), [("margin", "order: margin_descending"), ("none", "order: shuffled")])
def test_the_old_curriculum_name_is_refused_with_what_it_was_and_the_new_name(old, new) -> None:
    # It replayed one fixed order, not Curry-DPO's staged iterations: the name must not claim the paper.
    with pytest.raises(ValueError, match="not Curry-DPO") as error:
        TrainConfig(curriculum=old)
    assert new in str(error.value)
    with pytest.raises(ValueError, match="order: margin_descending"):
        LoopConfig(train={"curriculum": "margin"})


@pytest.mark.parametrize(("policy", "loss", "fix"), [
    ("mixture", "sigmoid", "loss: ipo"),  # the mixture is INPO's reference; INPO's loss is the IPO form
    ("mixture", "cdpo", "train.mixture_weight: τ/η"),
    ("fixed", "sppo", "reference_policy: previous_round"),  # SPPO regresses log π/π_t
    ("soft_sync", "sppo", "reference_policy: previous_round"),
    ("soft_sync", "simpo", "reference_policy: fixed"),  # nothing to sync: simpo has no reference
])
def test_an_iteration_policy_with_a_loss_it_is_not_defined_for_is_refused(policy, loss, fix, tmp_path) -> None:
    with pytest.raises(ValueError, match=f"reference_policy '{policy}'|loss '{loss}' with") as error:
        check_iteration_policy(policy, loss)
    assert fix in str(error.value)
    with pytest.raises(ValueError) as error:
        LoopConfig(reference_policy=policy, train={"training": {"loss": loss}})
    assert fix in str(error.value)
    path = tmp_path / "loop.yaml"
    path.write_text(f"reference_policy: {policy}\ntrain:\n  training:\n    loss: {loss}\n")
    with pytest.raises(ConfigFileError, match="is not a valid loop config") as error:
        load_loop_config(path)
    assert fix in str(error.value)


@pytest.mark.parametrize(("policy", "loss"), [
    ("mixture", "ipo"), ("previous_round", "sppo"), ("fixed", "sigmoid"), ("previous_round", "cdpo"),
    ("soft_sync", "sigmoid"), ("fixed", "simpo"),
])
def test_an_iteration_policy_with_a_loss_it_is_defined_for_loads(policy, loss) -> None:
    check_iteration_policy(policy, loss)
    config = LoopConfig(reference_policy=policy, train={"training": {"loss": loss}})
    assert (config.reference_policy, config.train.training.loss) == (policy, loss)


def test_inpo_is_ipo_against_the_mixture_with_tau_eta() -> None:
    """INPO (Zhang et al. 2024, "Iterative Nash Policy Optimization"), with η = 0.5 and τ = 0.25 (w = τ/η = 0.5), one pair:
    log π(y_w) = −2, log π(y_l) = −4; SFT −3, −3; previous round π_t −2, −3.
    h = log π(y_w)/π(y_l) − (τ/η)·log π_SFT(y_w)/π_SFT(y_l) − (1 − τ/η)·log π_t(y_w)/π_t(y_l)
      = 2 − 0.5·0 − 0.5·1 = 1.5;  loss = (h − 1/(2η))² = (1.5 − 1)² = 0.25;  ∂loss/∂h = 2·0.5 = 1."""
    eta, tau = 0.5, 0.25
    sft = ReferenceLogps(chosen=torch.tensor([-3.0]), rejected=torch.tensor([-3.0]))
    previous = ReferenceLogps(chosen=torch.tensor([-2.0]), rejected=torch.tensor([-3.0]))
    mixed = geometric_mixture(sft, previous, tau / eta)
    logps = SequenceLogps(policy_chosen=torch.tensor([-2.0], requires_grad=True),
                          policy_rejected=torch.tensor([-4.0], requires_grad=True),
                          reference_chosen=mixed.chosen, reference_rejected=mixed.rejected,
                          chosen_lengths=torch.tensor([3.0]), rejected_lengths=torch.tensor([3.0]))
    output = get_loss("ipo")(logps, LossHyperparameters(ipo_tau=eta))
    assert output.losses.tolist() == pytest.approx([0.25])
    output.losses.sum().backward()
    assert logps.policy_chosen.grad.tolist() == pytest.approx([1.0])
    assert logps.policy_rejected.grad.tolist() == pytest.approx([-1.0])


class FakeCall:
    """Records the stage calls of a round instead of running them."""

    def __init__(self):
        self.calls: list[tuple[str, dict, dict]] = []

    def __call__(self, stage, inputs, config, store, name) -> StageResult:
        self.calls.append((stage, inputs, config))
        return StageResult(stage=stage, output=f"{stage_entry(stage).output}/{stage}-out", cached=False)


@pytest.mark.parametrize(("policy", "train_reference", "reference_inputs"), [
    ("fixed", "model/sft", {"preferences": "preferences/kept", "reference": "model/sft"}),
    ("previous_round", "model/start", {"preferences": "preferences/kept", "reference": "model/start"}),
    ("mixture", "model/sft", {"preferences": "preferences/kept", "reference": "model/sft", "mixture_with": "model/start"}),
    ("soft_sync", "model/start", None),
])
def test_round_wires_reference_and_train_per_policy(policy, train_reference, reference_inputs, tmp_path) -> None:
    loss = "ipo" if policy == "mixture" else "sigmoid"  # the mixture is INPO's reference, for its IPO-form loss
    config = LoopConfig(reference_policy=policy,
                        train={"mixture_weight": 0.3, "training": {"max_length": 64, "loss": loss}})
    train_config = config.train.model_dump() | {"reference_policy": policy}
    call = FakeCall()
    results = round_training.reference_and_train(call, train_config, "run", 1, "preferences/kept", "model/start",
                                                 "model/sft", str(tmp_path))
    assert results[-1].stage == "train"
    stages = [name for name, _, _ in call.calls]
    train_inputs = call.calls[-1][1]
    assert train_inputs["reference"] == train_reference
    if reference_inputs is None:
        assert stages == ["train"] and "reference_logps" not in train_inputs
    else:
        assert stages == ["reference", "train"]
        assert call.calls[0][1] == reference_inputs
        assert call.calls[0][2]["max_length"] == 64
        assert call.calls[0][2].get("mixture_weight") == (0.3 if policy == "mixture" else None)
        assert train_inputs["reference_logps"] == "reference_logps/reference-out"


class LoopRecorder:
    """Records every stage call of a whole loop; each call gets its own output, so a test can tell which
    call's output went where. The filter of a round in ``empty_rounds`` keeps no pair."""

    def __init__(self, empty_rounds: frozenset[int] = frozenset()):
        self.calls: list[tuple[str, dict, str]] = []
        self.empty_rounds = empty_rounds

    def __call__(self, stage, inputs, config, store, name) -> StageResult:
        output = f"{stage_entry(stage).output}/{stage}-{len(self.calls)}"
        self.calls.append((stage, inputs, output))
        round_index = int(name.split("/round-")[1].split("/")[0]) if "/round-" in name else 0
        rows = 0 if stage == "filter" and round_index in self.empty_rounds else 5
        return StageResult(stage=stage, output=output, cached=False, rows=rows)

    def inputs_of(self, stage: str, role: str) -> list[str]:
        return [inputs[role] for name, inputs, _ in self.calls if name == stage]

    def outputs_of(self, stage: str) -> list[str]:
        return [output for name, _, output in self.calls if name == stage]


@pytest.mark.parametrize("method", ["best_vs_worst", "mcts"])
def test_each_round_starts_from_the_policy_the_previous_round_trained(method, tmp_path) -> None:
    config = LoopConfig(name="run", rounds=3, construction={"method": method})
    call = LoopRecorder()
    summary = run_loop(config, str(tmp_path / "store"), call=call)
    (sft,) = call.outputs_of("sft")
    trained = call.outputs_of("train")
    assert len(trained) == 3
    generating_stage = "mcts" if method == "mcts" else "sample"
    # Round 1 from the SFT model, round 2 from round 1's policy, round 3 from round 2's: nothing else.
    assert call.inputs_of(generating_stage, "policy") == [sft, trained[0], trained[1]]
    assert call.inputs_of("train", "policy") == [sft, trained[0], trained[1]]
    # Round 0 evaluates the SFT model; round k the policy it trained.
    assert call.inputs_of("evaluate", "policy") == [sft, *trained]
    assert [r.policy for r in summary.rounds] == [sft, *trained]


def test_a_round_without_pairs_hands_its_start_policy_to_the_next(tmp_path) -> None:
    call = LoopRecorder(empty_rounds=frozenset({1}))
    summary = run_loop(LoopConfig(name="run", rounds=3), str(tmp_path / "store"), call=call)
    (sft,) = call.outputs_of("sft")
    trained = call.outputs_of("train")
    assert len(trained) == 2  # round 1 trained nothing
    assert call.inputs_of("sample", "policy") == [sft, sft, trained[0]]
    assert [r.policy for r in summary.rounds] == [sft, sft, *trained]


@pytest.mark.parametrize("policy", ["previous_round", "fixed"])
def test_evaluation_gets_the_start_policy_when_the_reference_is_not_it(policy, tmp_path) -> None:
    call = LoopRecorder()
    run_loop(LoopConfig(name="run", rounds=3, reference_policy=policy), str(tmp_path / "store"), call=call)
    (sft,) = call.outputs_of("sft")
    trained = call.outputs_of("train")
    evaluations = [inputs for name, inputs, _ in call.calls if name == "evaluate"]
    references = [inputs["reference"] for inputs in evaluations]
    starts = [inputs.get("start") for inputs in evaluations]
    if policy == "previous_round":
        assert references == [sft, sft, trained[0], trained[1]]
        # round 1's reference is still the start; from round 2 on the evaluation also measures KL to it
        assert starts == [None, None, sft, sft]
    else:  # the reference is the start every round: kl_to_reference is already the drift
        assert references == [sft] * 4 and starts == [None] * 4


def test_previous_rounds_pairs_are_the_off_policy_input(store) -> None:
    from test_train_resume import put_pairs

    earlier = put_pairs(store, _pairs_table(["a", "b"]))
    store.set_ref("run/round-1/preferences-filtered", earlier.ref)
    train_config = LoopConfig(train={"off_policy_ratio": 0.5}).train.model_dump()
    call = FakeCall()
    round_training.reference_and_train(call, train_config, "run", 2, "preferences/kept", "model/start", "model/sft",
                                       store.uri)
    assert call.calls[0][1]["off_policy"] == earlier.output == call.calls[1][1]["off_policy"]
    call = FakeCall()  # round 1 has no earlier round
    round_training.reference_and_train(call, train_config, "run", 1, "preferences/kept", "model/start", "model/sft",
                                       store.uri)
    assert "off_policy" not in call.calls[-1][1]


def _pairs_table(ids: list[str]) -> pa.Table:
    problems = make_problems(len(ids), seed=len(ids))
    return pa.table({
        "pair_id": ids, "prompt_id": ids, "prompt": [p.prompt for p in problems],
        "chosen": [p.solution for p in problems],
        "rejected": [p.solution.rsplit("A:", 1)[0] + f"A:{int(p.answer) + 1}" for p in problems],
        "margin": [1.0] * len(ids),
    })


def test_off_policy_pairs_make_up_the_configured_share(store) -> None:
    from test_train_resume import TINY_MODEL, put_pairs


    made = run_stage("prompts", {}, {"n_train": 8, "n_heldout": 0, "task": {"min_ops": 1, "max_ops": 1}}, store)
    model = run_stage("sft", {"prompts": made.output}, {"model": TINY_MODEL, "training": {"max_steps": 1, "batch_size": 4}},
                    store)
    current = put_pairs(store, _pairs_table([f"now-{i}" for i in range(4)]), "now")
    earlier = put_pairs(store, _pairs_table([f"old-{i}" for i in range(6)] + ["now-0"]), "old")
    inputs = {"preferences": current.output, "policy": model.output, "reference": model.output,
              "off_policy": earlier.output}
    config = {"training": {"max_steps": 1, "batch_size": 4}, "off_policy_ratio": 0.5, "order": "margin_descending",
              "round": 2}
    logps = run_stage("reference", {k: inputs[k] for k in ("preferences", "reference", "off_policy")}, {}, store)
    assert logps.rows == 10  # 4 now + 6 old, the repeated now-0 scored once
    trained = run_stage("train", inputs | {"reference_logps": logps.output}, config, store)
    # r/(1−r) = 1 off-policy pair per on-policy pair: 4 of the 6 earlier pairs not already in this round.
    assert trained.metrics["pairs"] == 8 and trained.metrics["off_policy_pairs"] == 4
    assert trained.metrics["reference_logps_from_artifact"] == 8
    with pytest.raises(ValueError, match="no 'off_policy' input"):
        run_stage("train", {k: v for k, v in inputs.items() if k != "off_policy"}, config, store)
    # Stage train refuses a policy the loss is not defined for too (prefloop stage train bypasses the loop config).
    sppo = config | {"training": {"max_steps": 1, "batch_size": 4, "loss": "sppo"}}
    with pytest.raises(ValueError, match="reference_policy: previous_round"):
        run_stage("train", inputs | {"reference_logps": logps.output}, sppo | {"reference_policy": "fixed"}, store)
