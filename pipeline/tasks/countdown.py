"""Countdown (TinyZero's task, paper `000` App. B): reach a target with + - * /, each operand once.

An instance draws `operands` numbers uniformly from 1-50 (repeats allowed) and a target
uniformly from 0-100, and is kept only if an exhaustive search proves it solvable.

Solvable means: some binary expression tree over all operands, each used exactly once,
with + - * / at the inner nodes, has exactly the target's value in exact rational
arithmetic (`fractions.Fraction`). Intermediate values may be negative or fractional:
TinyZero's verifier accepts any equation whose value is within 1e-5 of the target, so
"3 / 8 + 39 / 24 = 2" is a valid answer and the generator must not call such an instance
unsolvable. The search (`Solver`) is exhaustive over every tree and operand order: a
multiset reaches t iff some cut into two halves and some value of one half leave, for one
of the six combinations (a+b, a-b, b-a, a*b, a/b, b/a), a value the other half reaches.
It runs over all rationals to decide solvability and, for the worked solution, prefers a
tree whose intermediate values are all non-negative integers (exact division, no negative
differences) when one exists, so that the steps look like a person's.

Cost on one core (CPU time): 262,144 train instances take about 35 s with 3 operands
(measured), about 5 min with 4 and 8 min with 5 (extrapolated from 20,000). Uniform
draws are solvable about 6.5%, 29% and 83% of the time with 3, 4 and 5 operands; proving
a 5-operand draw unsolvable is the expensive case.

Example (the layout of `pipeline.tasks.format`):

    question  Using the numbers [44, 19, 4], create an equation that equals 100.
              Use + - * / and each number exactly once.
    steps     ["44-19=25", "25*4=100"]
    answer    "(44 - 19) * 4"          (text after "### ": <answer>(44 - 19) * 4</answer>)
    numbers   [44, 19, 4];  target  100

Steps write non-integer or negative operands in parentheses ("(3/8)+(13/8)=2").

Splits: `eval` (default 1,024) and `train` (default 262,144) come from separate seeded
random streams. `eval` holds distinct problems; `train` draws independently (as the paper's
"262,144 generated training samples") and skips every problem of the eval set, a problem
being its operand multiset and target. Train must repeat problems at 3 operands: only
144,848 (multiset, target) problems are solvable there (816,439 counting operand order).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from fractions import Fraction
from typing import Any

from pipeline.errors import PipelineError

OPERAND_RANGE = (1, 50)
TARGET_RANGE = (0, 100)
OPERAND_COUNTS = (3, 4, 5)
DEFAULT_N = {"train": 262_144, "eval": 1_024}
SPLITS = tuple(DEFAULT_N)
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}

Value = int | Fraction
Expr = int | tuple[str, "Expr", "Expr", Value]
"""A leaf is an operand; an inner node is (op, left, right, value)."""
Multiset = tuple[int, ...]
"""Operands, sorted."""

_CACHED = 3
"""Value sets of multisets up to this size may be memoised (all triples of 1-50: about 100 MB)."""


def _value(e: Expr) -> Value:
    return e if isinstance(e, int) else e[3]


def _div(p: Value, q: Value) -> Value:
    if isinstance(p, int) and isinstance(q, int) and p % q == 0:
        return p // q
    return Fraction(p) / q


def _ops(x: Value, y: Value, natural: bool) -> list[tuple[str, Value, bool]]:
    """(op, value, swapped) of x+y, x-y, y-x, x*y, x/y, y/x; `natural` keeps non-negative integers."""
    out = [("+", x + y, False), ("*", x * y, False)]
    if not natural or x >= y:
        out.append(("-", x - y, False))
    if not natural or y >= x:
        out.append(("-", y - x, True))
    for num, den, swapped in ((x, y, False), (y, x, True)):
        if den != 0 and (not natural or num % den == 0):
            out.append(("/", _div(num, den), swapped))
    return out


@functools.cache
def _cut_patterns(n: int) -> tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]:
    """Index pairs (A, B) cutting n items into two non-empty parts, each unordered cut once,
    the smaller part first."""
    out = []
    for mask in range(1, 1 << (n - 1)):  # item n-1 always in B: no mirror twins
        a = tuple(i for i in range(n) if mask >> i & 1)
        b = tuple(i for i in range(n) if not mask >> i & 1)
        out.append((a, b) if len(a) <= len(b) else (b, a))
    return tuple(out)


@functools.lru_cache(maxsize=1 << 12)
def _splits(ms: Multiset) -> tuple[tuple[Multiset, Multiset], ...]:
    """Every way to cut `ms` into two non-empty sub-multisets (repeated values: each cut once)."""
    cuts = {(tuple(ms[i] for i in a), tuple(ms[i] for i in b)) for a, b in _cut_patterns(len(ms))}
    return tuple(sorted(cuts, key=lambda c: (-len(c[0]), c)))  # cuts into memoised halves first


class Solver:
    """Exhaustive Countdown search over all expression trees, in one value domain.

    `natural=True` admits only non-negative integer intermediates (exact division, no
    negative differences); `natural=False` admits every rational. A multiset reaches t if
    some cut into halves (A, B) and some value a of A leave, for one of the six operators,
    a value b that B reaches (b = t-a, a-t, t+a, t/a, a/t or t*a): a target-first search
    that needs the full value set only of the smaller half (at most 2 operands here).
    Value sets are memoised across instances for pairs, and for triples from their second
    request on (a large run meets each triple many times, a small one mostly once).
    """

    def __init__(self, natural: bool) -> None:
        self.natural = natural
        self._values: dict[Multiset, frozenset] = {}
        self._asked: set[Multiset] = set()
        self._interned: dict[Value, Value] = {}  # one object per distinct value: the memo stays small

    def splits(self, ms: Multiset) -> tuple[tuple[Multiset, Multiset], ...]:
        return _splits(ms)

    def _memoised(self, ms: Multiset) -> bool:
        if len(ms) <= 2 or ms in self._values:
            return True
        if len(ms) > _CACHED:
            return False
        if ms in self._asked:
            self._asked.discard(ms)
            return True
        self._asked.add(ms)
        return False

    def values(self, ms: Multiset) -> frozenset:
        """Every value an expression over all of `ms` can take (small multisets only)."""
        got = self._values.get(ms)
        if got is None:
            if len(ms) == 1:
                got = frozenset(ms)
            else:
                got = frozenset(self._interned.setdefault(v, v) for a, b in self.splits(ms)
                                for x in self.values(a) for y in self.values(b)
                                for _, v, _ in _ops(x, y, self.natural))
            self._values[ms] = got
        return got

    def _needs(self, a: Value, t: Value) -> list[tuple[str, Value | None, bool]]:
        """(op, b, swapped) with a op b = t (b op a = t when swapped); b None: any b works.

        In the natural domain only non-negative integer b (and exact quotients) qualify."""
        if self.natural:
            out: list[tuple[str, Value | None, bool]] = [("+", t - a, False), ("-", t + a, True)]
            if a >= t:
                out.append(("-", a - t, False))
            if a == 0:
                if t == 0:  # 0 * b = 0 / b = 0 for every b (!= 0)
                    out += [("*", None, False), ("/", None, False)]
                return [x for x in out if x[1] is None or x[1] >= 0]
            out.append(("/", t * a, True))
            if t % a == 0:
                out.append(("*", t // a, False))
            if t != 0 and a % t == 0:
                out.append(("/", a // t, False))
            return [x for x in out if x[1] is None or x[1] >= 0]
        out = [("+", t - a, False), ("-", a - t, False), ("-", t + a, True)]
        if a != 0:
            out += [("*", _div(t, a), False), ("/", t * a, True)]
            if t != 0:
                out.append(("/", _div(a, t), False))
        elif t == 0:
            out += [("*", None, False), ("/", None, False)]
        return out

    def reaches(self, t: Value, ms: Multiset) -> bool:
        """Whether some expression over all of `ms` has the value `t`."""
        return self._find(t, ms) is not None

    def _find(self, t: Value, ms: Multiset) -> tuple | None:
        """(op, a, A, b, B, swapped) for the first cut that reaches `t`, or () for a leaf."""
        if self.natural and not (isinstance(t, int) and t >= 0):
            return None
        if len(ms) == 1:
            return () if t == ms[0] else None
        if self._memoised(ms) and t not in self.values(ms):
            return None
        for small, big in self.splits(ms):
            for a in self.values(small):
                for op, b, swapped in self._needs(a, t):
                    if b is None:  # any value of `big` works: its sum is one, and positive
                        b = sum(big)
                    if self._find(b, big) is not None:
                        return (op, a, small, b, big, swapped)
        return None

    def build(self, t: Value, ms: Multiset) -> Expr | None:
        """An expression over all of `ms` with value `t`, or None."""
        cut = self._find(t, ms)
        if cut is None:
            return None
        if cut == ():
            return ms[0]
        op, a, small, b, big, swapped = cut
        left, right = self.build(a, small), self.build(b, big)
        if swapped:
            left, right = right, left
        return (op, left, right, t)


def solve(numbers: list[int], target: int, solvers: tuple[Solver, Solver] | None = None) -> Expr | None:
    """A solution tree using every number once, or None if none exists (exhaustive).

    Prefers a solution whose intermediate values are all non-negative integers; pass
    `solvers` (natural, rational) to reuse their memo across many instances."""
    if not numbers or any(not isinstance(x, int) or x < 1 for x in numbers):
        raise PipelineError(f"Countdown operands {numbers}: expected positive integers")
    natural, rational = solvers or (Solver(True), Solver(False))
    ms = tuple(sorted(numbers))
    # Same answer in either order; only speed differs. Of uniform draws about 7%, 29% and 83%
    # are solvable with 3, 4 and 5 operands: rule the common case out (or in) first.
    if len(ms) < 5 and not rational.reaches(target, ms):
        return None
    expr = natural.build(target, ms)
    return expr if expr is not None else rational.build(target, ms)


def _num(v: Value) -> str:
    return str(v) if isinstance(v, int) or v.denominator == 1 else f"{v.numerator}/{v.denominator}"


def render(e: Expr, parent: str = "", right: bool = False) -> str:
    """Infix with the fewest parentheses and spaces around operators: "(44 - 19) * 4"."""
    if isinstance(e, int):
        return str(e)
    op, a, b, _ = e
    text = f"{render(a, op)} {op} {render(b, op, True)}"
    if parent and (_PREC[op] < _PREC[parent] or (right and _PREC[op] == _PREC[parent] and parent in "-/")):
        return f"({text})"
    return text


def steps_of(e: Expr) -> list[str]:
    """The intermediate equations, innermost first: ["44-19=25", "25*4=100"]."""
    if isinstance(e, int):
        return []
    op, a, b, v = e

    def operand(x: Expr) -> str:
        v = _value(x)
        return _num(v) if v >= 0 and (isinstance(v, int) or v.denominator == 1) else f"({_num(v)})"

    return steps_of(a) + steps_of(b) + [f"{operand(a)}{op}{operand(b)}={_num(v)}"]


def question_text(numbers: list[int], target: int) -> str:
    return (f"Using the numbers [{', '.join(map(str, numbers))}], create an equation that equals "
            f"{target}. Use + - * / and each number exactly once.")


def make_example(numbers: list[int], target: int,
                 solvers: tuple[Solver, Solver] | None = None) -> dict[str, Any] | None:
    """The example for one instance, or None if it has no solution."""
    expr = solve(numbers, target, solvers)
    if expr is None:
        return None
    return {"question": question_text(numbers, target), "steps": steps_of(expr),
            "answer": render(expr), "numbers": list(numbers), "target": target}


def _stream(split: str, operands: int, seed: int, n: int, exclude: set[tuple],
            solvers: tuple[Solver, Solver], progress: Callable[[int], None] | None = None,
            unique: bool = False) -> list[dict[str, Any]]:
    """The first `n` solvable draws of the (`split`, `operands`, `seed`) stream whose
    problems are not in `exclude` (nor, if `unique`, repeats of an earlier draw)."""
    rng = random.Random(f"countdown/{split}/{operands}/{seed}")
    out: list[dict[str, Any]] = []
    skip = set(exclude)
    while len(out) < n:
        numbers = [rng.randint(*OPERAND_RANGE) for _ in range(operands)]
        target = rng.randint(*TARGET_RANGE)
        key = (*sorted(numbers), target)
        if key in skip:
            continue
        ex = make_example(numbers, target, solvers)
        if ex is not None:
            if unique:
                skip.add(key)
            out.append(ex)
            if progress is not None:
                progress(1)
    return out


def instance_key(example: dict[str, Any]) -> tuple:
    """What makes two instances the same problem: the operand multiset and the target."""
    return (*sorted(example["numbers"]), example["target"])


def generate_countdown(split: str = "train", n: int | None = None, operands: int = 3, seed: int = 0,
                       progress: Callable[[int], None] | None = None,
                       n_eval: int = DEFAULT_N["eval"]) -> list[dict[str, Any]]:
    """`n` solvable instances (default 262,144 train / 1,024 eval), deterministic in `seed`.

    `train` leaves out the first `n_eval` `eval` problems of the same seed and operand count
    (every eval file of up to `n_eval` instances is such a prefix)."""
    if split not in SPLITS:
        raise PipelineError(f"Countdown split {split!r}: expected one of {', '.join(SPLITS)}")
    if operands not in OPERAND_COUNTS:
        raise PipelineError(f"Countdown operands={operands}: expected one of {OPERAND_COUNTS}")
    n = DEFAULT_N[split] if n is None else n
    if n < 0:
        raise PipelineError(f"Countdown n={n}: must be >= 0")
    solvers = (Solver(True), Solver(False))
    exclude: set[tuple] = set()
    if split == "train":
        exclude = {instance_key(ex) for ex in _stream("eval", operands, seed, n_eval, set(), solvers,
                                                      unique=True)}
    return _stream(split, operands, seed, n, exclude, solvers, progress, unique=split == "eval")
