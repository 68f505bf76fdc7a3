"""The embedded arithmetic task: deterministic, exactly verifiable, with disjoint splits."""

import pytest

from prefloop.embedded.arithmetic import (
    ArithmeticTaskConfig,
    _build_problem,
    extract_answer,
    make_problems,
    make_splits,
    split_of,
    verify,
)


def test_generation_is_deterministic_for_a_seed() -> None:
    assert make_problems(50, seed=3) == make_problems(50, seed=3)
    assert make_problems(50, seed=3) != make_problems(50, seed=4)


def test_gold_solution_has_one_step_per_line_and_verifies() -> None:
    for problem in make_problems(200, seed=0):
        lines = problem.solution.splitlines()
        assert lines[-1] == f"A:{problem.answer}"
        assert len(lines) - 1 == problem.prompt.count("+") + problem.prompt.count("-")
        assert verify(problem.solution, problem.answer)
        assert problem.answer == str(eval(problem.prompt.removesuffix("=?\n")))  # noqa: S307


def test_worked_example_format() -> None:
    problem = _build_problem(16, [("+", 7), ("-", 2), ("-", 1)])
    assert problem.prompt == "16+7-2-1=?\n"
    assert problem.solution == "16+7=23\n23-2=21\n21-1=20\nA:20"
    assert problem.answer == "20"


def test_wrong_or_missing_answers_do_not_verify() -> None:
    problem = make_problems(1, seed=0)[0]
    wrong = str(int(problem.answer) + 1)
    assert not verify(problem.solution.rsplit("A:", 1)[0] + f"A:{wrong}", problem.answer)
    assert not verify(problem.solution.rsplit("\nA:", 1)[0], problem.answer)
    assert not verify("", problem.answer)
    assert extract_answer("3+4=7\nA:7\n") == "7"


def test_splits_are_disjoint_across_seeds_and_configs() -> None:
    hard = ArithmeticTaskConfig(min_ops=3, max_ops=5)
    train, heldout = make_splits(2000, 500, seed=0)
    other_train = make_problems(2000, seed=7, config=hard, split="train")
    heldout_prompts = {p.prompt for p in heldout}
    assert not heldout_prompts & {p.prompt for p in train + other_train}
    assert all(split_of(p.prompt) == "heldout" for p in heldout)
    assert len(heldout_prompts) == 500  # distinct within a set


def test_no_negative_intermediates_and_operand_ranges() -> None:
    config = ArithmeticTaskConfig(min_ops=3, max_ops=6, first_operand_max=5, other_operand_max=9)
    for problem in make_problems(300, seed=1, config=config):
        first = int(problem.solution.splitlines()[0].split("+")[0].split("-")[0])
        assert 1 <= first <= 5
        for line in problem.solution.splitlines()[:-1]:
            assert int(line.split("=")[1]) >= 0


def test_invalid_config_and_exhausted_space_fail_loudly() -> None:
    with pytest.raises(ValueError, match="min_ops"):
        ArithmeticTaskConfig(min_ops=5, max_ops=2)
    tiny = ArithmeticTaskConfig(min_ops=1, max_ops=1, first_operand_max=2, other_operand_max=2)
    with pytest.raises(ValueError, match="distinct"):
        make_problems(100, seed=0, config=tiny)
