"""The generated word-problem task: the gsm8k verifier agrees with the generator, draws are deterministic,
train and held-out prompts are disjoint, difficulty knobs hold, and wrong solutions are wrong."""

import random
import re

import pytest

from prefloop.embedded.arithmetic import split_of
from prefloop.embedded.word_problems import (
    WordProblemConfig,
    make_problems,
    make_splits,
    render_solution,
    verify,
    wrong_solution,
)
from prefloop.errors import UserError
from prefloop.tasks.answers import resolve_task

HARD = WordProblemConfig(min_steps=3, max_steps=5)


def _evaluate(line: str) -> bool:
    """An equation line 'a op b=c' is arithmetic that holds (integer division for '/')."""
    a, op, b, c = re.fullmatch(r"(-?\d+)([-+*/])(\d+)=(-?\d+)", line).groups()
    a, b, c = int(a), int(b), int(c)
    return {"+": a + b, "-": a - b, "*": a * b, "/": a // b if a % b == 0 else None}[op] == c


@pytest.mark.parametrize("config", [WordProblemConfig(), HARD, WordProblemConfig(min_steps=1, max_steps=1)])
def test_the_gsm8k_verifier_agrees_with_the_generator_on_every_problem(config):
    gsm8k = resolve_task("gsm8k")
    for problem in make_problems(300, seed=3, config=config):
        *steps, answer_line = problem.solution.splitlines()
        assert answer_line == f"#### {problem.answer}"
        assert all(_evaluate(line) for line in steps), problem.solution  # every step is right
        assert verify(problem.solution, problem.answer) and gsm8k.verify(problem.solution, problem.answer)
        assert gsm8k.extract_answer(problem.solution) == problem.answer
        assert int(problem.answer) >= 0 and str(problem.start) in problem.prompt
        assert problem.prompt.endswith("have now?")
        assert not verify(problem.solution.rsplit("#### ", 1)[0] + f"#### {int(problem.answer) + 1}", problem.answer)


def test_draws_are_deterministic_and_seeded():
    first = make_problems(50, seed=7, config=HARD)
    assert make_problems(50, seed=7, config=HARD) == first
    assert make_problems(50, seed=8, config=HARD) != first
    assert len({p.prompt for p in first}) == 50  # distinct prompts


def test_train_and_heldout_are_disjoint_by_prompt_hash():
    train, heldout = make_splits(400, 200, seed=0, config=HARD)
    assert not {p.prompt for p in train} & {p.prompt for p in heldout}
    assert {split_of(p.prompt, HARD.heldout_fraction) for p in train} == {"train"}
    assert {split_of(p.prompt, HARD.heldout_fraction) for p in heldout} == {"heldout"}
    # Other seeds and difficulty settings never put a held-out prompt into a training set either.
    easy_train = make_problems(2000, seed=1, config=WordProblemConfig(min_steps=1, max_steps=3))
    assert not {p.prompt for p in easy_train} & {p.prompt for p in make_problems(2000, 1, HARD, "heldout")}


def test_difficulty_knobs():
    config = WordProblemConfig(min_steps=4, max_steps=4, start_max=9, amount_max=3, value_max=40,
                               events=("buy", "give", "double"))
    for problem in make_problems(200, seed=0, config=config):
        assert len(problem.steps) == 4 and problem.start <= 9
        assert {step.op for step in problem.steps} <= {"+", "-", "*"}
        value = problem.start
        for step in problem.steps:
            value = step.apply(value)
            assert 0 <= value <= 40
            assert step.op == "*" or step.operand <= 3
    with pytest.raises(ValueError, match="min_steps"):
        WordProblemConfig(min_steps=3, max_steps=2)
    with pytest.raises(UserError, match="distinct"):
        make_problems(500, seed=0, config=WordProblemConfig(min_steps=1, max_steps=1, start_min=1, start_max=1,
                                                            amount_max=1, events=("buy",)))


def test_wrong_solutions_are_wrong_and_differ_from_the_gold_one_in_a_step():
    rng = random.Random(0)
    for problem in make_problems(300, seed=2, config=HARD):
        wrong = wrong_solution(problem, rng)
        assert not verify(wrong, problem.answer), (problem.solution, wrong)
        gold_lines, wrong_lines = problem.solution.splitlines(), wrong.splitlines()
        assert len(gold_lines) == len(wrong_lines) and gold_lines != wrong_lines
    problem = make_problems(1, seed=0, config=HARD)[0]
    assert render_solution(problem.start, problem.steps) == problem.solution
