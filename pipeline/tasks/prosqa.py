"""ProsQA (Coconut, Hao et al. 2024): official valid/test files, a training-set generator, a checker.

An instance is a DAG of "is a" facts over people (entities) and nonsense concepts, shuffled
into sentences, and a question with two options:

    question  "Every shumpus is a rempus. ... Tom is a terpus. ... Is Tom a lempus or scrompus?"
    steps     ["Tom is a terpus.", "Every terpus is a brimpus.", "Every brimpus is a lempus."]
    answer    "Tom is a lempus."
    idx_to_symbol  node names;  edges  [[parent, child], ...];  root, target, neg_target

Facts measured on the 800 official items (valid 300 + test 500), which the generator follows:
nodes are numbered in a topological order (every edge goes from a lower to a higher index)
and the edges are listed by child; nodes 0 and 1 are people, one of them the root (node 1
in 64% of items), and every node without a parent is a person (0-4 further people, each
usually with one child); concepts reachable from the root and from the other person barely
overlap (1.2 nodes); the target is a sink at BFS distance 3-6 from the root, unreachable
from the other person; the neg_target is a sink reachable from the other person, never
from the root; the steps are one shortest path (chosen at random where there are several);
the question lists every edge once in random order, then "Is <root> a <A> or <B>?" with
the target first in about half the items. Names: 17 person names and 38 concept words,
each concept word one onset + vowel + coda syllable followed by "pus" (6.3 letters).

The generator (`generate_prosqa`) draws the node count and the depth from the measured
distributions and grows the DAG node by node, so the numbering is topological and a node's
distance from the root (and whether the other person reaches it) is fixed when it is made.
Each new node is a further person (rarely), or a concept joining the root's side, the
other person's side or a further person's side with 1-6 parents from that side (recent
nodes preferred, which makes chains deep) and now and then one from another side. Two late
positions (geometric gaps from the end, as measured) are planted: the target, with one
parent at distance depth-1 and any others no shallower, none reached by the other person;
and the neg_target, with parents the other person reaches and the root does not. No later
node takes them as parents, so both stay sinks; a draw without a node at depth-1 when the
target is due is redrawn. The `full` preset's remaining knobs (parents, side weights,
cross-side chance, recency) were set by comparing the generated and official statistics,
including some the table does not show (nodes reachable from the root 13.2 vs 13.4 and from
the other person 9.6 vs 10.0, their overlap 1.1 vs 1.2, sinks 7.4 vs 7.4; the root has more
children, 3.8 vs 2.9).

Concept words come from a fixed syllable list (`concept_words`: 25 onsets x 5 vowels x
3 codas + "pus" = 375 words, a superset of the 38 official ones, so every official word is
seen in training); person names are the 17 official ones. Presets: `full` matches the
official statistics (`prosqa_stats`, `stats_table`); `mini` (about 10 concepts, depth 2-3,
two people, 40 words, same wording) is small enough for a tiny model on a CPU.

No generated instance equals an official one: both the question text and the labelled
graph (named edges, root, target, neg_target) are compared with `exclude`.
"""

from __future__ import annotations

import math
import random
import re
import statistics
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.paths import shared_data_dir
from pipeline.tasks.schema import load_examples

OFFICIAL_SPLITS = ("valid", "test")
ENTITY_NAMES = ("Alex", "Bob", "Carol", "Davis", "Eva", "Fae", "Gabriel", "Jack", "Max", "Oliver",
                "Polly", "Rex", "Sally", "Sam", "Stella", "Tom", "Wren")
ONSETS = ("", "b", "br", "ch", "d", "f", "g", "gr", "gw", "h", "j", "k", "l", "n", "qu", "r", "scr",
          "sh", "st", "t", "v", "w", "y", "z", "zh")
VOWELS = ("e", "i", "o", "oo", "u")
CODAS = ("l", "m", "r")
SUFFIX = "pus"
_STEP = re.compile(r"^(?:Every )?(\S+) is an? (\S+)\.$")
_ASK = re.compile(r"Is (\S+) an? (\S+) or (\S+)\?$")


def concept_words() -> tuple[str, ...]:
    """Every onset + vowel + coda + "pus" word, sorted ("bempus" ... "zhurpus")."""
    return tuple(sorted(o + v + c + SUFFIX for o in ONSETS for v in VOWELS for c in CODAS))


@dataclass(frozen=True)
class ProsQAPreset:
    """How `generate_prosqa` draws graphs; `full` is fitted to the official files."""

    nodes: tuple[float, float, int, int]
    """Total node count: mean, sd, min, max (a rounded, clipped normal)."""
    depth: tuple[tuple[int, float], ...]
    """(steps, probability): the BFS distance root -> target."""
    parents: tuple[float, ...]
    """Probability of 1, 2, ... parents for a concept (fewer if its side is smaller)."""
    new_person: float
    """Chance that a new node is a further person (a new side with no parent)."""
    side_weights: tuple[float, float, float]
    """Relative chance that a concept joins the root's side, the other person's, a further person's."""
    cross: float
    """Chance that a concept also takes one parent from another side."""
    recency: float
    """Parent choice weight decays by this factor per newer node on the side (1 = uniform)."""
    target_parents: tuple[float, ...]
    """Probability of 0, 1, ... parents of the target besides the one at depth - 1."""
    neg_parents: tuple[float, ...]
    """Probability of 1, 2, ... parents of the neg_target."""
    target_gap: float
    """The target is node n-1-k with k geometric with this success chance (made late)."""
    neg_gap: float
    """The same for the neg_target."""
    vocabulary: int | None
    """Concept words used: the first N of a fixed shuffle of `concept_words()`; None = all."""
    root_is_node_1: float = 0.64
    """Chance that the root is node 1 (else node 0), as measured."""


PRESETS = {
    "full": ProsQAPreset(nodes=(22.6, 2.0, 14, 28),
                         depth=((3, 0.408), (4, 0.437), (5, 0.131), (6, 0.024)),
                         parents=(0.45, 0.28, 0.15, 0.07, 0.03, 0.02), new_person=0.035,
                         side_weights=(0.55, 0.40, 0.05), cross=0.03, recency=0.9,
                         target_parents=(0.645, 0.26, 0.065, 0.024, 0.006),
                         neg_parents=(0.356, 0.356, 0.179, 0.071, 0.024, 0.014),
                         target_gap=0.26, neg_gap=0.19, vocabulary=None),
    "mini": ProsQAPreset(nodes=(12.0, 1.0, 10, 14), depth=((2, 0.5), (3, 0.5)),
                         parents=(0.6, 0.3, 0.1), new_person=0.0, side_weights=(0.55, 0.45, 0.0),
                         cross=0.05, recency=0.8, target_parents=(0.7, 0.3), neg_parents=(0.6, 0.4),
                         target_gap=0.4, neg_gap=0.3, vocabulary=40),
}


# ------------------------------------------------------------------ official files
def load_prosqa(split: str, data_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """The official `valid` (300) or `test` (500) items, as they are in the file."""
    if split not in OFFICIAL_SPLITS:
        raise PipelineError(f"ProsQA official split {split!r}: expected one of {', '.join(OFFICIAL_SPLITS)} "
                            "(no training set ships; generate one)")
    root = Path(data_dir) if data_dir is not None else shared_data_dir() / "prosqa"
    return load_examples(root / f"{split}.json")


# ------------------------------------------------------------------ graph helpers
def _children(example: dict[str, Any]) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in example["idx_to_symbol"]]
    for a, b in example["edges"]:
        out[a].append(b)
    return out


def bfs_distances(children: list[list[int]], source: int) -> dict[int, int]:
    """Node -> number of edges on a shortest path from `source` (reachable nodes only)."""
    dist = {source: 0}
    todo = deque([source])
    while todo:
        u = todo.popleft()
        for v in children[u]:
            if v not in dist:
                dist[v] = dist[u] + 1
                todo.append(v)
    return dist


def is_person(name: str) -> bool:
    return name[:1].isupper()


def fact(names: list[str], a: int, b: int) -> str:
    """The sentence for edge a -> b: "Tom is a terpus." or "Every terpus is a brimpus."."""
    return f"{names[a]} is a {names[b]}." if is_person(names[a]) else f"Every {names[a]} is a {names[b]}."


# ------------------------------------------------------------------ checker
def check_prosqa(example: dict[str, Any]) -> list[str]:
    """Problems with one instance (empty: it is sound). Rules:

    root has no incoming edge; target reachable from root; neg_target not reachable; target
    and neg_target are sinks; len(steps) = BFS distance root -> target; the steps are edges
    walking from root to target; the answer is "<root> is a <target>."."""
    names, root, target, neg = example["idx_to_symbol"], example["root"], example["target"], example["neg_target"]
    children = _children(example)
    dist = bfs_distances(children, root)
    out = []
    if any(b == root for _, b in example["edges"]):
        out.append(f"root {names[root]!r} has an incoming edge")
    if target not in dist:
        out.append(f"target {names[target]!r} is not reachable from root {names[root]!r}")
    elif len(example["steps"]) != dist[target]:
        out.append(f"{len(example['steps'])} steps but the BFS distance root -> target is {dist[target]}")
    if neg in dist:
        out.append(f"neg_target {names[neg]!r} is reachable from root {names[root]!r}")
    for role, node in (("target", target), ("neg_target", neg)):
        if children[node]:
            out.append(f"{role} {names[node]!r} is not a sink ({len(children[node])} outgoing edges)")
    index = {name: i for i, name in enumerate(names)}
    edges = {(a, b) for a, b in example["edges"]}
    at = root
    for i, step in enumerate(example["steps"]):
        m = _STEP.match(step)
        a, b = (index.get(m.group(1)), index.get(m.group(2))) if m else (None, None)
        if a != at or (a, b) not in edges:
            out.append(f"step {i} {step!r} is not an edge from {names[at]!r}")
            break
        at = b
    else:
        if at != target:
            out.append(f"the steps end at {names[at]!r}, not at the target {names[target]!r}")
    if example["answer"] != f"{names[root]} is a {names[target]}.":
        out.append(f"answer {example['answer']!r} is not '{names[root]} is a {names[target]}.'")
    return out


# ------------------------------------------------------------------ generator
def _vocabulary(size: int | None) -> tuple[str, ...]:
    words = concept_words()
    if size is None:
        return words
    shuffled = list(words)
    random.Random("prosqa-vocabulary").shuffle(shuffled)
    return tuple(sorted(shuffled[:size]))


def _pick(rng: random.Random, pairs: Iterable[tuple[int, float]]) -> int:
    values, weights = zip(*pairs, strict=True)
    return rng.choices(values, weights)[0]


def _geometric(rng: random.Random, p: float, cap: int) -> int:
    """0, 1, 2, ... with P(k) proportional to (1 - p)^k p, at most `cap`."""
    k = 0
    while k < cap and rng.random() >= p:
        k += 1
    return k


def _choose(rng: random.Random, pool: list[int], k: int, recency: float) -> list[int]:
    """k distinct nodes of `pool` (oldest first), newer ones preferred by `recency`."""
    weights = [recency ** (len(pool) - 1 - j) for j in range(len(pool))]
    chosen: list[int] = []
    while len(chosen) < min(k, len(pool)):
        v = pool[rng.choices(range(len(pool)), weights)[0]]
        if v not in chosen:
            chosen.append(v)
    return chosen


def _grow(rng: random.Random, p: ProsQAPreset, depth: int) -> dict[str, Any] | None:
    """One random DAG with its target at BFS distance `depth`, or None if this draw cannot have one.

    Nodes are made in index order, so every node's parents are older: its distance from
    the root and whether the other person reaches it are fixed when it is made, and the
    target and neg_target stay sinks because no later node may take them as parent."""
    mean, sd, lo, hi = p.nodes
    n = min(hi, max(lo, round(rng.gauss(mean, sd))))
    t_at = n - 1 - _geometric(rng, p.target_gap, n - 3)
    nt_at = n - 1 - _geometric(rng, p.neg_gap, n - 3)
    if nt_at == t_at:
        return None
    root = 1 if rng.random() < p.root_is_node_1 else 0
    parents: list[list[int]] = [[], []]
    person = [True, True]
    dist: dict[int, int] = {root: 0}  # from the root
    reached = {1 - root}  # from the other person
    sides: list[list[int]] = [[root], [1 - root]]  # root's side, other's side, further people's
    fresh = False  # the node before was a further person: this one is its child
    for i in range(2, n):
        if i == t_at:  # a parent at depth - 1, further ones no shallower: distance stays `depth`
            near = [v for v, d in dist.items() if d == depth - 1 and v not in reached]
            if not near:
                return None
            first = rng.choice(near)
            deeper = [v for v, d in sorted(dist.items()) if d >= depth - 1 and v not in reached and v != first]
            chosen = [first] + _choose(rng, deeper, _pick(rng, enumerate(p.target_parents)), p.recency)
        elif i == nt_at:  # parents the other person reaches and the root does not
            pool = [v for v in sorted(reached) if v not in dist]
            chosen = _choose(rng, pool, _pick(rng, enumerate(p.neg_parents, 1)), p.recency)
        elif i < n - 1 and i + 1 not in (t_at, nt_at) and not fresh and rng.random() < p.new_person:
            parents.append([])
            person.append(True)
            sides.append([i])
            fresh = True
            continue
        else:
            w_root, w_other, w_extra = p.side_weights
            side = len(sides) - 1 if fresh else rng.choices(
                range(len(sides)), [w_root, w_other] + [w_extra] * (len(sides) - 2))[0]
            chosen = _choose(rng, sides[side], _pick(rng, enumerate(p.parents, 1)), p.recency)
            if len(sides) > 1 and rng.random() < p.cross:
                others = [v for j, nodes in enumerate(sides) if j != side for v in nodes if v not in chosen]
                if others:
                    chosen.append(rng.choice(others))
            sides[side].append(i)
        fresh = False
        parents.append(chosen)
        person.append(False)
        near_root = [dist[v] for v in chosen if v in dist]
        if near_root:
            dist[i] = 1 + min(near_root)
        if any(v in reached for v in chosen):
            reached.add(i)
    return {"parents": parents, "person": person, "root": root, "dist": dist, "target": t_at,
            "neg_target": nt_at}


def _draw(rng: random.Random, p: ProsQAPreset, words: tuple[str, ...]) -> dict[str, Any]:
    depth = _pick(rng, p.depth)
    for _ in range(10_000):
        g = _grow(rng, p, depth)
        if g is not None:
            break
    else:
        raise PipelineError(f"ProsQA generator: no graph with depth {depth} in 10000 draws; check the preset")
    parents, person, root, dist, target = g["parents"], g["person"], g["root"], g["dist"], g["target"]
    n = len(parents)
    n_people = sum(person)
    people = iter(rng.sample(ENTITY_NAMES, n_people))
    concepts = iter(rng.sample(words, n - n_people))
    names = [next(people) if person[v] else next(concepts) for v in range(n)]
    edges = [[a, b] for b, ps in enumerate(parents) for a in ps]
    # one shortest path root -> target, uniform over all of them
    count = {root: 1}
    for v in sorted(dist, key=dist.get):
        if v != root:
            count[v] = sum(count[u] for u in parents[v] if dist.get(u) == dist[v] - 1)
    path = [target]
    while path[-1] != root:
        v = path[-1]
        ups = [u for u in parents[v] if dist.get(u) == dist[v] - 1]
        path.append(rng.choices(ups, [count[u] for u in ups])[0])
    path.reverse()
    facts = [fact(names, a, b) for a, b in edges]
    rng.shuffle(facts)
    options = [names[target], names[g["neg_target"]]]
    if rng.random() < 0.5:
        options.reverse()
    question = " ".join(facts) + f" Is {names[root]} a {options[0]} or {options[1]}?"
    return {"question": question, "steps": [fact(names, a, b) for a, b in zip(path, path[1:], strict=False)],
            "answer": f"{names[root]} is a {names[target]}.", "idx_to_symbol": names, "edges": edges,
            "root": root, "target": target, "neg_target": g["neg_target"]}


def graph_key(example: dict[str, Any]) -> tuple:
    """The labelled graph: named edges, root, target, neg_target (what makes two items equal)."""
    names = example["idx_to_symbol"]
    return (frozenset((names[a], names[b]) for a, b in example["edges"]),
            names[example["root"]], names[example["target"]], names[example["neg_target"]])


def generate_prosqa(n: int, seed: int = 0, preset: str = "full", exclude: Iterable[dict[str, Any]] = (),
                    progress: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """`n` new instances, deterministic in (`seed`, `preset`), none equal to each other or to
    an item of `exclude` (pass the official valid/test items)."""
    if preset not in PRESETS:
        raise PipelineError(f"ProsQA preset {preset!r}: expected one of {', '.join(PRESETS)}")
    if n < 0:
        raise PipelineError(f"ProsQA n={n}: must be >= 0")
    p = PRESETS[preset]
    words = _vocabulary(p.vocabulary)
    seen_q, seen_g = set(), set()
    for ex in exclude:
        seen_q.add(ex["question"])
        seen_g.add(graph_key(ex))
    rng = random.Random(f"prosqa/{preset}/{seed}")
    out: list[dict[str, Any]] = []
    while len(out) < n:
        ex = _draw(rng, p, words)
        key = graph_key(ex)
        if ex["question"] in seen_q or key in seen_g:
            continue
        seen_q.add(ex["question"])
        seen_g.add(key)
        out.append(ex)
        if progress is not None:
            progress(1)
    return out


# ------------------------------------------------------------------ statistics
def _mean_sd(xs: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(xs), "sd": statistics.pstdev(xs)} if xs else {"mean": math.nan, "sd": math.nan}


def prosqa_stats(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-example means and sds (nodes, edges, steps, people, concepts, question words,
    concept-word length), the steps histogram, the share of questions naming the target first
    (answer balance), and the distinct concept words and person names over the whole set."""
    per: dict[str, list[float]] = {k: [] for k in ("nodes", "edges", "steps", "people", "concepts",
                                                   "question_words", "word_length")}
    first, words, people, depth = [], set(), set(), {}
    for ex in examples:
        names = ex["idx_to_symbol"]
        persons = [s for s in names if is_person(s)]
        per["nodes"].append(len(names))
        per["edges"].append(len(ex["edges"]))
        per["steps"].append(len(ex["steps"]))
        per["people"].append(len(persons))
        per["concepts"].append(len(names) - len(persons))
        per["question_words"].append(len(ex["question"].split()))
        per["word_length"] += [len(s) for s in names if not is_person(s)]
        words.update(s for s in names if not is_person(s))
        people.update(persons)
        depth[len(ex["steps"])] = depth.get(len(ex["steps"]), 0) + 1
        m = _ASK.search(ex["question"])
        first.append(float(m is not None and m.group(2) == names[ex["target"]]))
    out: dict[str, Any] = {"n": len(examples), **{k: _mean_sd(v) for k, v in per.items()}}
    out["steps_histogram"] = {k: depth[k] / len(examples) for k in sorted(depth)}
    out["target_first"] = statistics.fmean(first) if first else math.nan
    out["concept_vocabulary"] = len(words)
    out["person_vocabulary"] = len(people)
    return out


_ROWS = (("nodes", "nodes"), ("edges", "edges"), ("steps (= depth)", "steps"), ("people", "people"),
         ("concepts", "concepts"), ("question words", "question_words"),
         ("concept word length", "word_length"))


def stats_table(columns: dict[str, dict[str, Any]]) -> str:
    """A markdown table, one column per `prosqa_stats` result (mean ± sd per example)."""
    names = list(columns)
    lines = ["| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|",
             "| examples | " + " | ".join(str(columns[c]["n"]) for c in names) + " |"]
    for label, key in _ROWS:
        lines.append(f"| {label} | " + " | ".join(
            f"{columns[c][key]['mean']:.2f} ± {columns[c][key]['sd']:.2f}" for c in names) + " |")
    depths = sorted({d for c in names for d in columns[c]["steps_histogram"]})
    lines.append("| steps " + "/".join(map(str, depths)) + " (%) | " + " | ".join(
        "/".join(f"{100 * columns[c]['steps_histogram'].get(d, 0):.0f}" for d in depths) for c in names) + " |")
    lines.append("| answer balance (target named first, %) | " + " | ".join(
        f"{100 * columns[c]['target_first']:.1f}" for c in names) + " |")
    lines.append("| distinct concept words (vocabulary) | " + " | ".join(
        str(columns[c]["concept_vocabulary"]) for c in names) + " |")
    lines.append("| distinct person names | " + " | ".join(
        str(columns[c]["person_vocabulary"]) for c in names) + " |")
    return "\n".join(lines)
