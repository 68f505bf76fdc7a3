"""Issue 15's "Done when" gaps: the evaluation of reward-model-labeled rounds and the tables that show it, the
``--policy`` override and the bad inputs through the command line, and a loop from an imported model through a
real Prefect server.

Evaluation (stage tier, hand-made policies and reward models, so every number is known):

* an ensemble's evaluation reward follows the loop's ``reward_model.aggregate`` (mean / min /
  uncertainty-weighted of the members standardised as label-rm does), on hand numbers;
* verifier accuracy counts only prompts with a reference answer (its count says how many); None, not 0,
  when none has one;
* ``prefloop run``'s table and ``prefloop compare`` show mean reward ± SE and the win rate vs the previous
  round next to accuracy ± SE and the paired gain vs round 0, on a tiny run's metrics.

Command line (flow tier): ``prefloop run --policy DIR`` replaces the config's policy; every bad input the
issue lists is one ``error:`` line naming the fix, exit code 2, and nothing in the store. The server test is
slow (a real ``prefect server start``, then the loop's flow run against it).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml
from typer.testing import CliRunner

from prefloop.backends.base import Completion
from prefloop.cli import app
from prefloop.config import LoopConfig, load_loop_config
from prefloop.datasets_spec import PROMPTS
from prefloop.errors import UserError
from prefloop.stage import StageConfig, StageOutput, StageSpec, execute
from prefloop.storage import ArtifactStore
from prefloop.tasks.common.ensembles import MemberStandardisation
from prefloop.tasks.registry import run_stage

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


# ---------------------------------------------------------------------------------------------
# Hand-made policies and reward models: the evaluate stage reads them through its own loading code
# (HFBackend.from_directory, the reward-model recipe's loaders), replaced here by lookups in files.
# ---------------------------------------------------------------------------------------------
class _Named(StageConfig):
    name: str = ""


class _HandPolicy:
    """Answers each prompt with the completion its directory's ``answers.json`` gives (all samples alike)."""

    def __init__(self, directory: Path):
        self.answers = json.loads((Path(directory) / "answers.json").read_text())

    def generate(self, prompts, params, progress=None):
        return [[Completion(text=self.answers[p], num_tokens=len(self.answers[p]), sum_logprob=-1.0,
                            finish_reason="stop")] * params.n for p in prompts]


def _hand_model(store: ArtifactStore, scratch: Path, name: str, files: dict[str, object]):
    """A model artifact holding ``files`` (JSON), written under its own config so each has its own id."""
    directory = scratch / name
    directory.mkdir(parents=True)
    for file, content in files.items():
        (directory / file).write_text(json.dumps(content))
    spec = StageSpec("hand-model", "1", _Named, "model", {})
    return execute(spec, lambda ctx: StageOutput(files_dir=directory, remove_files_dir=False), {}, {"name": name}, store)


def _hand_prompts(store: ArtifactStore, answers: list[str | None], name: str = "prompts"):
    table = pa.table({"prompt_id": [f"p{i}" for i in range(len(answers))],
                      "prompt": [f"question {i}?" for i in range(len(answers))],
                      "reference_answer": pa.array(answers, pa.string()), "split": ["heldout"] * len(answers)})
    return execute(StageSpec("hand-prompts", "1", _Named, "prompts", {}, PROMPTS), lambda ctx: StageOutput(table=table),
                   {}, {"name": name}, store)


# Two members' raw rewards of three completions and their reference statistics (μ_i, σ_i), by hand:
#   member 0: r = 1, 3, 5   with μ = 3,  σ = 2 → z = −1,  0, 1
#   member 1: r = 10, 6, 14 with μ = 10, σ = 4 → z =  0, −1, 1
MEMBER_REWARDS = {"m0": {"#### 1": 1.0, "#### 2": 3.0, "#### 3": 5.0},
                  "m1": {"#### 1": 10.0, "#### 2": 6.0, "#### 3": 14.0}}
HAND_STATISTICS = MemberStandardisation((3.0, 10.0), (2.0, 4.0), "hand-made reference set", 3)
EXPECTED = {"mean": [-0.5, -0.5, 1.0],                    # z̄
            "min": [-1.0, -1.0, 1.0],                     # min_i z_i
            "uncertainty_weighted": [-0.625, -0.625, 1.0]}  # z̄ − 0.5·var_i z_i (var = 0.25, 0.25, 0)


@pytest.fixture
def hand_models(monkeypatch):
    """Route the evaluate stage's model loading to the hand-made files (see :class:`_HandPolicy`)."""
    from prefloop.backends.hf import HFBackend
    from prefloop.tasks.training.recipes import reward_model as recipe

    monkeypatch.setattr(HFBackend, "from_directory", lambda directory, **kwargs: _HandPolicy(directory))
    monkeypatch.setattr(recipe, "reward_model_members", lambda directory: [Path(directory) / m for m in MEMBER_REWARDS])
    monkeypatch.setattr(recipe, "load_reward_model", lambda member: (Path(member).name, None))
    monkeypatch.setattr(recipe, "score_texts", lambda member, tokenizer, prompts, completions, batch_size:
                        np.array([MEMBER_REWARDS[member][c] for c in completions]))
    monkeypatch.setattr(MemberStandardisation, "read", classmethod(lambda cls, directory: HAND_STATISTICS))


EVALUATE = {"max_prompts": 8, "max_new_tokens": 8, "samples_per_prompt": 0, "batch_size": 8, "task": "gsm8k"}


@pytest.mark.parametrize("aggregate", ["mean", "min", "uncertainty_weighted"])
def test_evaluation_reward_follows_the_loops_ensemble_aggregate(hand_models, store, tmp_path, aggregate):
    # The loop's reward_model.aggregate reaches the evaluation section (unless that sets its own) ...
    loop = LoopConfig.model_validate({"reward_model": {"model": "mine/rm", "aggregate": aggregate,
                                                       "uncertainty_weight": 0.5}})
    assert (loop.evaluation.reward_aggregation, loop.evaluation.uncertainty_penalty) == (aggregate, 0.5)
    assert LoopConfig.model_validate({"reward_model": {"model": "mine/rm", "aggregate": aggregate},
                                      "evaluation": {"reward_aggregation": "mean"}}).evaluation.reward_aggregation == "mean"
    # ... and the stage scores with it: each member standardised with its stored μ_i, σ_i, then aggregated.
    prompts = _hand_prompts(store, ["1", "2", "3"])
    policy = _hand_model(store, tmp_path, "policy", {"answers.json": {f"question {i}?": f"#### {i + 1}" for i in range(3)}})
    ensemble = _hand_model(store, tmp_path, "ensemble", {"ensemble.json": {"members": list(MEMBER_REWARDS)}})
    config = EVALUATE | loop.evaluation.model_dump(include={"reward_aggregation", "uncertainty_penalty"})
    result = run_stage("evaluate", {"policy": policy.output, "prompts": prompts.output, "reward_model": ensemble.output},
                       config, store)
    rewards = store.read_table(result.ref, "eval_results").column("reward").to_pylist()
    assert rewards == pytest.approx(EXPECTED[aggregate])
    rows = {row["metric"]: row for row in store.read_table(result.ref).to_pylist()}
    expected = EXPECTED[aggregate]
    assert rows["mean_reward"]["value"] == pytest.approx(np.mean(expected))
    assert rows["mean_reward"]["stderr"] == pytest.approx(np.std(expected, ddof=1) / math.sqrt(3))
    assert result.metrics["reward_aggregation"] == {"uncertainty_weighted": "mean-0.5var"}.get(aggregate, aggregate)


def test_reward_wins_against_an_evaluation_under_another_aggregate_are_refused(hand_models, store, tmp_path):
    prompts = _hand_prompts(store, ["1", "2", "3"])
    policy = _hand_model(store, tmp_path, "policy", {"answers.json": {f"question {i}?": f"#### {i + 1}" for i in range(3)}})
    ensemble = _hand_model(store, tmp_path, "ensemble", {"ensemble.json": {"members": list(MEMBER_REWARDS)}})
    inputs = {"policy": policy.output, "prompts": prompts.output, "reward_model": ensemble.output}
    judged = EVALUATE | {"win_judge": "reward_model"}
    base = run_stage("evaluate", inputs, judged | {"reward_aggregation": "mean"}, store)
    with pytest.raises(UserError, match="aggregated the ensemble's rewards as mean.*this one as min"):
        run_stage("evaluate", inputs | {"previous": base.output}, judged | {"reward_aggregation": "min"}, store)
    same = run_stage("evaluate", inputs | {"previous": base.output}, judged | {"reward_aggregation": "mean"}, store)
    assert same.metrics["tie_rate_vs_previous"] == 1.0  # the same completions, the same rewards


def test_accuracy_is_over_the_prompts_with_a_reference_answer(hand_models, store, tmp_path):
    # q0 right, q1 wrong, q2 and q3 without a reference answer (None, blank), q4's reference unreadable by the
    # task's numeric check (answered "5": counting it would score it wrong): accuracy 1/2 over 2 prompts.
    prompts = _hand_prompts(store, ["1", "5", None, "  ", "five"])
    answers = {f"question {i}?": f"#### {i + 1}" for i in range(5)}
    policy = _hand_model(store, tmp_path, "policy", {"answers.json": answers})
    config = EVALUATE | {"samples_per_prompt": 2, "pass_k": [1, 2], "sampled_prompts": None}
    result = run_stage("evaluate", {"policy": policy.output, "prompts": prompts.output}, config, store)
    rows = {row["metric"]: row for row in store.read_table(result.ref).to_pylist()}
    assert (rows["accuracy"]["value"], rows["accuracy"]["count"]) == (0.5, 2)
    assert rows["accuracy"]["stderr"] == pytest.approx(math.sqrt(0.5 * 0.5 / 2))
    assert (rows["pass@1"]["value"], rows["pass@1"]["count"]) == (0.5, 2)
    assert rows["mean_length"]["count"] == 5  # what is not about answers still covers every prompt
    assert any("3 of the 5 evaluated prompts have no reference answer the checker can read" in note
               for note in result.metrics["notes"])
    per_prompt = store.read_table(result.ref, "eval_results").to_pylist()
    assert [r["correct"] for r in per_prompt] == [True, False, None, None, None]
    assert [r["samples_correct"] for r in per_prompt] == [2, 0, None, None, None]

    # Paired with a baseline that got q1 right: the gain is over the 2 prompts both verified.
    better = _hand_model(store, tmp_path, "baseline", {"answers.json": answers | {"question 1?": "#### 5"}})
    base = run_stage("evaluate", {"policy": better.output, "prompts": prompts.output}, EVALUATE, store)
    paired = run_stage("evaluate", {"policy": policy.output, "prompts": prompts.output, "baseline": base.output,
                                    "previous": base.output}, EVALUATE, store)
    rows = {row["metric"]: row for row in store.read_table(paired.ref).to_pylist()}
    assert (rows["accuracy_gain"]["value"], rows["accuracy_gain"]["count"]) == (-0.5, 2)
    assert rows["win_rate_vs_previous"]["count"] == 2 and rows["loss_rate_vs_previous"]["value"] == 0.5


def test_accuracy_is_none_when_no_prompt_has_a_reference_answer(hand_models, store, tmp_path):
    prompts = _hand_prompts(store, [None, None, ""])
    policy = _hand_model(store, tmp_path, "policy", {"answers.json": {f"question {i}?": "#### 1" for i in range(3)}})
    ensemble = _hand_model(store, tmp_path, "ensemble", {"ensemble.json": {"members": list(MEMBER_REWARDS)}})
    inputs = {"policy": policy.output, "prompts": prompts.output, "reward_model": ensemble.output}
    config = EVALUATE | {"samples_per_prompt": 2, "pass_k": [1], "sampled_prompts": None}
    base = run_stage("evaluate", inputs, config, store)
    result = run_stage("evaluate", inputs | {"baseline": base.output}, config, store)
    rows = {row["metric"]: row for row in store.read_table(result.ref).to_pylist()}
    assert rows["accuracy"]["value"] is None and rows["accuracy"]["count"] == 0 and result.metrics["accuracy"] is None
    assert "pass@1" not in rows and "accuracy_gain" not in rows and "win_rate_vs_sft" not in rows
    assert rows["mean_reward"]["count"] == 3  # the reward model still scores every prompt
    assert any("none of the 3 evaluated prompts has a reference answer" in note for note in result.metrics["notes"])
    from prefloop.report import load_run

    store.set_ref("blind/round-0/metrics", base.ref)
    assert load_run(store, "blind").rounds[0].get("accuracy") is None  # shown as missing, not as 0 %


# ---------------------------------------------------------------------------------------------
# The tables of a tiny run: `prefloop run`'s (round_table) and `prefloop compare`'s by-round table.
# ---------------------------------------------------------------------------------------------
def _tiny_runs(store: ArtifactStore, scratch: Path) -> None:
    """Two three-round runs evaluated on the same 3 prompts: ``rm`` scored and judged by the hand ensemble
    (as an RM-labeled loop is), ``verifier`` judged by the verifier without a reward model."""
    prompts = _hand_prompts(store, ["1", "2", "3"])
    ensemble = _hand_model(store, scratch, "ensemble", {"ensemble.json": {"members": list(MEMBER_REWARDS)}})
    # Right answers 1/3, 2/3, 3/3; rewards under the min aggregate (EXPECTED): −1 for #### 1 and #### 2, +1 for #### 3.
    rounds = [["#### 1", "#### 1", "#### 1"], ["#### 1", "#### 1", "#### 3"], ["#### 1", "#### 2", "#### 3"]]
    for run, extra in (("rm", {"reward_model": ensemble.output}), ("verifier", {})):
        judge = {"win_judge": "reward_model", "reward_aggregation": "min"} if extra else {}
        metrics: list[str] = []
        for index, completions in enumerate(rounds):
            policy = _hand_model(store, scratch, f"{run}-{index}", {"answers.json": {
                f"question {i}?": text for i, text in enumerate(completions)}})
            paired = {"baseline": metrics[0], "previous": metrics[-1]} if metrics else {}
            made = run_stage("evaluate", {"policy": policy.output, "prompts": prompts.output, **extra, **paired},
                             EVALUATE | judge | {"round": index}, store, f"{run}/round-{index}/metrics")
            metrics.append(made.output)


def _cells(table) -> dict[str, list[str]]:
    return {str(column.header): [str(cell) for cell in column._cells] for column in table.columns}


def test_run_table_and_compare_show_reward_and_win_rate_beside_accuracy_and_gain(hand_models, store, tmp_path):
    from prefloop.cli import round_table
    from prefloop.report import format_metric, load_run

    _tiny_runs(store, tmp_path)
    stored = {k: {row["metric"]: row for row in store.read_table(store.resolve(f"rm/round-{k}/metrics")).to_pylist()}
              for k in range(3)}

    def shown(k: int, metric: str) -> str:
        """A stored value ± SE as the tables print it, written out here: rates in percent, the gain signed."""
        row = stored[k][metric]
        if metric == "mean_reward":
            return f"{row['value']:.2f} ± {row['stderr']:.2f}"
        sign = "+" if metric == "accuracy_gain" else ""
        return f"{row['value'] * 100:{sign}.1f} ± {row['stderr'] * 100:.1f}%"

    cells = _cells(round_table(store, "rm"))
    assert cells["round"] == ["0", "1", "2"]
    # By hand: accuracy 3/3 in round 2; its gain vs round 0, d = (0, 1, 1): 2/3 ± sqrt(1/3)/√3. Mean reward
    # −1, −1/3, −1/3; round 1 beats round 0 on one prompt by reward (+1 vs −1), round 2 ties round 1 everywhere.
    assert cells["accuracy"] == ["33.3 ± 27.2%", "66.7 ± 27.2%", "100.0 ± 0.0%"]
    assert cells["gain vs round 0"] == ["–", "+33.3 ± 33.3%", "+66.7 ± 33.3%"]
    assert cells["mean reward"] == ["-1.00 ± 0.00", "-0.33 ± 0.67", "-0.33 ± 0.67"]
    assert cells["mean reward"] == [shown(k, "mean_reward") for k in range(3)]
    assert cells["win vs prev"] == ["–", "33.3 ± 27.2%", "0.0 ± 0.0%"]
    assert cells["win/tie/loss vs prev"] == ["–", "33/67/0", "0/100/0"]
    assert "wins judged by the reward model" in str(round_table(store, "rm").title)
    plain = round_table(store, "verifier")
    assert "mean reward" not in _cells(plain) and "win vs prev" not in _cells(plain) and "judged" not in str(plain.title)
    assert "gain vs round 0" in _cells(plain)

    # compare: one round of each side by side (every metric), then both runs round by round.
    out = tmp_path / "compare.md"
    result = runner.invoke(app, ["compare", "rm", "verifier", "--store", store.uri, "--markdown", str(out)])
    assert result.exit_code == 0, result.output
    page = out.read_text()
    assert "mean reward and win rate vs the previous round (wins of rm judged by the reward model)" in page
    by_round = [line for line in page.splitlines() if line.startswith("| 2 |")][-1]
    rm_cells = [shown(2, m) for m in ("accuracy", "accuracy_gain", "mean_reward", "win_rate_vs_previous")]
    assert by_round == "| " + " | ".join(["2", *rm_cells, "100.0 ± 0.0%", "+66.7 ± 33.3%"]) + " |"
    header = [line for line in page.splitlines() if line.startswith("| round |")][-1]
    assert header == ("| round | rm: accuracy | rm: gain vs round 0 | rm: mean reward | rm: win vs prev | "
                      "verifier: accuracy | verifier: gain vs round 0 |")
    assert format_metric("mean_reward", load_run(store, "rm").rounds[2].get("mean_reward")) == rm_cells[2]


# ---------------------------------------------------------------------------------------------
# The command line: `prefloop run --policy`, and the bad inputs of the issue — one error line naming the fix,
# exit code 2, nothing written.
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def user_files(tmp_path_factory):
    """What a user brings: an (untrained) save_pretrained policy directory, a prompt file with its own column
    names, and a loop config naming a policy that is not in the store (so only --policy makes it run)."""
    from helpers import save_tiny_policy

    from prefloop.embedded.arithmetic import make_problems

    root = tmp_path_factory.mktemp("user")
    smoke = load_loop_config(ROOT / "configs/smoke.yaml")
    policy = save_tiny_policy(root / "my-policy", smoke.sft.model)
    problems = root / "problems.jsonl"
    problems.write_text("".join(json.dumps({"question": p.prompt, "meta": {"final": p.answer}}) + "\n"
                                for p in make_problems(24, seed=11)), encoding="utf-8")
    settings = {"name": "own", "rounds": 0, "policy": "somebody/else",
                "prompt_source": {"source": str(problems), "map": {"prompt": "question", "reference_answer": "meta.final"}},
                "prompt_split": {"heldout_size": 4}, "sft": {"model": smoke.sft.model.model_dump()},
                "evaluation": {"max_prompts": 4, "max_new_tokens": 8, "samples_per_prompt": 0}}
    return root, policy, problems, settings


def _config_file(path: Path, settings: dict) -> Path:
    path.write_text(yaml.safe_dump(settings), encoding="utf-8")
    return path


def _run(config: Path, store: Path, *options: str):
    return runner.invoke(app, ["run", "--config", str(config), "--no-prefect", "--store", str(store), *options])


def _written(store: ArtifactStore) -> list:
    return [*store.list(), *store.refs()]


def test_run_policy_option_replaces_the_configs_policy(user_files, tmp_path):
    _, policy, _, settings = user_files
    config = _config_file(tmp_path / "loop.yaml", settings)
    refused = _run(config, tmp_path / "refused")
    assert refused.exit_code == 2 and "somebody/else" in refused.output, refused.output  # the config's own policy
    result = _run(config, tmp_path / "store", "--policy", str(policy))
    assert result.exit_code == 0, result.output
    store = ArtifactStore(tmp_path / "store")
    start = store.read_manifest(store.resolve("own/starting-policy"))
    assert start.stage.startswith("import-model") and start.metrics["source"] == str(policy)
    assert store.read_manifest(store.resolve("own/round-0/metrics")).inputs["policy"] == str(start.ref)
    assert "run 'own'" in result.output and "gain vs round 0" in result.output


def _copy(source: Path, target: Path, skip: tuple[str, ...] = ()) -> Path:
    target.mkdir()
    for path in source.iterdir():
        if path.name not in skip:
            (target / path.name).write_bytes(path.read_bytes())
    return target


def _other_vocabulary_reward_model(out: Path) -> Path:
    """A one-label Llama classifier whose tokenizer has one token the policy's lacks."""
    import torch
    import transformers

    from prefloop.embedded.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.add_tokens(["<tool>"])
    torch.manual_seed(0)
    transformers.LlamaForSequenceClassification(transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=32, max_position_embeddings=64, num_labels=1,
        pad_token_id=tokenizer.pad_token_id)).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def _bad_input(case: str, policy: Path, scratch: Path, settings: dict) -> tuple[dict, list[str]]:
    """(loop settings, --policy option) of one bad input."""
    if case == "no tokenizer":
        return settings, ["--policy", str(_copy(policy, scratch / case, skip=(
            "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")))]
    if case == "pickle-only checkpoint":
        import torch
        from safetensors.torch import load_file

        pickled = _copy(policy, scratch / case, skip=("model.safetensors",))
        torch.save(load_file(policy / "model.safetensors"), pickled / "pytorch_model.bin")
        return settings, ["--policy", str(pickled)]
    if case == "auto_map":
        custom = _copy(policy, scratch / case)
        data = json.loads((custom / "config.json").read_text())
        (custom / "config.json").write_text(json.dumps(data | {"auto_map": {"AutoModelForCausalLM": "mine.Model"}}))
        return settings, ["--policy", str(custom)]
    if case == "chat template that raises":
        broken = _copy(policy, scratch / case)
        data = json.loads((broken / "tokenizer_config.json").read_text())
        data["chat_template"] = "{{ raise_exception('a system prompt is required') }}"
        (broken / "tokenizer_config.json").write_text(json.dumps(data))
        return settings, ["--policy", str(broken)]
    if case == "mapped column missing":
        source = settings["prompt_source"] | {"map": {"prompt": "problem", "reference_answer": "meta.final"}}
        return settings | {"prompt_source": source}, ["--policy", str(policy)]
    assert case == "reward model vocabulary"
    reward = _other_vocabulary_reward_model(scratch / case)
    return settings | {"reward_model": {"model": str(reward)}}, ["--policy", str(policy)]


BAD_INPUTS = {
    "no tokenizer": r"no tokenizer files.*tokenizer\.save_pretrained\(DIR\)",
    "pickle-only checkpoint": r"only as pickle files \(pytorch_model\.bin\).*safe_serialization=True",
    "auto_map": r"custom model code.*never enables trust_remote_code",
    "mapped column missing": r"prompt=problem.*question",
    "reward model vocabulary": r"another vocabulary.*<tool>.*preferences: REF",
    "chat template that raises": r"a system prompt is required.*Fix the template",
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_each_bad_input_is_one_error_naming_the_fix_and_nothing_is_written(user_files, tmp_path, case):
    root, policy, _, settings = user_files
    loop_settings, options = _bad_input(case, policy, tmp_path, settings)
    store = tmp_path / "store"
    result = _run(_config_file(tmp_path / "loop.yaml", loop_settings), store, *options)
    assert result.exit_code == 2, result.output
    # One "error:" message (a quoted transformers error may span lines), never a traceback or an internal error.
    assert result.output.startswith("error: ") and result.output.count("error:") == 1, result.output
    assert "Traceback" not in result.output and "internal error" not in result.output
    assert re.search(BAD_INPUTS[case], result.output, re.DOTALL), result.output
    assert not _written(ArtifactStore(store)), f"{case}: the run wrote before refusing"


def test_importing_a_model_whose_template_raises_names_the_users_directory(user_files, tmp_path):
    from prefloop.tasks.importing.stage import import_model

    _, policy, _, settings = user_files
    _, (_, broken) = _bad_input("chat template that raises", policy, tmp_path, settings)
    store = ArtifactStore(tmp_path / "store")
    with pytest.raises(UserError, match=re.escape(f"the chat template of {broken} fails")):
        import_model(broken, store)
    assert not _written(store)


# ---------------------------------------------------------------------------------------------
# A loop from an imported model through a real Prefect server.
# ---------------------------------------------------------------------------------------------
def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow  # a real `prefect server start`, then `prefloop run` in its own process (~2 min on 2 cores)
def test_a_loop_from_an_imported_model_runs_through_a_real_prefect_server(tmp_path, monkeypatch):
    """configs/own_model.yaml cut to one small round, started with ``prefloop run --policy DIR`` against a
    server that outlives it (PREFECT_API_URL): the starting policy is imported by stage import-model, the
    rounds are labeled by the train-rm ensemble, and the server holds the completed flow run and its stages."""
    import os
    import signal
    import subprocess
    import sys

    from prefloop.embedded.own_model import TINY, build_own_model_example
    from prefloop.flows import deploy

    example = build_own_model_example(tmp_path / "example", TINY)
    data = load_loop_config(ROOT / "configs/own_model.yaml", rounds=1).model_dump(mode="json")
    data["prompt_source"]["source"] = str(example.problems)
    data["prompt_split"] = {"heldout_size": 8}
    data["sampling"] |= {"max_prompts": 6, "n": 4, "max_new_tokens": 32}
    data["evaluation"] |= {"max_prompts": 8, "max_new_tokens": 32, "samples_per_prompt": 2, "sampled_prompts": 4,
                           "pass_k": [1, 2]}
    data["reward_model"]["preferences"]["source"] = str(example.rm_pairs)
    data["reward_model"]["training"] |= {"max_steps": 2, "batch_size": 8}
    config = _config_file(tmp_path / "own_model.yaml", data)
    assert not Path(data["policy"]).is_absolute()  # the config's own path: only --policy points at the build

    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_API")}
    env |= {"PREFECT_HOME": str(tmp_path / "prefect-home"), "OMP_NUM_THREADS": "1"}
    port = _free_port()
    url = deploy.api_url("127.0.0.1", port)
    monkeypatch.setenv("PREFECT_HOME", env["PREFECT_HOME"])
    server = deploy.start_server("127.0.0.1", port, log=tmp_path / "server.log")
    try:
        store = tmp_path / "store"
        run = subprocess.run([str(Path(sys.executable).with_name("prefloop")), "run", "--config", str(config),
                              "--policy", str(example.policy), "--store", str(store)],
                             env=env | {"PREFECT_API_URL": url}, capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert "wins judged by the reward model" in run.stdout and "mean reward" in run.stdout, run.stdout

        from prefect import get_client
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
            (flow_run,) = client.read_flow_runs()
            tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])),
                                          limit=200)
        assert flow_run.state.is_completed(), flow_run.state
        names = {task.name for task in tasks}
        assert {"own-model/starting-policy", "own-model/reward-model", "own-model/round-1/labels",
                "own-model/round-1/metrics"} <= names, sorted(names)

        target = ArtifactStore(store)
        start = target.read_manifest(target.resolve("own-model/starting-policy"))
        assert start.stage.startswith("import-model") and start.metrics["source"] == str(example.policy)
        assert target.read_manifest(target.resolve("own-model/round-1/samples")).inputs["policy"] == str(start.ref)
        assert target.read_manifest(target.resolve("own-model/round-1/labels")).stage.startswith("label-rm")
        evaluated = target.read_manifest(target.resolve("own-model/round-1/metrics")).metrics
        assert {"accuracy", "accuracy_gain", "mean_reward", "win_rate_vs_previous"} <= set(evaluated)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
