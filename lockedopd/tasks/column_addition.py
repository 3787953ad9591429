"""Column addition: add two 3- or 4-digit numbers column by column, carrying, then state the sum.

Why this task: a 135M model fine-tuned on it becomes competent within minutes on a CPU, every problem needs a worked
solution of about 20-35 tokens before its answer (so sampling the student's own completions matters: one wrong
carry spoils the answer), correctness is exact and cheap to check, and the problem space (~10^8 pairs) is large
enough for splits that never overlap. One line per column, ones first: the column's digits plus the carry coming
in, and their sum (whose tens digit is the carry going out). For 457 + 86::

    7+6=13
    5+8+1=14
    4+0+1=5
    The answer is 543.

``column_addition_verbose`` poses the same problems (split for split) with another solution style: each column named,
spaced and with its carry in words, the way another model might write it (54-100 tokens against 30-44)::

    Ones: 7 + 6 = 13, carry 1.
    Tens: 5 + 8 + 1 = 14, carry 1.
    Hundreds: 4 + 0 + 1 = 5.
    The answer is 543.

It exists for the paper's SFT contrast: SFT on text far from what the student already writes (the paper's SFT
trains on another model's solutions), where SFT on the terse style would only repeat what the teacher taught.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Sequence

from lockedopd.tasks.base import Task, TaskProblem

_ANSWER = re.compile(r"answer is\s*(-?[\d,]+)")


def draw_operands(rng: random.Random) -> tuple[int, int]:
    """Two operands, each of 3 or 4 digits (the digit count drawn first, so short and long ones are equally likely)."""
    digits = [rng.choice((3, 4)), rng.choice((3, 4))]
    return tuple(rng.randrange(10 ** (d - 1), 10**d) for d in digits)  # type: ignore[return-value]


def columns(a: int, b: int) -> list[tuple[int, int, int, int]]:
    """The columns of ``a + b``, ones first: ``(x, y, carry_in, total)`` per column, ``total = x + y + carry_in``
    (its tens digit is the next column's carry in)."""
    da, db = str(a)[::-1], str(b)[::-1]
    carry, out = 0, []
    for column in range(max(len(da), len(db))):
        x = int(da[column]) if column < len(da) else 0
        y = int(db[column]) if column < len(db) else 0
        out.append((x, y, carry, x + y + carry))
        carry = (x + y + carry) // 10
    return out


def worked_solution(a: int, b: int) -> str:
    """The column-by-column solution of ``a + b`` (ones first), ending with ``The answer is {a + b}.``"""
    lines = [
        (f"{x}+{y}" if i == 0 else f"{x}+{y}+{carry}") + f"={total}"
        for i, (x, y, carry, total) in enumerate(columns(a, b))
    ]
    return "\n".join([*lines, f"The answer is {a + b}."])


PLACE_NAMES = ("Ones", "Tens", "Hundreds", "Thousands", "Ten thousands")


def verbose_solution(a: int, b: int) -> str:
    """The same column-by-column addition as :func:`worked_solution` in another style (each column named, its carry
    in words), ending with ``The answer is {a + b}.``"""
    lines = []
    for i, (x, y, carry, total) in enumerate(columns(a, b)):
        terms = f"{x} + {y}" if i == 0 else f"{x} + {y} + {carry}"
        lines.append(f"{PLACE_NAMES[i]}: {terms} = {total}" + (f", carry {total // 10}." if total >= 10 else "."))
    if a + b >= 10 ** len(lines):  # the last column's carry opens a new one
        lines.append(f"{PLACE_NAMES[len(lines)]}: carry 1.")
    return "\n".join([*lines, f"The answer is {a + b}."])


def render(key: tuple[int, int]) -> TaskProblem:
    """The problem of the operands ``key``."""
    a, b = key
    return TaskProblem(prompt=f"What is {a} + {b}?", completion=worked_solution(a, b), answer=str(a + b))


def render_verbose(key: tuple[int, int]) -> TaskProblem:
    """The problem of the operands ``key``, solved by :func:`verbose_solution`."""
    a, b = key
    return TaskProblem(prompt=f"What is {a} + {b}?", completion=verbose_solution(a, b), answer=str(a + b))


def extract_answer(completion: str) -> int | None:
    """The integer after the last ``answer is`` in a completion (commas allowed), or ``None``."""
    found = _ANSWER.findall(completion)
    if not found:
        return None
    digits = found[-1].replace(",", "")
    return int(digits) if digits.lstrip("-").isdigit() else None


def verify(completions: Sequence[str], answers: Sequence[str | None]) -> list[float]:
    """1.0 where the completion states ``The answer is N`` with N equal to the reference answer, else 0.0."""
    scores = []
    for text, answer in zip(completions, answers, strict=True):
        stated = extract_answer(text)
        scores.append(float(answer is not None and stated is not None and stated == int(str(answer).strip())))
    return scores


def digit_credit(completions: Sequence[str], answers: Sequence[str | None]) -> list[float]:
    """Partial credit: the share of the reference's digits the stated answer gets right, aligned from the ones
    digit (a longer or shorter answer loses the positions it misses); 0.0 without a stated answer. 1.0 exactly
    where :func:`verify` accepts."""
    scores = []
    for text, answer in zip(completions, answers, strict=True):
        stated = extract_answer(text)
        if answer is None or stated is None:
            scores.append(0.0)
            continue
        got, want = str(stated)[::-1], str(int(str(answer).strip()))[::-1]
        scores.append(sum(g == w for g, w in zip(got, want)) / max(len(got), len(want)))
    return scores


COLUMN_ADDITION = Task(
    name="column_addition",
    draw=draw_operands,
    render=render,
    verify=verify,
    partial_credit=digit_credit,
    description="add two 3- or 4-digit numbers column by column with carries",
)
COLUMN_ADDITION_VERBOSE = dataclasses.replace(
    COLUMN_ADDITION,
    name="column_addition_verbose",
    render=render_verbose,
    description="column_addition's problems, solved in words (another solution style, for off-distribution SFT)",
    variant_of="column_addition",
)
