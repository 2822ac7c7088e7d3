"""The comparison recipe end to end at a micro size: every variant from one Base, a table
with a row each, one MLflow parent run over child runs, and a rerun that reuses it all."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))  # conftest importable by the spawned ranks

from pipeline.recipe import COMPARE_VARIANTS, PAPER_ORDERINGS, check_orderings  # noqa: E402
from pipeline.train.testing import run_distributed  # noqa: E402


def _compare(root: Path, data: Path) -> dict:
    from conftest import cpu_ds_config

    from pipeline.recipe import run_compare

    res = run_compare(cpu_ds_config(), root=root, data=str(data), steps=3, base_steps=4)
    return {"table": res.table, "n_sites": res.n_sites}


@pytest.fixture(scope="module")
def compare(tmp_path_factory, corpus_dir):
    root = tmp_path_factory.mktemp("compare")
    first = run_distributed(_compare, root, corpus_dir, world_size=2)[0]
    mtimes = {v: (root / "compare" / v / "export" / "pipeline.json").stat().st_mtime for v in COMPARE_VARIANTS}
    again = run_distributed(_compare, root, corpus_dir, world_size=2)[0]
    return {"root": root, "first": first, "again": again, "mtimes": mtimes}


def test_compare_table_has_every_variant(compare):
    table = compare["first"]["table"]
    for variant in COMPARE_VARIANTS:
        assert f"| {variant} |" in table
    assert "tokens of a document, the window the models trained on" in table  # sites inside data.seq_len
    rows = json.loads((compare["root"] / "compare" / "compare.json").read_text())
    assert [r["variant"] for r in rows] == list(COMPARE_VARIANTS)
    for r in rows:
        assert len(r["ppl"]) == 4 and all(lo <= p <= hi for p, (lo, hi) in zip(r["ppl"], r["ppl_ci"], strict=True))
        if r["variant"] != "continued_pretraining":
            assert all(lo <= d <= hi for d, (lo, hi) in zip(r["delta_vs_cp"], r["delta_vs_cp_ci"], strict=True))
    assert (compare["root"] / "compare" / "validation_ppl.png").stat().st_size > 0
    checks = json.loads((compare["root"] / "compare" / "orderings.json").read_text())
    assert [(c["a"], c["b"]) for c in checks] == [(a, b) for a, b, _, _ in PAPER_ORDERINGS]
    assert all(c["verdict"] in ("holds", "reversed", "unresolved") for c in checks)
    assert "Paper 000's orderings" in table


def test_orderings_verdict_follows_the_paired_interval():
    """a − b well above 0 holds for a claim of a above b and is reversed for a claim of a below
    b; identical NLLs are unresolved (a zero-width interval at 0)."""
    rng = np.random.default_rng(0)
    cp = rng.normal(5.0, 1.0, size=(400, 8))
    nll = {"continued_pretraining": cp, "liu": cp + 0.2, "h1": cp + 0.2, "h2": cp.copy(), "soft_embedding": cp + 0.0}
    checks = {(c["a"], c["b"]): c for c in check_orderings(nll, 4)}
    assert checks[("liu", "continued_pretraining")]["verdict"] == "holds"
    assert checks[("h1", "continued_pretraining")]["verdict"] == "reversed"
    assert checks[("h2", "continued_pretraining")]["verdict"] == "unresolved"
    assert checks[("h2", "soft_embedding")]["gap_ci"] == [0.0, 0.0]
    assert checks[("h1", "soft_embedding")]["verdict"] == "holds"
    gap = checks[("liu", "continued_pretraining")]
    assert gap["gap"] == pytest.approx(np.exp(cp[:, :4].mean() + 0.2) - np.exp(cp[:, :4].mean()))


def test_compare_rerun_reuses_finished_variants(compare):
    root = compare["root"]
    for variant, mtime in compare["mtimes"].items():
        assert (root / "compare" / variant / "export" / "pipeline.json").stat().st_mtime == mtime
    assert compare["again"]["table"] == compare["first"]["table"]


def test_compare_logs_one_parent_run_with_a_child_per_variant(compare):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{compare['root'].resolve()}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parents = [r for r in runs if r.info.run_name == "compare"]
    assert len(parents) == 2  # one per invocation
    first = min(parents, key=lambda r: r.info.start_time)
    children = {r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == first.info.run_id}
    assert children == {f"compare-{v}" for v in COMPARE_VARIANTS}


def test_a_finished_stage_with_another_config_is_named_not_reused(tmp_path):
    """Reuse is by directory; a stage recorded with other settings (or before an option
    existed, when the new value is not its default) is reported, key by key."""
    from pipeline.config import to_dict
    from pipeline.recipe import config_changes
    from pipeline.train.config import load_config

    cfg = load_config("tiny-h2", ["train.base_lr_scale=0.1", "train.max_steps=600"])
    recorded = to_dict(cfg)
    del recorded["train"]["base_lr_scale"]  # recorded before the option existed
    recorded["tracking"]["parent_run_id"] = "another-invocation"  # tracking never counts
    (tmp_path / "pipeline_config.json").write_text(json.dumps(recorded))
    assert config_changes(tmp_path / "pipeline_config.json", cfg) == ["train.base_lr_scale: 1.0 -> 0.1"]
    same = load_config("tiny-h2", ["train.max_steps=600"])
    assert config_changes(tmp_path / "pipeline_config.json", same) == []
    assert config_changes(tmp_path / "missing.json", cfg) == []
