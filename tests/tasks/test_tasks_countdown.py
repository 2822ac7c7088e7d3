"""Countdown: seeded generation, ranges, solvability checked by an independent brute force,
the rejected draws really unsolvable, and no train/eval overlap."""

from __future__ import annotations

import itertools
import random
from fractions import Fraction

import pytest

from pipeline.errors import PipelineError
from pipeline.tasks import countdown as cd
from pipeline.tasks.verify import evaluate_equation, score


def brute_force(numbers: list[int], target: int) -> bool:
    """Reference search sharing no code with `countdown`: take an ordered pair, apply each of
    + - * /, recurse on the shorter list (a multiset that failed once fails again)."""
    dead = set()

    def search(values: list[Fraction]) -> bool:
        if len(values) == 1:
            return values[0] == target
        key = tuple(sorted(values))
        if key in dead:
            return False
        for i, j in itertools.permutations(range(len(values)), 2):
            a, b = values[i], values[j]
            rest = [v for k, v in enumerate(values) if k not in (i, j)]
            for v in (a + b, a - b, a * b, a / b if b else None):
                if v is not None and search(rest + [v]):
                    return True
        dead.add(key)
        return False

    return search([Fraction(x) for x in numbers])


@pytest.fixture(scope="module")
def samples():
    return {n: cd.generate_countdown("eval", 200, n, seed=0) for n in cd.OPERAND_COUNTS}


def test_seeded_and_deterministic():
    a = cd.generate_countdown("eval", 40, 4, seed=1)
    assert a == cd.generate_countdown("eval", 40, 4, seed=1)
    assert a != cd.generate_countdown("eval", 40, 4, seed=2)
    assert cd.generate_countdown("eval", 20, 4, seed=1) == a[:20]  # a prefix of the same stream


@pytest.mark.parametrize("n", cd.OPERAND_COUNTS)
def test_instances_in_range_with_a_verified_solution(samples, n):
    for ex in samples[n]:
        assert len(ex["numbers"]) == n and all(1 <= x <= 50 for x in ex["numbers"]) and 0 <= ex["target"] <= 100
        assert ex["question"] == (f"Using the numbers [{', '.join(map(str, ex['numbers']))}], create an "
                                  f"equation that equals {ex['target']}. Use + - * / and each number exactly once.")
        assert score("countdown", ex, f"<answer>{ex['answer']}</answer>") == 1.0
        assert len(ex["steps"]) == n - 1 and ex["steps"][-1].endswith(f"={ex['target']}")
        for step in ex["steps"]:  # each step's arithmetic holds ("(3/8)+(13/8)=2")
            lhs, rhs = step.split("=")
            assert evaluate_equation(lhs)[0] == evaluate_equation(rhs)[0]


@pytest.mark.parametrize("n,count", [(3, 200), (4, 200), (5, 25)])  # the brute force is slow at 5
def test_every_instance_is_solvable_by_brute_force(samples, n, count):
    assert all(brute_force(ex["numbers"], ex["target"]) for ex in samples[n][:count])


@pytest.mark.parametrize("n,draws", [(3, 400), (4, 60)])
def test_the_search_is_exhaustive_on_random_draws(n, draws):
    """Solvable exactly when the brute force says so, unsolvable draws included (most of them)."""
    rng = random.Random(n)
    unsolvable = 0
    for _ in range(draws):
        numbers, target = [rng.randint(1, 50) for _ in range(n)], rng.randint(0, 100)
        found = cd.solve(numbers, target)
        assert (found is not None) == brute_force(numbers, target), (numbers, target)
        unsolvable += found is None
    assert unsolvable > draws // 2


def test_solvable_only_through_fractions_counts_as_solvable():
    # 3/8 + 39/24 = 2, and no expression with integer intermediates reaches 2
    assert cd.Solver(natural=True).build(2, (3, 8, 24, 39)) is None
    ex = cd.make_example([24, 8, 3, 39], 2)
    assert ex["steps"] == ["3/8=3/8", "39/24=13/8", "(3/8)+(13/8)=2"] and ex["answer"] == "3 / 8 + 39 / 24"
    assert score("countdown", ex, f"<answer>{ex['answer']}</answer>") == 1.0
    assert brute_force([24, 8, 3, 39], 2)
    assert cd.solve([49, 50, 50], 100) is None and not brute_force([49, 50, 50], 100)


def test_integer_intermediates_are_preferred():
    ex = cd.make_example([44, 19, 4], 100)
    assert ex["steps"] == ["44-19=25", "4*25=100"] and ex["answer"] == "4 * (44 - 19)"
    ex = cd.make_example([2, 2, 7], 7)  # 2 / (2 / 7) would do too
    assert all(step.split("=")[1].isdigit() for step in ex["steps"])


def test_the_classic_24_needs_a_fraction():
    ex = cd.make_example([1, 3, 4, 6], 24)
    assert ex["answer"] == "6 / (1 - 3 / 4)" and ex["steps"][-1] == "6/(1/4)=24"


@pytest.mark.parametrize("expr,want", [
    (("-", 7, ("-", 3, 2, 1), 6), "7 - (3 - 2)"),
    (("-", ("-", 7, 3, 4), 2, 2), "7 - 3 - 2"),
    (("/", 8, ("*", 2, 2, 4), 2), "8 / (2 * 2)"),
    (("*", ("+", 1, 2, 3), 4, 12), "(1 + 2) * 4"),
    (("+", 1, ("*", 2, 3, 6), 7), "1 + 2 * 3"),
])
def test_render_uses_only_needed_parentheses(expr, want):
    assert cd.render(expr) == want


def test_eval_is_distinct_and_train_leaves_it_out():
    ev = [cd.instance_key(ex) for ex in cd.generate_countdown("eval", 300, 3, seed=5)]
    train = cd.generate_countdown("train", 600, 3, seed=5, n_eval=300)
    assert len(set(ev)) == len(ev) and not set(ev) & {cd.instance_key(ex) for ex in train}


def test_excluded_problems_are_skipped():
    solvers = (cd.Solver(True), cd.Solver(False))
    plain = cd._stream("train", 3, 5, 300, set(), solvers)
    excluded = {cd.instance_key(ex) for ex in plain[:50]}
    kept = cd._stream("train", 3, 5, 100, excluded, solvers)
    assert kept == [ex for ex in plain if cd.instance_key(ex) not in excluded][:100]


def test_bad_arguments():
    with pytest.raises(PipelineError, match="operands=6"):
        cd.generate_countdown("eval", 1, 6)
    with pytest.raises(PipelineError, match="split 'test'"):
        cd.generate_countdown("test", 1, 3)
    with pytest.raises(PipelineError, match="positive integers"):
        cd.solve([0, 3], 3)
