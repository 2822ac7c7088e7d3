"""The latent probe: its rows are the model's own scores, its oracle uses the true tokens."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.errors import PipelineError
from pipeline.eval.probe import markdown, probe

from .conftest import EOS, tiny_dual


def _batch(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 1000, (3, 48), generator=g)
    x[:, 0] = EOS
    return x


@pytest.mark.parametrize("variant", ["liu", "pause"])
def test_probe_rows_are_the_models_own_scores(variant):
    dual = tiny_dual(variant)
    x = _batch()
    r = probe(dual, x, seed=0)
    sites = dual.sample_sites(x, torch.Generator().manual_seed(0))
    k = dual.config.n_ahead
    with torch.no_grad():
        aug = dual.score_sites(x, sites, k=k).mean((0, 1))
        base = dual.score_sites(x, sites, k=k, augment=False).mean((0, 1))
    torch.testing.assert_close(torch.tensor(r["nll_per_k"]["learned latents"]), aug, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(r["nll_per_k"]["base alone"]), base, rtol=1e-5, atol=1e-5)
    assert set(r["grad_norm"]) == ({"coprocessor", "soft_tokens"} if variant == "liu" else {"soft_tokens"})
    assert all(v > 0 for v in r["grad_norm"].values())
    assert "| oracle: true next tokens |" in markdown(r)
    assert ("draft_nll_per_slot" in r) == (variant == "liu")


def test_probe_draft_is_the_coprocessors_head_at_the_slots():
    """draft_nll_per_slot[j] = CE of the Coprocessor's head at slot j against x[p+1+j]; swapped
    latents keep the scale but not the site; both differ from the learned row."""
    dual = tiny_dual("liu").eval()
    x = _batch(2)
    r = probe(dual, x, seed=1)
    sites = dual.sample_sites(x, torch.Generator().manual_seed(1))
    j = min(dual.config.n_latents, dual.config.n_ahead)
    with torch.no_grad():
        out = dual.base(x, return_kv=True, return_logits=False)
        _, _, z = dual.slots(sites, out.kv, out.hidden_states, None)
        logits = dual.coprocessor.lm_head(z[:, :, :j])
        targets = x.gather(1, (sites.unsqueeze(-1) + 1 + torch.arange(j)).flatten(1))
        nll = F.cross_entropy(logits.flatten(0, 2), targets.flatten(), reduction="none").view(*sites.shape, j)
    torch.testing.assert_close(torch.tensor(r["draft_nll_per_slot"]), nll.mean((0, 1)), rtol=1e-5, atol=1e-5)
    assert r["nll_per_k"]["site-swapped latents"] != r["nll_per_k"]["learned latents"]
    assert "Coprocessor's own head at slot j" in markdown(r)


def test_probe_oracle_feeds_the_true_next_tokens():
    """Oracle latents are the embeddings of x[p+1 .. p+N_L]: decoding with them by hand agrees."""
    dual = tiny_dual("liu").eval()
    x = _batch(1)
    r = probe(dual, x, seed=3)
    torch.testing.assert_close(torch.tensor(r["nll_per_k"]["oracle: true next tokens"]),
                               _true_token_nll(dual, x, 3, dual.base.transformer.wte.weight), rtol=1e-5, atol=1e-5)


def _true_token_nll(dual, x: torch.Tensor, seed: int, table: torch.Tensor) -> torch.Tensor:
    """Per-k NLL, by hand, of decoding with slot j = table[x[p+1+j]] at the probe's sites."""
    sites = dual.sample_sites(x, torch.Generator().manual_seed(seed))
    n_l, n_a = dual.config.n_latents, dual.config.n_ahead
    with torch.no_grad():
        cache = dual.base(x, return_kv=True, return_logits=False).kv
        truth = x.gather(1, (sites.unsqueeze(-1) + 1 + torch.arange(n_l)).flatten(1)).view(*sites.shape, n_l)
        logits = dual.decode_logits(x, sites, n_a, cache, table[truth], None)
        targets = x.gather(1, (sites.unsqueeze(-1) + 1 + torch.arange(n_a)).flatten(1))
        nll = F.cross_entropy(logits.flatten(0, 2), targets.flatten(), reduction="none").view(*sites.shape, n_a)
    return nll.mean((0, 1))


def test_probe_refuses_a_model_without_latents():
    with pytest.raises(PipelineError, match="latents"):
        probe(tiny_dual("continued_pretraining"), _batch())


def test_probe_cli_writes_json_and_table(exports, tmp_path, capsys):
    import importlib.util
    import json
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("evaluate", Path(__file__).parents[2] / "launchers" / "evaluate.py")
    evaluate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate)
    assert evaluate.main(["probe", "--model", str(exports["liu"]), "--sequences", "4", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "probe.json").read_text())
    rows = next(iter(result["models"].values()))["nll_per_k"]
    assert {"base alone", "learned latents", "oracle: true next tokens"} <= set(rows)
    assert "oracle: true next tokens" in capsys.readouterr().out


def test_probe_code_oracle_reads_the_true_tokens_rows_of_the_code():
    """With latent_readout=vocab the extra oracle row decodes with C[x[p+1 .. p+N_L]]."""
    from pipeline.dual import DualConfig, DualModel

    from .conftest import tiny_base

    dual = DualModel(tiny_base(), DualConfig(variant="liu", n_latents=3, n_ahead=4, n_sites=4,
                                             latent_readout="vocab"), eos_id=EOS).eval()
    with torch.no_grad():
        dual.latent_code.weight.mul_(0.5)  # not the Base's own embeddings any more
    x = _batch(3)
    r = probe(dual, x, seed=2)
    torch.testing.assert_close(torch.tensor(r["nll_per_k"]["oracle through the code: C[true next tokens]"]),
                               _true_token_nll(dual, x, 2, dual.latent_code.weight.T), rtol=1e-5, atol=1e-5)
    assert r["nll_per_k"]["oracle through the code: C[true next tokens]"] != r["nll_per_k"]["oracle: true next tokens"]
