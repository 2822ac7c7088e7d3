"""ProsQA: the checker on the 800 official items and on broken ones, and the generator's
determinism, soundness, statistics (against the official files) and freshness."""

from __future__ import annotations

import copy
import re

import pytest

from pipeline.errors import PipelineError
from pipeline.tasks import prosqa
from pipeline.tasks.prosqa import check_prosqa, generate_prosqa, graph_key, prosqa_stats

N_GEN = 600


@pytest.fixture(scope="module")
def official(prosqa_official):
    return prosqa_official["valid"] + prosqa_official["test"]


@pytest.fixture(scope="module")
def generated(official):
    return generate_prosqa(N_GEN, seed=0, preset="full", exclude=official)


def test_official_files_as_documented(prosqa_official):
    assert [len(prosqa_official[s]) for s in ("valid", "test")] == [300, 500]


def test_every_official_item_passes_the_checker(official):
    problems = {i: check_prosqa(ex) for i, ex in enumerate(official)}
    assert not {i: p for i, p in problems.items() if p}


def small() -> dict:
    """Tom -> wumpus -> lempus (target); Alex -> zumpus (neg_target); Tom -> yumpus."""
    return {"question": "...", "steps": ["Tom is a wumpus.", "Every wumpus is a lempus."],
            "answer": "Tom is a lempus.", "idx_to_symbol": ["Tom", "Alex", "wumpus", "lempus", "zumpus", "yumpus"],
            "edges": [[0, 2], [2, 3], [1, 4], [0, 5]], "root": 0, "target": 3, "neg_target": 4}


def broken(change) -> dict:
    ex = small()
    change(ex)
    return ex


@pytest.mark.parametrize("change,message", [
    (lambda ex: ex["edges"].append([5, 0]), "root 'Tom' has an incoming edge"),
    (lambda ex: ex["edges"].remove([2, 3]), "target 'lempus' is not reachable"),
    (lambda ex: ex["edges"].append([5, 4]), "neg_target 'zumpus' is reachable"),
    (lambda ex: ex["edges"].append([3, 5]), "target 'lempus' is not a sink"),
    (lambda ex: ex["edges"].append([4, 5]), "neg_target 'zumpus' is not a sink"),
    (lambda ex: ex["steps"].append("Every lempus is a lempus."), "3 steps but the BFS distance root -> target is 2"),
    (lambda ex: ex["edges"].append([0, 3]), "2 steps but the BFS distance root -> target is 1"),
    (lambda ex: ex["steps"].__setitem__(1, "Every wumpus is a yumpus."), "step 1 .* is not an edge"),
    (lambda ex: ex["steps"].__setitem__(0, "Alex is a wumpus."), "step 0 .* is not an edge from 'Tom'"),
    (lambda ex: ex.update(answer="Tom is a zumpus."), "answer 'Tom is a zumpus.' is not"),
])
def test_the_checker_catches_each_broken_rule(change, message):
    assert check_prosqa(small()) == []
    problems = check_prosqa(broken(change))
    assert any(re.search(message, p) for p in problems), problems


def test_a_broken_official_item_fails(official):
    ex = copy.deepcopy(official[0])
    ex["neg_target"], ex["target"] = ex["target"], ex["neg_target"]
    assert check_prosqa(ex)


def test_generator_is_seeded_and_deterministic(official):
    a = generate_prosqa(50, seed=3, exclude=official)
    assert a == generate_prosqa(50, seed=3, exclude=official)
    assert a != generate_prosqa(50, seed=4, exclude=official)
    assert generate_prosqa(20, seed=3, preset="mini") == generate_prosqa(20, seed=3, preset="mini")


def test_generated_items_pass_the_checker_and_read_like_the_official_ones(generated):
    for ex in generated + generate_prosqa(200, seed=0, preset="mini"):
        assert check_prosqa(ex) == [], ex
        names = ex["idx_to_symbol"]
        assert ex["answer"] == f"{names[ex['root']]} is a {names[ex['target']]}."
        assert ex["question"].endswith("?") and ex["question"].count(".") == len(ex["edges"])
        assert all(a < b for a, b in ex["edges"])  # topological numbering, as in the official files
        parentless = {v for v in range(len(names))} - {b for _, b in ex["edges"]}
        assert parentless == {v for v, s in enumerate(names) if s[0].isupper()}  # roots are exactly the people


def test_no_generated_item_equals_an_official_one(official, generated):
    questions = {ex["question"] for ex in official}
    graphs = {graph_key(ex) for ex in official}
    assert not any(ex["question"] in questions or graph_key(ex) in graphs for ex in generated)
    assert len({ex["question"] for ex in generated}) == len(generated)


def test_exclude_is_honoured():
    first = generate_prosqa(30, seed=7, preset="mini")
    again = generate_prosqa(30, seed=7, preset="mini", exclude=first)
    assert not {ex["question"] for ex in first} & {ex["question"] for ex in again}


# Tolerances for a 600-item sample against the 800 official items: means within 0.25 official
# sd (about 3x the sample's standard error), sds within 20%, the steps histogram within 5
# points per depth, the answer balance within 45-55%.
@pytest.mark.parametrize("key", ["nodes", "edges", "steps", "people", "concepts", "question_words"])
def test_generated_statistics_match_the_official_files(official, generated, key):
    want, got = prosqa_stats(official)[key], prosqa_stats(generated)[key]
    assert abs(got["mean"] - want["mean"]) <= 0.25 * want["sd"], (got, want)
    assert 0.8 <= got["sd"] / want["sd"] <= 1.2, (got, want)


def test_generated_depths_balance_and_names_match(official, generated):
    want, got = prosqa_stats(official), prosqa_stats(generated)
    assert set(got["steps_histogram"]) == set(want["steps_histogram"]) == {3, 4, 5, 6}
    for d, share in want["steps_histogram"].items():
        assert abs(got["steps_histogram"][d] - share) <= 0.05
    assert 0.45 <= got["target_first"] <= 0.55
    assert abs(got["word_length"]["mean"] - want["word_length"]["mean"]) <= 0.5
    assert got["person_vocabulary"] == want["person_vocabulary"] == len(prosqa.ENTITY_NAMES)


def test_concept_words_come_from_the_syllable_list_and_cover_the_official_ones(official, generated):
    words = set(prosqa.concept_words())
    official_words = {s for ex in official for s in ex["idx_to_symbol"] if not s[0].isupper()}
    official_people = {s for ex in official for s in ex["idx_to_symbol"] if s[0].isupper()}
    assert official_words <= words and official_people == set(prosqa.ENTITY_NAMES)
    assert all(re.fullmatch(r"[a-z]+pus", w) for w in words) and len(words) == 375
    assert all(s in words or s in prosqa.ENTITY_NAMES for ex in generated for s in ex["idx_to_symbol"])


def test_mini_preset_is_small_and_shallow():
    mini = generate_prosqa(300, seed=1, preset="mini")
    s = prosqa_stats(mini)
    assert 9 <= s["concepts"]["mean"] <= 11 and set(s["steps_histogram"]) == {2, 3}
    assert s["people"]["mean"] == 2 and s["concept_vocabulary"] <= 40


def test_stats_table_lists_every_column(official, generated):
    table = prosqa.stats_table({"official": prosqa_stats(official), "generated": prosqa_stats(generated)})
    assert table.splitlines()[0] == "| | official | generated |"
    assert "| steps (= depth) | 3.77 ± 0.76 |" in table
    assert all(row in table for row in ("answer balance", "distinct concept words", "nodes", "edges"))


def test_bad_arguments(shared_data):
    with pytest.raises(PipelineError, match="preset 'huge'"):
        generate_prosqa(1, preset="huge")
    with pytest.raises(PipelineError, match="no training set ships"):
        prosqa.load_prosqa("train", shared_data / "prosqa")
