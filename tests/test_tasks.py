"""The verifiable task: a deterministic generator, splits that never overlap, and its verifier."""

from __future__ import annotations

import json

import pytest

from lockedopd.tasks import COLUMN_ADDITION, COLUMN_ADDITION_VERBOSE, get_task
from lockedopd.tasks.base import write_task_splits
from lockedopd.tasks.column_addition import extract_answer, verbose_solution, worked_solution
from lockedopd.tasks.rewards import resolve_reward_fn


def test_the_generator_is_deterministic_under_its_seed():
    first = COLUMN_ADDITION.problems("train", 300, seed=3)
    again = COLUMN_ADDITION.problems("train", 300, seed=3)
    other = COLUMN_ADDITION.problems("train", 300, seed=4)
    assert first == again
    assert [p.prompt for p in first] != [p.prompt for p in other]
    assert len({p.prompt for p in first}) == 300  # distinct problems


def test_the_splits_never_share_a_problem_whatever_the_seed():
    prompts = {
        split: {p.prompt for seed in (0, 1) for p in COLUMN_ADDITION.problems(split, 1500, seed=seed)}
        for split in ("train", "validation", "test")
    }
    assert not prompts["train"] & prompts["validation"]
    assert not prompts["train"] & prompts["test"]
    assert not prompts["validation"] & prompts["test"]
    # the split is a function of the problem: a test problem is never drawn into train under any seed
    test_problem = next(iter(COLUMN_ADDITION.problems("test", 1, seed=0)))
    a, b = (int(x) for x in test_problem.prompt.removeprefix("What is ").removesuffix("?").split(" + "))
    assert COLUMN_ADDITION.split_of((a, b)) == "test"


def test_the_worked_solution_carries_column_by_column():
    assert worked_solution(457, 86) == "7+6=13\n5+8+1=14\n4+0+1=5\nThe answer is 543."
    assert worked_solution(999, 1) == "9+1=10\n9+0+1=10\n9+0+1=10\nThe answer is 1000."
    for problem in COLUMN_ADDITION.problems("validation", 200, seed=0):
        a, b = (int(x) for x in problem.prompt.removeprefix("What is ").removesuffix("?").split(" + "))
        assert int(problem.answer) == a + b
        assert 3 <= problem.completion.count("\n") <= 4  # one line per column (3 or 4), then the answer
        assert len(problem.completion.split("The answer")[0]) >= 16  # a worked solution precedes the answer


def test_the_verbose_variant_poses_the_same_problems_in_another_style():
    assert verbose_solution(457, 86) == (
        "Ones: 7 + 6 = 13, carry 1.\nTens: 5 + 8 + 1 = 14, carry 1.\nHundreds: 4 + 0 + 1 = 5.\nThe answer is 543."
    )
    assert verbose_solution(9999, 1).splitlines()[-2:] == ["Ten thousands: carry 1.", "The answer is 10000."]
    assert get_task("column_addition_verbose") is COLUMN_ADDITION_VERBOSE
    for split, seed in (("train", 5), ("validation", 0), ("test", 1)):
        terse = COLUMN_ADDITION.problems(split, 300, seed=seed)
        verbose = COLUMN_ADDITION_VERBOSE.problems(split, 300, seed=seed)
        # split for split and seed for seed the same problems: a verbose train problem is never a test problem
        assert [(p.prompt, p.answer) for p in verbose] == [(p.prompt, p.answer) for p in terse]
        assert all(v.completion != t.completion for v, t in zip(verbose, terse, strict=True))
        answers = [p.answer for p in verbose]
        assert COLUMN_ADDITION_VERBOSE.verify([p.completion for p in verbose], answers) == [1.0] * 300
    assert COLUMN_ADDITION_VERBOSE.split_of((457, 86)) == COLUMN_ADDITION.split_of((457, 86))


def test_the_verifier_accepts_the_tasks_own_answers_and_rejects_wrong_ones():
    problems = COLUMN_ADDITION.problems("test", 50, seed=0)
    answers = [p.answer for p in problems]
    assert COLUMN_ADDITION.verify([p.completion for p in problems], answers) == [1.0] * 50
    off_by_one = [p.completion.replace(f"is {p.answer}.", f"is {int(p.answer) + 1}.") for p in problems]
    assert COLUMN_ADDITION.verify(off_by_one, answers) == [0.0] * 50
    assert COLUMN_ADDITION.verify(["7+6=13", "The answer is 1,234.", ""], ["13", "1234", "0"]) == [0.0, 1.0, 0.0]
    assert extract_answer("The answer is 12. No, the answer is 15.") == 15
    # the same verifier is the reward function of that name
    assert resolve_reward_fn("column_addition") is COLUMN_ADDITION.verify


def test_task_files_hold_prompt_completion_and_answer(tmp_path):
    paths = write_task_splits(get_task("column_addition"), tmp_path, {"train": 20, "test": 5}, seed=1)
    rows = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    assert len(rows) == 20 and set(rows[0]) == {"prompt", "completion", "answer", "source"}
    with pytest.raises(ValueError, match="unknown split"):
        write_task_splits(COLUMN_ADDITION, tmp_path / "bad", {"dev": 3})
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ValueError, match="unknown task"):
        get_task("no_such_task")


def test_the_math_verifier_compares_answers_as_mathematics():
    from lockedopd.tasks.rewards import math_answer, resolve_reward_fn

    assert resolve_reward_fn("math") is math_answer
    completions = [r"so the answer is \boxed{1/2}", r"so the answer is \boxed{1/2}", r"\boxed{\frac{3}{4}}, not 7",
                   "the answer is 3", "no answer here", r"\boxed{1/2}"]  # fmt: skip
    answers = ["0.5", "2", "0.75", "3", "4", None]
    assert math_answer(completions, answers) == [1.0, 0.0, 1.0, 1.0, 0.0, 0.0]


def test_partial_credit_counts_the_answers_right_digits_and_is_one_exactly_where_verify_accepts():
    partial = resolve_reward_fn("column_addition.partial")
    texts = ["The answer is 1234.", "The answer is 1334.", "The answer is 234.", "no answer", "The answer is 99999."]
    assert partial(texts, ["1234"] * 5) == [1.0, 0.75, 0.75, 0.0, 0.0]
    problems = [COLUMN_ADDITION.render((a, b)) for a, b in [(123, 456), (999, 1), (4321, 879)]]
    own = [p.completion for p in problems]
    assert partial(own, [p.answer for p in problems]) == COLUMN_ADDITION.verify(own, [p.answer for p in problems])
    with pytest.raises(ValueError, match="neither a built-in"):
        resolve_reward_fn("column_addition.fuzzy")
