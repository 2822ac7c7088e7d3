"""ppl-at-k: the no-augmentation case is ordinary perplexity; the dump re-scores exactly."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.dual import load_dual
from pipeline.errors import PipelineError
from pipeline.eval import ppl as pk
from pipeline.eval.bootstrap import paired_ppl_bootstrap
from pipeline.eval.models import load_eval_model
from pipeline.eval.runner import run_ppl_at_k
from pipeline.models import from_pretrained

from .conftest import K

_spec = importlib.util.spec_from_file_location("evaluate_cli", Path(__file__).parents[2] / "launchers" / "evaluate.py")
evaluate_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(evaluate_cli)


def test_no_augmentation_equals_per_position_perplexity(exports, shard_dir, tmp_path):
    model = load_eval_model(exports["hf_base"])
    cfg = pk.PplConfig(k=K, sites_per_doc=None, batch_size=3, sites_per_row=7)
    res = run_ppl_at_k([model], out=tmp_path, cfg=cfg, data=str(shard_dir), limit=6)
    got = res["models"][0]
    # brute force: one forward per document, NLL of every token, grouped by distance from the site
    base = from_pretrained(exports["hf_base"])
    docs = pk.load_documents(shard_dir, limit=6)
    per_k = [[] for _ in range(K)]
    n_pos = base.config.max_position_embeddings  # 128: sites p with x[0..p+K] inside it
    assert max(len(d) for d in docs) > n_pos  # the position limit is exercised
    for d in docs:
        ids = torch.from_numpy(d[:n_pos])[None]
        with torch.no_grad():
            nll = torch.nn.functional.cross_entropy(base(ids).logits[0, :-1], ids[0, 1:], reduction="none")
        for p in range(0, min(len(d), n_pos) - K):  # every site whose K targets lie in the document
            for k in range(1, K + 1):
                per_k[k - 1].append(float(nll[p + k - 1]))  # -log p(x[p+k] | x[:p+k])
    want = [math.exp(np.mean(x)) for x in per_k]
    assert got["n_sites"] == len(per_k[0])
    np.testing.assert_allclose(got["ppl"], want, rtol=1e-5)
    assert got["ppl_base"] == got["ppl"] and all(r == 0 for r in got["reduction_pct"])
    # a plain model: intervals of its ppl only, around the point estimate
    assert res["bootstrap"] == {"n_resamples": 1000, "level": 0.95, "seed": 0}
    assert all(lo < p < hi for p, (lo, hi) in zip(got["ppl"], got["ppl_ci"], strict=True))
    assert "reduction_pct_ci" not in got and "delta_nll" not in got


@pytest.mark.parametrize("variant", ["liu", "h1"])
def test_dump_rescored_by_the_dual_scorer(variant, exports, shard_dir, tmp_path):
    dump = tmp_path / "sites.jsonl"
    rc = evaluate_cli.main(["ppl-at-k", "--model", str(exports[variant]), "--k", str(K), "--limit", "5",
                            "--sites-per-doc", "3", "--out", str(tmp_path / "out"), "--dump", str(dump),
                            "--device", "cpu", "--bootstrap", "200", "--bootstrap-seed", "4"])
    assert rc == 0
    res = json.loads((tmp_path / "out" / "ppl_at_k.json").read_text())
    assert (tmp_path / "out" / "ppl_at_k.png").stat().st_size > 1000
    lines = [json.loads(x) for x in dump.read_text().splitlines()]
    assert len(lines) == res["n_sites"] == res["models"][0]["n_sites"] > 5
    docs = pk.load_documents(shard_dir, limit=5)
    dual = load_dual(exports[variant])
    nll_all, base_all = [], []
    for line in lines:
        ctx, tgt = line["context"], line["targets"]
        assert len(tgt) == K == len(line["nll"])
        # the context is exactly a document prefix, with the targets following it there
        doc = docs[line["doc"]]
        assert doc[: len(ctx) + K].tolist() == ctx + tgt and line["site"] == len(ctx) - 1
        ids = torch.tensor([ctx + tgt])
        site = torch.tensor([[len(ctx) - 1]])
        np.testing.assert_allclose(line["nll"], dual.score_sites(ids, site, K)[0, 0].numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(line["nll_base"], dual.score_sites(ids, site, K, augment=False)[0, 0].numpy(),
                                   rtol=1e-4, atol=1e-5)
        nll_all.append(line["nll"])
        base_all.append(line["nll_base"])
    m = res["models"][0]
    np.testing.assert_allclose(m["ppl"], np.exp(np.mean(nll_all, axis=0)), rtol=1e-5)
    np.testing.assert_allclose(m["ppl_base"], np.exp(np.mean(base_all, axis=0)), rtol=1e-5)
    red = 100 * (np.array(m["ppl_base"]) - m["ppl"]) / np.array(m["ppl_base"])
    np.testing.assert_allclose(m["reduction_pct"], red, rtol=1e-6)
    assert m["ppl"] != m["ppl_base"]  # the augmentation changes predictions
    # the intervals are the paired bootstrap of exactly these per-site NLLs
    assert res["bootstrap"] == {"n_resamples": 200, "level": 0.95, "seed": 4}
    boot = paired_ppl_bootstrap(np.array(nll_all), np.array(base_all), n_resamples=200, seed=4)
    for key, want in [("ppl_ci", boot.ppl_ci), ("ppl_base_ci", boot.base_ppl_ci), ("delta_nll", boot.delta_nll),
                      ("reduction_pct_ci", boot.reduction_pct_ci), ("delta_nll_ci", boot.delta_nll_ci)]:
        np.testing.assert_allclose(m[key], want, rtol=1e-9, atol=1e-12, err_msg=key)
    for key in ("ppl", "ppl_base", "reduction_pct"):
        assert all(lo <= x <= hi for x, (lo, hi) in zip(m[key], m[f"{key}_ci"], strict=True)), key


def test_several_models_share_sites_and_plot(exports, shard_dir, tmp_path):
    models = [load_eval_model(exports[v]) for v in ("liu", "hf_base")]
    res = run_ppl_at_k(models, out=tmp_path, cfg=pk.PplConfig(k=4, sites_per_doc=2, seed=3), limit=4)
    assert [m["name"] for m in res["models"]] == ["liu", "hf_base"]
    assert res["data"] == str(shard_dir)  # from the liu export's pipeline.json
    assert res["models"][0]["n_sites"] == res["models"][1]["n_sites"]
    # liu's Base is the same random init as hf_base: its "Base alone" column equals hf_base's ppl
    np.testing.assert_allclose(res["models"][0]["ppl_base"], res["models"][1]["ppl"], rtol=1e-5)
    md = (tmp_path / "ppl_at_k.md").read_text()
    assert "| 4 |" in md and "liu Δ%" in md
    # intervals in the table: liu's three columns, hf_base's ppl only (no Base of its own)
    liu, hf = res["models"]
    row = next(line for line in md.splitlines() if line.startswith("| 4 |")).split(" | ")
    assert row[1] == f"{liu['ppl'][3]:.3f} [{liu['ppl_ci'][3][0]:.3f}, {liu['ppl_ci'][3][1]:.3f}]"
    lo, hi = liu["reduction_pct_ci"][3]
    assert row[3] == f"{liu['reduction_pct'][3]:+.2f} [{lo:+.2f}, {hi:+.2f}]"
    assert row[4].endswith("]") and "[" not in row[5] + row[6]
    assert "95% percentile bootstrap" in md
    # results without intervals (older JSON) still render
    old = {**res, "models": [{k: v for k, v in m.items() if not k.endswith("_ci")} for m in res["models"]]}
    assert "[" not in pk.markdown_table({k: v for k, v in old.items() if k != "bootstrap"})


def test_site_plan_is_seeded_and_respects_limits():
    docs = [np.arange(50), np.arange(4), np.arange(30)]
    a = pk.plan_sites(docs, pk.PplConfig(k=4, sites_per_doc=3, seed=1), last_site=20)
    b = pk.plan_sites(docs, pk.PplConfig(k=4, sites_per_doc=3, seed=1), last_site=20)
    assert np.array_equal(a.site, b.site) and np.array_equal(a.doc, b.doc)
    assert set(a.doc.tolist()) == {0, 2}  # the 4-token document cannot hold 4 targets after a site
    assert a.site.max() <= 20
    every = pk.plan_sites(docs, pk.PplConfig(k=4, sites_per_doc=None), last_site=100)
    assert len(every) == (50 - 4) + (30 - 4)
    with pytest.raises(PipelineError, match="long enough"):
        pk.plan_sites([np.arange(3)], pk.PplConfig(k=4), last_site=100)


def test_cli_errors_exit_2(tmp_path, capsys):
    assert evaluate_cli.main(["ppl-at-k", "--model", str(tmp_path / "missing")]) == 2
    assert "error:" in capsys.readouterr().err


def test_sites_stay_inside_the_training_window(exports, shard_dir, tmp_path):
    """An export that trained on W-token windows is scored only where context + k targets fit
    in the first W tokens (run_config.data.seq_len); --window 0 lifts the bound; a plain
    checkpoint records no window."""
    import shutil

    src = exports["liu"]
    dst = tmp_path / "liu-w24"
    shutil.copytree(src, dst)
    meta = json.loads((dst / "pipeline.json").read_text())
    meta["run_config"]["data"]["seq_len"] = 24
    (dst / "pipeline.json").write_text(json.dumps(meta))
    model = load_eval_model(dst)
    assert model.trained_window == 24 and load_eval_model(exports["hf_base"]).trained_window is None
    dump = tmp_path / "sites.jsonl"
    cfg = pk.PplConfig(k=K, sites_per_doc=None)
    res = run_ppl_at_k([model], out=tmp_path / "w", cfg=cfg, data=str(shard_dir), limit=4, dump=str(dump))
    sites = [json.loads(x)["site"] for x in dump.read_text().splitlines()]
    assert res["window"] == 24 and max(sites) == 24 - 1 - K
    assert "first 24 tokens" in (tmp_path / "w" / "ppl_at_k.md").read_text()
    free = run_ppl_at_k([model], out=tmp_path / "f", cfg=pk.PplConfig(k=K, sites_per_doc=None, window=0),
                        data=str(shard_dir), limit=4)
    assert free["window"] == 0 and free["n_sites"] > res["n_sites"]
