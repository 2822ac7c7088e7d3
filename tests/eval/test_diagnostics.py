"""Latent diagnostics: known answers on synthetic latents, H against a per-pair SVD loop,
collection against the per-site reference, the latent dump, and the CLI end to end."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.dual import load_dual
from pipeline.dual.reference import naive_loss
from pipeline.eval import diagnostics as dg
from pipeline.eval import ppl as pk
from pipeline.eval.models import load_eval_model

_spec = importlib.util.spec_from_file_location("evaluate_cli", Path(__file__).parents[2] / "launchers" / "evaluate.py")
evaluate_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(evaluate_cli)


# ---------------------------------------------------------------------- synthetic latents
def test_orthogonal_latents_capture_nothing_of_each_other_and_separate():
    rng = np.random.default_rng(0)
    n_l, n, d, width = 4, 200, 32, 4
    x = np.zeros((n_l, n, d))
    for i in range(n_l):  # latent i lives in coordinates [width·i, width·(i+1)), far from the others
        block = slice(width * i, width * (i + 1))
        x[i, :, block] = rng.normal(size=(n, width))
        x[i, :, width * i] += 50.0
    cc = dg.cross_capture(x, 0.97)
    assert cc.h_off == pytest.approx(0.0, abs=1e-12)
    assert (np.diag(cc.H) >= 0.97).all() and (cc.k <= width).all()
    sil = dg.silhouettes(x)
    assert sil["global"] > 0.9 and min(sil["per_latent"]) > 0.9 and not sil["subsampled"]


def test_latents_from_one_distribution_are_redundant_and_mixed():
    rng = np.random.default_rng(1)
    n_l, n, d = 5, 400, 16
    mix = rng.normal(size=(3, d))  # one shared rank-3 distribution
    x = rng.normal(size=(n_l, n, 3)) @ mix + 0.01 * rng.normal(size=(n_l, n, d))
    cc = dg.cross_capture(x, 0.97)
    assert cc.h_off > 0.99
    sil = dg.silhouettes(x)
    assert abs(sil["global"]) < 0.05 and all(abs(s) < 0.1 for s in sil["per_latent"])
    # above the size limit: the same seeded subset of sites for every latent, said in the result
    sub = dg.silhouettes(x, max_points=100, seed=3)
    assert sub["subsampled"] and sub["n_points"] == 100 and abs(sub["global"]) < 0.1


@pytest.mark.parametrize("tau", [0.5, 0.9, 0.97, 1.0])
@pytest.mark.parametrize("shape", [(3, 50, 8), (4, 6, 20), (2, 2, 3)])
def test_diagonal_is_at_least_tau(tau, shape):
    rng = np.random.default_rng(sum(shape))
    x = rng.normal(size=shape) * rng.uniform(0.1, 10.0, size=shape[-1])  # anisotropic
    cc = dg.cross_capture(x, tau)
    assert (np.diag(cc.H) >= tau - 1e-9).all()
    assert ((cc.H >= 0) & (cc.H <= 1)).all() and cc.n.tolist() == [shape[1]] * shape[0]


def test_a_scaled_copy_is_captured_entirely():
    rng = np.random.default_rng(2)
    n, d = 60, 16
    a = rng.normal(size=(n, 3)) @ rng.normal(size=(3, d))  # rank 3: its subspace holds all of it
    other = rng.normal(size=(n, d))
    x = np.stack([a, -3.0 * a + 5.0, other])  # latent 1 = a scaled (and shifted) copy of latent 0
    h = dg.cross_capture(x, 0.97).H
    assert h[0, 1] == pytest.approx(1.0, abs=1e-9) and h[1, 0] == pytest.approx(1.0, abs=1e-9)
    assert h[0, 0] == pytest.approx(1.0, abs=1e-9) and h[1, 1] == pytest.approx(1.0, abs=1e-9)
    assert h[0, 2] < 0.5  # the rank-3 subspace of a holds little of the full-rank noise


@pytest.mark.parametrize("shape", [(3, 7, 5), (4, 12, 4), (2, 3, 9)])
def test_vectorised_h_equals_a_per_pair_svd_loop(shape):
    rng = np.random.default_rng(shape[1])
    x = rng.normal(size=shape) * rng.uniform(0.2, 3.0, size=shape[-1]) + rng.normal(size=shape[-1])
    tau = 0.9
    n_l = shape[0]
    want = np.zeros((n_l, n_l))
    for i in range(n_l):
        xi = x[i] - x[i].mean(0)
        _, s, vt = np.linalg.svd(xi, full_matrices=False)
        frac = np.cumsum(s**2) / np.sum(s**2)
        k = next(r + 1 for r, f in enumerate(frac) if f >= tau)
        proj = vt[:k].T @ vt[:k]
        for j in range(n_l):
            xj = x[j] - x[j].mean(0)
            want[i, j] = np.linalg.norm(xj @ proj) ** 2 / np.linalg.norm(xj) ** 2
    np.testing.assert_allclose(dg.cross_capture(x, tau).H, want, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------- collection
@pytest.mark.parametrize("variant", ["liu", "h1"])
def test_collection_equals_the_per_site_reference(variant, exports, shard_dir):
    model = load_eval_model(exports[variant])
    docs = pk.load_documents(shard_dir, limit=3)
    n_a = model.dual.config.n_ahead
    plan = dg.plan_pretraining_sites(docs, 9, n_a, model.last_site(n_a), seed=5)
    rows = dg.plan_rows(docs, plan)
    assert len(rows) == 3 and any(len(s) > 1 for _, s in rows)  # several sites per row, rows batched
    x = dg.collect_latents(model, rows, batch_size=2)
    assert x.shape == (3, len(plan), 64)
    # the reference runs one site at a time; read Z off its Coprocessor calls (those over the slots)
    dual = load_dual(exports[variant])
    seen = []
    hook = dual.coprocessor.register_forward_hook(
        lambda mod, args, kwargs, out: seen.append(out.hidden_states[0]) if kwargs.get("prefix_kv") else None,
        with_kwargs=True)
    try:
        for d in dict.fromkeys(plan.doc.tolist()):
            sites = plan.site[plan.doc == d]
            with torch.no_grad():
                naive_loss(dual, torch.from_numpy(docs[d][: sites[-1] + n_a + 1])[None], torch.from_numpy(sites)[None])
    finally:
        hook.remove()
    want = torch.stack(seen).numpy()  # (n, N_L, d)
    np.testing.assert_allclose(x.transpose(1, 0, 2), want, rtol=1e-4, atol=1e-5)


def test_dump_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    latents = {"a": rng.normal(size=(3, 5, 4)).astype(np.float32), "b-2": rng.normal(size=(2, 5, 6))}
    sites = np.array([[0, 3], [0, 9], [1, 2], [2, 7], [2, 8]])
    path = dg.save_latents(tmp_path / "dir" / "latents", latents, sites)  # no ".npz" appended
    assert path == tmp_path / "dir" / "latents" and path.is_file()
    back, back_sites = dg.load_latents(path)
    assert list(back) == ["a", "b-2"] and np.array_equal(back_sites, sites)
    for name, x in latents.items():
        assert back[name].dtype == x.dtype and np.array_equal(back[name], x)


# ---------------------------------------------------------------------- CLI
def test_cli_on_pretraining_shards_side_by_side(exports, tmp_path, capsys):
    out, dump = tmp_path / "out", tmp_path / "latents.npz"
    rc = evaluate_cli.main(["diagnostics", "--model", str(exports["liu"]), "--model", str(exports["h1"]),
                            "--sites", "24", "--limit", "6", "--tau", "0.9", "--out", str(out),
                            "--dump-latents", str(dump), "--device", "cpu"])
    assert rc == 0
    assert "H_off" in capsys.readouterr().out
    res = json.loads((out / "diagnostics.json").read_text())
    assert res["source"]["kind"] == "pretraining" and res["n_sites"] == 24 and res["tau"] == 0.9
    assert [m["name"] for m in res["models"]] == ["liu", "h1"]
    for png in ("cross_capture.png", "silhouette.png"):
        assert (out / png).stat().st_size > 1000
    latents, sites = dg.load_latents(dump)
    assert sites.shape == (24, 2) and len(set(sites[:, 0].tolist())) > 1  # spread over documents
    for m in res["models"]:
        x = latents[m["name"]]
        assert x.shape == (3, 24, 64) and m["n"] == [24] * 3
        cc = dg.cross_capture(x, 0.9)  # the JSON's numbers are those of the dumped latents
        np.testing.assert_allclose(m["H"], cc.H, rtol=1e-12)
        assert m["H_off"] == pytest.approx(cc.h_off) and m["k"] == cc.k.tolist()
        assert m["silhouette"] == pytest.approx(dg.silhouettes(x)["global"])
    # a model without input-dependent latents is refused with a clear error
    assert evaluate_cli.main(["diagnostics", "--model", str(exports["hf_base"]), "--out", str(out)]) == 2
    assert "error:" in (err := capsys.readouterr().err) and "Coprocessor variant" in err


def _prosqa_example(root: str, a: str, b: str, target: str, other: str) -> dict:
    names = [root, "Sally", a, b, target, other]
    return {"question": f"Every {a} is a {b}. {root} is a {a}. Every {b} is a {target}. Sally is a {other}. "
                        f"Is {root} a {target} or {other}?",
            "steps": [f"{root} is a {a}.", f"Every {a} is a {b}.", f"Every {b} is a {target}."],
            "answer": f"{root} is a {target}.", "idx_to_symbol": names,
            "edges": [[0, 2], [2, 3], [3, 4], [1, 5]], "root": 0, "target": 4, "neg_target": 5}


def test_cli_on_a_task_file(exports, gpt2_tokenizer_dir, tmp_path):
    examples = [_prosqa_example("Tom", "wumpus", "yumpus", "rempus", "gorpus"),
                _prosqa_example("Alex", "zhorpus", "brimpus", "lempus", "shumpus"),
                _prosqa_example("Polly", "sterpus", "jelpus", "impus", "numpus")]
    file = tmp_path / "prosqa.json"
    file.write_text(json.dumps(examples))
    out, dump = tmp_path / "out", tmp_path / "latents.npz"
    rc = evaluate_cli.main(["diagnostics", "--model", str(exports["liu"]), "--task", "prosqa", "--task-file",
                            str(file), "--out", str(out), "--dump-latents", str(dump), "--device", "cpu"])
    assert rc == 0
    res = json.loads((out / "diagnostics.json").read_text())
    assert res["source"]["kind"] == "task" and res["source"]["task"] == "prosqa" and res["n_sites"] == 3
    assert (out / "cross_capture.png").is_file() and (out / "silhouette.png").is_file()
    from pipeline.data.tokenizer import load_tokenizer

    lengths = [len(ids) for ids in load_tokenizer(gpt2_tokenizer_dir).encode_batch(
        [ex["question"] + "\n" for ex in examples])]
    _, sites = dg.load_latents(dump)
    assert sites.tolist() == [[i, n - 1] for i, n in enumerate(lengths)]  # the question's newline
