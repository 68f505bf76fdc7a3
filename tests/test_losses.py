"""Loss registry: values and gradients against numbers derived by hand, and against TRL where it has the loss.

Shared fixture (``_pair_logps``), β = 0.5 unless a test says otherwise:
  pair 1: r(y_w) = −2 − (−3) = 1, r(y_l) = −4 − (−3.5) = −0.5, h = 1.5, β·h = 0.75; |y_w| = 4, |y_l| = 5
  pair 2: every log-prob −1, so r = 0 and h = 0;                                 |y_w| = 2, |y_l| = 2
Values used below: ℓ(z) = −log σ(z) = log(1 + e^−z); ℓ(0.75) = 0.386871, ℓ(−0.75) = ℓ(0.75) + 0.75 = 1.136871,
ℓ(0) = log 2 = 0.693147; σ(0.75) = 0.679179, σ(−0.75) = 0.320821; dℓ(z)/dz = −σ(−z).

Over 400 lines: one test per registered loss against its hand derivation, the trainer's preparation of each
loss's inputs, and the comparison with TRL's trainers share the fixture above; split, they would repeat it.
"""


import pytest
import torch
from pydantic import ValidationError

from prefloop.embedded.model import TinyLlamaConfig, build_model
from prefloop.embedded.tokenizer import build_tokenizer
from prefloop.forward import (
    batch_sequence_logprobs,
    collate,
    completion_lengths,
    completion_logps_and_kl,
    encode_examples,
)
from prefloop.tasks.training.configs import DPOConfig
from prefloop.tasks.training.losses import (
    LOSS_SPECS,
    LOSSES,
    PREFERENCE_LOSSES,
    LossHyperparameters,
    SequenceLogps,
    get_loss,
    get_loss_spec,
    sft_loss,
    sigmoid_loss,
)
from prefloop.tasks.training.recipes.dpo import train_dpo

ISSUE_LOSSES = {
    "sigmoid",
    "cdpo",
    "rdpo",
    "ipo",
    "hinge",
    "simpo",
    "rpo",
    "sppo",
    "tdpo",
    "sft",
}


def _pair_logps(**extra) -> SequenceLogps:
    return SequenceLogps(
        policy_chosen=torch.tensor([-2.0, -1.0], requires_grad=True),
        policy_rejected=torch.tensor([-4.0, -1.0], requires_grad=True),
        reference_chosen=torch.tensor([-3.0, -1.0]),
        reference_rejected=torch.tensor([-3.5, -1.0]),
        chosen_lengths=torch.tensor([4.0, 2.0]),
        rejected_lengths=torch.tensor([5.0, 2.0]),
        **extra,
    )


def _value_and_gradients(name: str, logps: SequenceLogps, **hyperparameters):
    output = get_loss(name)(logps, LossHyperparameters(**hyperparameters))
    output.losses.sum().backward()
    return output, logps.policy_chosen.grad.tolist(), logps.policy_rejected.grad.tolist()


def test_dpo_loss_value_rewards_and_gradient_match_hand_derivation() -> None:
    logps = _pair_logps()
    output = sigmoid_loss(logps, LossHyperparameters(beta=0.5))
    # −log σ(0.5·1.5) = log(1 + e^−0.75) = 0.386871; −log σ(0) = log 2 = 0.693147.
    assert output.losses.tolist() == pytest.approx([0.386871, 0.693147], abs=1e-6)
    # Implicit rewards β·r: 0.5·1 = 0.5 and 0.5·(−0.5) = −0.25.
    assert output.chosen_rewards.tolist() == pytest.approx([0.5, 0.0])
    assert output.rejected_rewards.tolist() == pytest.approx([-0.25, 0.0])
    output.losses.sum().backward()
    # ∂ℓ/∂log π(y_w) = −β·(1 − σ(βh)): −0.5·(1 − σ(0.75)) = −0.160411, and −0.5·0.5 = −0.25 at h = 0;
    # the rejected gradient is the negative of it.
    assert logps.policy_chosen.grad.tolist() == pytest.approx([-0.160411, -0.25], abs=1e-6)
    assert logps.policy_rejected.grad.tolist() == pytest.approx([0.160411, 0.25], abs=1e-6)


def test_length_normalised_dpo_divides_each_log_ratio_by_its_length() -> None:
    output, chosen_grad, rejected_grad = _value_and_gradients(
        "sigmoid", _pair_logps(), beta=0.5, length_normalize=True
    )
    # Pair 1: r(y_w)/4 = 0.25, r(y_l)/5 = −0.1, h = 0.35, βh = 0.175: ℓ(0.175) = 0.609470. Pair 2: h = 0, log 2.
    assert output.losses.tolist() == pytest.approx([0.609470, 0.693147], abs=1e-6)
    assert output.chosen_rewards.tolist() == pytest.approx([0.125, 0.0])  # β·r/|y|
    # ∂/∂log π(y_w) = −β·σ(−βh)/|y_w| = −0.5·0.456272/4 = −0.057045; ∂/∂log π(y_l) = +0.5·0.456272/5 = 0.045636.
    # Pair 2: ∓0.5·0.5/2 = ∓0.125.
    assert chosen_grad == pytest.approx([-0.057045, -0.125], abs=1e-6)
    assert rejected_grad == pytest.approx([0.045636, 0.125], abs=1e-6)


def test_conservative_dpo_with_a_global_label_flip_rate() -> None:
    output, chosen_grad, rejected_grad = _value_and_gradients(
        "cdpo", _pair_logps(), beta=0.5, label_flip_rate=0.2
    )
    # 0.8·ℓ(0.75) + 0.2·ℓ(−0.75) = 0.8·0.386871 + 0.2·1.136871 = 0.536871; at h = 0 it is log 2 for any ε.
    assert output.losses.tolist() == pytest.approx([0.536871, 0.693147], abs=1e-6)
    # ∂/∂z = −(1 − ε)·σ(−z) + ε·σ(z) = σ(z) − (1 − ε): 0.679179 − 0.8 = −0.120821, ×β = −0.060411;
    # pair 2: (0.5 − 0.8)·0.5 = −0.15. The rejected gradient is the negative.
    assert chosen_grad == pytest.approx([-0.060411, -0.15], abs=1e-6)
    assert rejected_grad == pytest.approx([0.060411, 0.15], abs=1e-6)


def test_conservative_dpo_reads_a_per_pair_label_flip_rate_over_the_global_one() -> None:
    logps = _pair_logps(label_flip_rate=torch.tensor([0.5, 0.0]))
    output, chosen_grad, _ = _value_and_gradients("cdpo", logps, beta=0.5, label_flip_rate=0.2)
    # Pair 1, ε = 0.5: ½(ℓ(0.75) + ℓ(−0.75)) = ½(0.386871 + 1.136871) = 0.761871; gradient (σ(0.75) − 0.5)·β = 0.089589.
    # Pair 2, ε = 0: plain DPO, log 2 and −0.25 (the global 0.2 would give −0.15).
    assert output.losses.tolist() == pytest.approx([0.761871, 0.693147], abs=1e-6)
    assert chosen_grad == pytest.approx([0.089589, -0.25], abs=1e-6)


def test_robust_dpo_is_unbiased_dpo_under_label_flips() -> None:
    output, chosen_grad, rejected_grad = _value_and_gradients(
        "rdpo", _pair_logps(), beta=0.5, label_flip_rate=0.2
    )
    # [(1 − ε)ℓ(z) − εℓ(−z)]/(1 − 2ε) = [0.8·0.386871 − 0.2·1.136871]/0.6 = 0.136871 (= ℓ(z) − εz/(1 − 2ε));
    # at z = 0: (0.8 − 0.2)·log 2/0.6 = log 2.
    assert output.losses.tolist() == pytest.approx([0.136871, 0.693147], abs=1e-6)
    # ∂/∂z = −σ(−z) − ε/(1 − 2ε) = −0.320821 − 0.333333 = −0.654154, ×β = −0.327077; pair 2: (−0.5 − 0.333333)·0.5.
    assert chosen_grad == pytest.approx([-0.327077, -0.416667], abs=1e-6)
    assert rejected_grad == pytest.approx([0.327077, 0.416667], abs=1e-6)


def test_label_flip_rates_out_of_range_are_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match="below 0.5"):
        get_loss("rdpo")(_pair_logps(), LossHyperparameters(label_flip_rate=0.5))
    with pytest.raises(ValueError, match=r"min\(1 − confidence, 0.5\)"):
        get_loss("cdpo")(_pair_logps(label_flip_rate=torch.tensor([0.7, 0.1])), LossHyperparameters())
    with pytest.raises(ValidationError):
        LossHyperparameters(label_flip_rate=0.6)


def test_ipo_pulls_the_margin_to_one_over_two_tau() -> None:
    output, chosen_grad, rejected_grad = _value_and_gradients("ipo", _pair_logps(), ipo_tau=0.25)
    # 1/(2τ) = 2: (1.5 − 2)² = 0.25 and (0 − 2)² = 4; ∂/∂log π(y_w) = 2(h − 2) = −1 and −4.
    assert output.losses.tolist() == pytest.approx([0.25, 4.0])
    assert chosen_grad == pytest.approx([-1.0, -4.0])
    assert rejected_grad == pytest.approx([1.0, 4.0])
    normalised, chosen_grad, rejected_grad = _value_and_gradients(
        "ipo", _pair_logps(), ipo_tau=0.25, length_normalize=True
    )
    # h = 1/4 + 0.5/5 = 0.35: (0.35 − 2)² = 2.7225; ∂/∂log π(y_w) = 2(−1.65)/4 = −0.825, ∂/∂log π(y_l) = 3.3/5 = 0.66.
    assert normalised.losses.tolist() == pytest.approx([2.7225, 4.0])
    assert chosen_grad == pytest.approx([-0.825, -2.0])
    assert rejected_grad == pytest.approx([0.66, 2.0])


def test_hinge_is_flat_beyond_the_margin() -> None:
    output, chosen_grad, rejected_grad = _value_and_gradients("hinge", _pair_logps(), beta=1.0)
    # max(0, 1 − 1.5) = 0 with zero gradient; max(0, 1 − 0) = 1 with gradient −β = −1.
    assert output.losses.tolist() == pytest.approx([0.0, 1.0])
    assert chosen_grad == pytest.approx([0.0, -1.0])
    assert rejected_grad == pytest.approx([0.0, 1.0])


def test_simpo_needs_no_reference_and_normalises_by_length() -> None:
    logps = SequenceLogps(
        policy_chosen=torch.tensor([-2.0, -1.0], requires_grad=True),
        policy_rejected=torch.tensor([-4.0, -1.0], requires_grad=True),
        chosen_lengths=torch.tensor([4.0, 2.0]),
        rejected_lengths=torch.tensor([5.0, 2.0]),
    )
    output, chosen_grad, rejected_grad = _value_and_gradients("simpo", logps, simpo_beta=2.0, simpo_gamma=0.5)
    # Pair 1: u = 2·(−2/4 − (−4/5)) − 0.5 = 0.6 − 0.5 = 0.1, ℓ(0.1) = 0.644397.
    # Pair 2: u = 2·(−1/2 + 1/2) − 0.5 = −0.5, ℓ(−0.5) = 0.974077.
    assert output.losses.tolist() == pytest.approx([0.644397, 0.974077], abs=1e-6)
    assert output.chosen_rewards.tolist() == pytest.approx([-1.0, -1.0])  # β·log π(y_w)/|y_w|
    assert output.rejected_rewards.tolist() == pytest.approx([-1.6, -1.0])
    # ∂/∂log π(y_w) = −σ(−u)·β/|y_w|: −0.475021·2/4 = −0.237510 and −0.622459·2/2 = −0.622459;
    # ∂/∂log π(y_l) = +σ(−u)·β/|y_l|: 0.475021·2/5 = 0.190008 and 0.622459.
    assert chosen_grad == pytest.approx([-0.237510, -0.622459], abs=1e-6)
    assert rejected_grad == pytest.approx([0.190008, 0.622459], abs=1e-6)
    # SimPO is normalised by definition: the flag changes nothing.
    again = get_loss("simpo")(
        logps, LossHyperparameters(simpo_beta=2.0, simpo_gamma=0.5, length_normalize=True)
    )
    assert torch.equal(again.losses, output.losses)


def test_rpo_adds_the_weighted_chosen_nll_to_dpo() -> None:
    logps = _pair_logps()
    output = get_loss("rpo")(logps, LossHyperparameters(beta=0.5, nll_weight=1.0))
    # DPO term as above plus η·(−log π(y_w))/|y_w| = 2/4 and 1/2.
    assert output.losses.tolist() == pytest.approx([0.886871, 1.193147], abs=1e-6)
    output.losses.sum().backward()
    # ∂/∂log π(y_w) = −β(1 − σ(βh)) − η/|y_w|: −0.160411 − 0.25 and −0.25 − 0.5.
    assert logps.policy_chosen.grad.tolist() == pytest.approx([-0.410411, -0.75], abs=1e-6)


def test_sppo_regresses_log_ratios_on_plus_minus_half_eta() -> None:
    output, chosen_grad, rejected_grad = _value_and_gradients("sppo", _pair_logps(), beta=0.5)
    # η = 1/β = 2, targets ±1: (1 − 1)² + (−0.5 + 1)² = 0.25; (0 − 1)² + (0 + 1)² = 2.
    assert output.losses.tolist() == pytest.approx([0.25, 2.0])
    # ∂/∂log π(y_w) = 2(r_w − 1) = 0 and −2; ∂/∂log π(y_l) = 2(r_l + 1) = 1 and 2.
    assert chosen_grad == pytest.approx([0.0, -2.0])
    assert rejected_grad == pytest.approx([1.0, 2.0])
    explicit = get_loss("sppo")(_pair_logps(), LossHyperparameters(beta=0.5, sppo_eta=4.0))
    assert explicit.losses.tolist() == pytest.approx([3.25, 8.0])  # (1 − 2)² + (−0.5 + 2)²; 4 + 4


def test_tdpo_penalises_the_rejected_kl_and_stops_the_chosen_kl_gradient() -> None:
    chosen_kl = torch.tensor([0.4, 0.0], requires_grad=True)
    rejected_kl = torch.tensor([1.0, 0.2], requires_grad=True)
    logps = _pair_logps(chosen_kl=chosen_kl, rejected_kl=rejected_kl)
    output, chosen_grad, rejected_grad = _value_and_gradients("tdpo", logps, beta=0.5, tdpo_alpha=0.5)
    # u = βh − α(β·D_l − β·D_w): pair 1: 0.75 − 0.5·(0.5 − 0.2) = 0.6; pair 2: 0 − 0.5·(0.1 − 0) = −0.05.
    # ℓ(0.6) = 0.437488, ℓ(−0.05) = 0.718460.
    assert output.losses.tolist() == pytest.approx([0.437488, 0.718460], abs=1e-6)
    # ∂/∂log π(y_w) = −β·σ(−u): −0.5·0.354344 = −0.177172 and −0.5·0.512497 = −0.256249.
    assert chosen_grad == pytest.approx([-0.177172, -0.256249], abs=1e-6)
    assert rejected_grad == pytest.approx([0.177172, 0.256249], abs=1e-6)
    # ∂/∂D_l = σ(−u)·α·β = 0.354344·0.25 = 0.088586 and 0.512497·0.25 = 0.128124; D_w is stop-gradient.
    assert rejected_kl.grad.tolist() == pytest.approx([0.088586, 0.128124], abs=1e-6)
    assert chosen_kl.grad is None or chosen_kl.grad.abs().sum() == 0


@pytest.mark.parametrize(("name", "what_it_did", "instead"), [
    ("xpo", "rejected completion", "Use loss sigmoid"),
    ("hypo", "stale worst-of-n rejected completion", "Use loss tdpo"),
])
def test_removed_losses_are_refused_with_why_and_what_to_use(name, what_it_did, instead) -> None:
    # XPO's term belongs on a sample from π_ref, HyPO's KL on fresh policy samples; neither was: no name may
    # claim a paper whose method it is not (issue 17, item 5).
    assert name not in LOSSES and name not in PREFERENCE_LOSSES
    for ask in (lambda: get_loss(name), lambda: get_loss_spec(name), lambda: DPOConfig(loss=name)):
        with pytest.raises(ValueError, match="not the paper's method") as error:
            ask()
        assert what_it_did in str(error.value) and instead in str(error.value)
        assert "valid names" not in str(error.value)
    hyperparameter = {"xpo": "xpo_alpha", "hypo": "hypo_lambda"}[name]
    with pytest.raises(ValueError, match=f"delete {hyperparameter}"):
        DPOConfig(**{hyperparameter: 0.1})


def test_sft_loss_is_per_token_negative_log_likelihood() -> None:
    logps = _pair_logps()
    output = sft_loss(logps, LossHyperparameters())
    assert output.losses.tolist() == pytest.approx([0.5, 0.5])  # 2/4 and 1/2
    assert output.chosen_rewards is None
    output.losses.sum().backward()
    assert logps.policy_chosen.grad.tolist() == pytest.approx([-0.25, -0.5])  # −1/|y_w|


def test_completion_logps_and_kl_over_the_vocabulary() -> None:
    # Two-token vocabulary, one row [prompt=0, 1, 0]: positions 0 and 1 predict the completion tokens 1 and 0.
    # Policy p: position 0 logits (0, 0) → (½, ½); position 1 (log 3, 0) → (¾, ¼).
    # Reference q: position 0 (log 3, 0) → (¾, ¼); position 1 (0, 0) → (½, ½).
    log3 = torch.log(torch.tensor(3.0)).item()
    policy_logits = torch.tensor([[[0.0, 0.0], [log3, 0.0], [5.0, -5.0]]], requires_grad=True)
    reference_logits = torch.tensor([[[log3, 0.0], [0.0, 0.0], [0.0, 0.0]]])
    logps, kl = completion_logps_and_kl(
        policy_logits, reference_logits, torch.tensor([[0, 1, 0]]), torch.tensor([[0, 1, 1]])
    )
    # log p(1) + log p(0) = log ½ + log ¾ = log 0.375 = −0.980829.
    assert logps.tolist() == pytest.approx([-0.980829], abs=1e-6)
    # KL(q‖p) = ¾ log(¾/½) + ¼ log(¼/½) = 0.130812 at position 0, ½ log(½/¾) + ½ log(½/¼) = 0.143841 at 1.
    assert kl.tolist() == pytest.approx([0.274653], abs=1e-6)
    kl.sum().backward()
    # ∂KL(q‖p)/∂logits = p − q: (½ − ¾, ½ − ¼) and (¾ − ½, ¼ − ½); the last position carries no loss.
    assert policy_logits.grad.flatten().tolist() == pytest.approx([-0.25, 0.25, 0.25, -0.25, 0.0, 0.0])


def test_registry_lookup_and_unknown_name_lists_valid_names() -> None:
    assert set(LOSSES) == ISSUE_LOSSES
    assert get_loss("sigmoid") is sigmoid_loss
    assert get_loss("sft") is sft_loss
    with pytest.raises(ValueError) as error:
        get_loss("dpo-typo")
    for name in LOSSES:
        assert name in str(error.value)
    with pytest.raises(ValueError, match="valid names"):
        get_loss_spec("dpo-typo")


def test_every_loss_documents_its_formula_and_paper() -> None:
    for name, function in LOSSES.items():
        doc = function.__doc__ or ""
        assert "loss = " in doc, f"{name} docstring lacks its formula"
        assert any(str(year) in doc for year in range(2020, 2027)), f"{name} docstring cites no paper"


def test_specs_say_what_each_loss_needs() -> None:
    assert PREFERENCE_LOSSES == ISSUE_LOSSES - {"sft"}
    assert {name for name, spec in LOSS_SPECS.items() if not spec.needs_reference} == {"simpo", "sft"}
    assert {name for name, spec in LOSS_SPECS.items() if spec.needs_kl_to_reference} == {"tdpo"}
    assert {name for name, spec in LOSS_SPECS.items() if spec.uses_label_flip_rate} == {"cdpo", "rdpo"}
    assert get_loss_spec("tdpo").function is get_loss("tdpo")


@pytest.mark.parametrize(
    ("name", "logps", "missing"),
    [
        (
            "sigmoid",
            SequenceLogps(policy_chosen=torch.tensor([-1.0]), chosen_lengths=torch.tensor([1.0])),
            "reference",
        ),
        (
            "simpo",
            SequenceLogps(policy_chosen=torch.tensor([-1.0]), chosen_lengths=torch.tensor([1.0])),
            "policy_rejected",
        ),
        ("tdpo", _pair_logps(), "chosen_kl"),
    ],
)
def test_missing_inputs_name_what_is_missing_and_how_to_fix(
    name: str, logps: SequenceLogps, missing: str
) -> None:
    with pytest.raises(ValueError, match=missing) as error:
        get_loss(name)(logps, LossHyperparameters())
    assert f"loss '{name}' needs" in str(error.value)


def test_dpo_config_takes_every_loss_hyperparameter_by_name() -> None:
    config = DPOConfig(loss="tdpo", tdpo_alpha=0.3, beta=0.2, length_normalize=True, label_flip_rate=0.05)
    hyperparameters = config.loss_hyperparameters()
    assert (hyperparameters.tdpo_alpha, hyperparameters.beta, hyperparameters.length_normalize) == (
        0.3,
        0.2,
        True,
    )
    assert set(LossHyperparameters.model_fields) <= set(DPOConfig.model_fields)
    with pytest.raises(ValidationError, match="valid names are"):
        DPOConfig(loss="dpo-typo")
    with pytest.raises(ValidationError, match="extra"):
        DPOConfig(tdpo_alfa=0.3)


# --- The trainer prepares what each spec asks for -------------------------------------------------------------

TINY = TinyLlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
PAIRS = [("1+2=?\n", "1+2=3\nA:3", "1+2=4\nA:4"), ("5-1=?\n", "5-1=4\nA:4", "A:5")]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


class _NoReference:
    """A reference the trainer must not touch (losses without a reference)."""

    def __getattr__(self, name: str):
        raise AssertionError(f"the reference was used ({name}) by a loss whose spec needs none")


@pytest.mark.parametrize("name", sorted(PREFERENCE_LOSSES))
def test_train_dpo_runs_every_preference_loss(tokenizer, name: str) -> None:
    policy = build_model(TINY, len(tokenizer), seed=1, tokenizer=tokenizer)
    needs_reference = get_loss_spec(name).needs_reference
    reference = (
        build_model(TINY, len(tokenizer), seed=0, tokenizer=tokenizer) if needs_reference else _NoReference()
    )
    history = train_dpo(
        policy,
        reference,
        tokenizer,
        PAIRS,
        DPOConfig(loss=name, learning_rate=1e-3, max_steps=2, batch_size=2),
    )
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(step["loss"])) for step in history)


def test_train_dpo_fills_the_token_level_kl_for_tdpo(tokenizer) -> None:
    policy = build_model(TINY, len(tokenizer), seed=1, tokenizer=tokenizer)
    reference = build_model(TINY, len(tokenizer), seed=0, tokenizer=tokenizer)
    # The first step's loss (both pairs in one batch, weights untouched) recomputed from the logits directly.
    encoded = encode_examples(
        tokenizer, [p for p, _, _ in PAIRS] * 2, [c for _, c, _ in PAIRS] + [r for *_, r in PAIRS]
    )
    batch = collate(encoded, tokenizer.pad_token_id)
    with torch.no_grad():
        policy_logps, kl = completion_logps_and_kl(
            policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits,
            reference(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits,
            batch.input_ids,
            batch.completion_mask,
        )
        reference_logps, _ = completion_logps_and_kl(
            reference(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits,
            reference(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits,
            batch.input_ids,
            batch.completion_mask,
        )
    lengths = batch.completion_lengths
    expected = (
        get_loss("tdpo")(
            SequenceLogps(
                policy_chosen=policy_logps[:2],
                policy_rejected=policy_logps[2:],
                reference_chosen=reference_logps[:2],
                reference_rejected=reference_logps[2:],
                chosen_lengths=lengths[:2],
                rejected_lengths=lengths[2:],
                chosen_kl=kl[:2],
                rejected_kl=kl[2:],
            ),
            LossHyperparameters(beta=0.5, tdpo_alpha=0.5),
        )
        .losses.mean()
        .item()
    )
    assert kl.min() > 0  # two different models: the KL term is live
    history = train_dpo(
        policy,
        reference,
        tokenizer,
        PAIRS,
        DPOConfig(loss="tdpo", beta=0.5, tdpo_alpha=0.5, learning_rate=1e-3, max_steps=1, batch_size=2),
    )
    assert history[0]["loss"] == pytest.approx(expected, abs=1e-5)


# --- TRL equality --------------------------------------------------------------------------------------------
# Both sides run on real models through public surfaces only: TRL's DPOTrainer (and CPOTrainer) built on the
# embedded tiny Llama and character tokenizer, its loss taken with ``compute_loss`` on a batch from its own
# ``get_train_dataloader``; ours from ``train_dpo``'s first step (the whole trainer path: tokenisation, the
# pair forward, the loss) and, for gradients, from ``prefloop.forward`` + the registered loss. A change in one
# of our formulas, or a TRL change in tokenisation, masking or a loss, makes the two disagree.

TRL_PAIRS = [
    ("1+2=?\n", "1+2=3\nA:3", "1+2=4\nA:4"),
    ("3+4=?\n", "3+4=7\nA:7", "3+4=8\nA:8"),
    # Every chosen completion has the same length (so TRL's sft, a mean over all chosen tokens, equals ours, a
    # mean per example then over the batch); one rejected completion is longer (so length normalisation counts).
    ("4*2=?\n", "4*2=8\nA:8", "4*2=10\nA:10"),
]
TRL_TINY = TinyLlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                           max_position_embeddings=64)


def _tiny_pair(tokenizer) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A policy and a different reference (so every log-ratio is non-zero), the same weights on every call."""
    return (build_model(TRL_TINY, len(tokenizer), seed=0, tokenizer=tokenizer),
            build_model(TRL_TINY, len(tokenizer), seed=1, tokenizer=tokenizer))


def _gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    gradients = {name: parameter.grad.clone() for name, parameter in model.named_parameters()}
    model.zero_grad()
    return gradients


def _trl_dataset():
    datasets = pytest.importorskip("datasets")
    prompts, chosen, rejected = zip(*TRL_PAIRS, strict=True)
    return datasets.Dataset.from_dict({"prompt": list(prompts), "chosen": list(chosen), "rejected": list(rejected)})


def _trl_common_arguments(output_dir) -> dict:
    return dict(output_dir=str(output_dir), per_device_train_batch_size=len(TRL_PAIRS), report_to="none",
                # float32 throughout: TRL's configs default to bf16, under which accelerate autocasts the reference.
                use_cpu=True, bf16=False, activation_checkpointing=False, logging_strategy="no", save_strategy="no",
                disable_tqdm=True)


def _trl_dpo_loss(tokenizer, output_dir, loss_type: str, beta: float, label_smoothing: float):
    """TRL's DPO loss of the whole batch and its gradient w.r.t. every policy parameter."""
    trl = pytest.importorskip("trl", reason="trl is not installed (dev extra)")
    policy, reference = _tiny_pair(tokenizer)
    arguments = trl.DPOConfig(loss_type=[loss_type], beta=beta, label_smoothing=label_smoothing,
                              precompute_ref_log_probs=False, max_length=None, **_trl_common_arguments(output_dir))
    trainer = trl.DPOTrainer(model=policy, ref_model=reference, args=arguments, processing_class=tokenizer,
                             train_dataset=_trl_dataset())
    batch = next(iter(trainer.get_train_dataloader()))  # the whole dataset: one batch, so its order is immaterial
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return loss.item(), _gradients(policy)


def _our_loss_and_gradients(tokenizer, name: str, reference_free: bool = False, **hyperparameters):
    """Our loss of the same batch from prefloop.forward's log-probs, and its gradient w.r.t. the policy.

    ``reference_free``: reference log-probs of 0 (a reference that is certain of every completion), which
    makes the log-ratios the policy's log-probs themselves, as in CPO.
    """
    policy, reference = _tiny_pair(tokenizer)
    prompts, chosen, rejected = zip(*TRL_PAIRS, strict=True)
    encoded_chosen = encode_examples(tokenizer, prompts, chosen)
    encoded_rejected = encode_examples(tokenizer, prompts, rejected)
    chosen_batch = collate(encoded_chosen, tokenizer.pad_token_id)
    rejected_batch = collate(encoded_rejected, tokenizer.pad_token_id)
    with torch.no_grad():
        reference_chosen = batch_sequence_logprobs(reference, chosen_batch)
        reference_rejected = batch_sequence_logprobs(reference, rejected_batch)
    if reference_free:
        reference_chosen, reference_rejected = torch.zeros(len(prompts)), torch.zeros(len(prompts))
    logps = SequenceLogps(
        policy_chosen=batch_sequence_logprobs(policy, chosen_batch),
        policy_rejected=batch_sequence_logprobs(policy, rejected_batch),
        reference_chosen=reference_chosen,
        reference_rejected=reference_rejected,
        chosen_lengths=completion_lengths(encoded_chosen),
        rejected_lengths=completion_lengths(encoded_rejected),
    )
    loss = get_loss(name)(logps, LossHyperparameters(**hyperparameters)).losses.mean()
    loss.backward()
    return loss.item(), _gradients(policy)


def _assert_same_gradients(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert set(ours) == set(theirs)
    assert any(gradient.abs().max() > 1e-3 for gradient in theirs.values())  # a live gradient, not all zeros
    # The band is float32 rounding (TRL's tiled fused head against our log-softmax); a changed formula, scale
    # or mask moves gradients by percents.
    for name, gradient in theirs.items():
        assert torch.allclose(ours[name], gradient, rtol=1e-4, atol=1e-5), f"gradient of {name} differs from TRL's"


@pytest.mark.parametrize(
    ("trl_loss_type", "trl_beta", "trl_label_smoothing", "ours", "hyperparameters"),
    [
        ("sigmoid", 0.5, 0.0, "sigmoid", {"beta": 0.5}),
        ("sigmoid_norm", 0.5, 0.0, "sigmoid", {"beta": 0.5, "length_normalize": True}),
        ("hinge", 0.5, 0.0, "hinge", {"beta": 0.5}),
        ("ipo", 0.25, 0.0, "ipo", {"ipo_tau": 0.25, "length_normalize": True}),  # TRL's β is IPO's τ
        ("robust", 0.5, 0.2, "rdpo", {"beta": 0.5, "label_flip_rate": 0.2}),
        ("sppo_hard", 0.5, 0.0, "sppo", {"beta": 0.5}),
        ("sft", 0.5, 0.0, "sft", {}),
    ],
)
def test_same_value_and_gradient_as_trl_dpo_trainer(
    tokenizer, tmp_path, trl_loss_type: str, trl_beta: float, trl_label_smoothing: float, ours: str,
    hyperparameters: dict,
) -> None:
    trl_value, trl_gradients = _trl_dpo_loss(tokenizer, tmp_path, trl_loss_type, trl_beta, trl_label_smoothing)
    our_value, our_gradients = _our_loss_and_gradients(tokenizer, ours, **hyperparameters)
    # Float32 sums of ~30 nats differ in their last bits between TRL's tiled head and ours; sppo squares them.
    assert our_value == pytest.approx(trl_value, rel=1e-5, abs=1e-6)
    _assert_same_gradients(our_gradients, trl_gradients)
    if get_loss_spec(ours).needs_rejected:
        # Our trainer's first step (weights untouched, all three pairs in one batch) reports the same loss.
        policy, reference = _tiny_pair(tokenizer)
        config = DPOConfig(loss=ours, max_steps=1, batch_size=len(TRL_PAIRS), learning_rate=1e-3, **hyperparameters)
        history = train_dpo(policy, reference, tokenizer, TRL_PAIRS, config)
        assert history[0]["loss"] == pytest.approx(trl_value, abs=1e-5)


def _trl_cpo_trainer(tokenizer, output_dir, loss_type: str, beta: float, **extra):
    cpo = pytest.importorskip("trl.experimental.cpo", reason="trl is not installed (dev extra)")
    policy, _ = _tiny_pair(tokenizer)
    arguments = cpo.CPOConfig(loss_type=loss_type, beta=beta, cpo_alpha=0.0, max_length=64, **extra,
                              **_trl_common_arguments(output_dir))
    return cpo.CPOTrainer(model=policy, args=arguments, processing_class=tokenizer, train_dataset=_trl_dataset())


def _trl_cpo_loss(tokenizer, output_dir, loss_type: str, beta: float, **extra):
    trainer = _trl_cpo_trainer(tokenizer, output_dir, loss_type, beta, **extra)
    loss = trainer.compute_loss(trainer.model, next(iter(trainer.get_train_dataloader())))
    loss.backward()
    return loss.item(), _gradients(trainer.model)


def test_simpo_matches_trl_cpo_trainer(tokenizer, tmp_path) -> None:
    # CPOTrainer's simpo takes the length-averaged log-probs (its average_log_prob=True for simpo).
    trl_value, trl_gradients = _trl_cpo_loss(tokenizer, tmp_path, "simpo", 2.0, simpo_gamma=0.5)
    our_value, our_gradients = _our_loss_and_gradients(tokenizer, "simpo", simpo_beta=2.0, simpo_gamma=0.5)
    assert our_value == pytest.approx(trl_value, abs=1e-6)
    _assert_same_gradients(our_gradients, trl_gradients)


def test_conservative_dpo_matches_trl_label_smoothing(tokenizer, tmp_path) -> None:
    # TRL 1.16's DPOTrainer dropped label smoothing from its sigmoid loss; CPOTrainer's sigmoid keeps the
    # conservative form (1 − ε)ℓ(β·Δ) + εℓ(−β·Δ), on the policy's log-probs (it has no reference): ours with a
    # reference of log-prob 0 is that same loss.
    trl_value, trl_gradients = _trl_cpo_loss(tokenizer, tmp_path, "sigmoid", 0.5, label_smoothing=0.2)
    our_value, our_gradients = _our_loss_and_gradients(tokenizer, "cdpo", reference_free=True, beta=0.5,
                                                       label_flip_rate=0.2)
    assert our_value == pytest.approx(trl_value, abs=1e-6)
    _assert_same_gradients(our_gradients, trl_gradients)
