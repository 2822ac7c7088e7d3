"""Latent curriculum fine-tuning of the dual variants (`latent_sft`).

The oracle: the batched loss (every example one site at its question's end, variable
numbers of ahead tokens padded and masked, one call per pass) equals the mean over all
target tokens of the same thing done one example at a time with ordinary causal passes
(`pipeline.dual.reference.naive_site_nll`): losses 1e-5, gradients 1e-4, both families,
stage 0 and the last stage, examples of different question and answer lengths in one batch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))

from pipeline.config import from_dict  # noqa: E402
from pipeline.data.tokenizer import load_tokenizer  # noqa: E402
from pipeline.dual import DualConfig, DualModel  # noqa: E402
from pipeline.dual.reference import naive_site_nll  # noqa: E402
from pipeline.errors import PipelineError  # noqa: E402
from pipeline.models import build_model, preset  # noqa: E402
from pipeline.tasks import prosqa  # noqa: E402
from pipeline.tasks.curriculum import Curriculum, CurriculumConfig  # noqa: E402
from pipeline.tasks.latent import LatentConfig, LatentSFT, LatentSFTModel, StageExamples  # noqa: E402
from pipeline.tasks.schema import save_examples  # noqa: E402
from pipeline.train.task import BatchLayout  # noqa: E402
from pipeline.train.testing import run_distributed  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = [  # different question lengths, step counts and answer lengths
    {"question": "Every wumpus is a yumpus. Is Tom a yumpus?", "steps": ["Tom is a wumpus.", "So Tom is a yumpus."],
     "answer": "Tom is a yumpus."},
    {"question": "2 + 3?", "steps": ["2+3=5"], "answer": "5"},
    {"question": "A farmer has 12 cows and buys 7 more, then sells 4. How many are left?",
     "steps": ["12+7=19", "19-4=15", "check 15"], "answer": "15 cows"},
]
CASES = {
    "liu": dict(variant="liu"),
    "liu-reread": dict(variant="liu", decode_reread=True),
    "liu-last-hidden": dict(variant="liu", coprocessor_input="last_hidden"),
    "h1": dict(variant="h1"),
    "h2": dict(variant="h2"),
    "soft_embedding": dict(variant="soft_embedding"),
    "soft_embedding-reread": dict(variant="soft_embedding", decode_reread=True),
    "pause": dict(variant="pause"),
}
CUR = CurriculumConfig(latents_per_step=2, epochs_per_stage=1, max_stage=2, first_stage=0)


@pytest.fixture(scope="module")
def gpt2(gpt2_tokenizer_dir):
    return load_tokenizer(gpt2_tokenizer_dir)


def make(family: str, tok, **options) -> DualModel:
    torch.manual_seed(0)
    base = build_model(preset(family, vocab_size=50257, eos_token_id=tok.eos_id, max_position_embeddings=128))
    cfg = DualConfig(**{"n_latents": Curriculum(CUR).final_latents, "n_ahead": 1, "n_sites": 1, **options})
    dual = DualModel(base, cfg, eos_id=tok.eos_id)
    with torch.no_grad():  # slots unlike the token embeddings, so the latents matter in the check
        if dual.soft_tokens is not None:
            dual.soft_tokens.weight.normal_(0, 1.0)
    return dual


def naive_example_loss(dual: DualModel, rows: StageExamples) -> torch.Tensor:
    """Token mean over all examples of the target NLL, one example at a time."""
    terms = []
    for prompt, target in zip(rows.prompts, rows.targets, strict=True):
        row = torch.tensor(prompt + target)
        p, n_a = len(prompt) - 1, len(target)
        if rows.n_latents == 0:
            logits = dual.base(row[None]).logits[0]
            terms.append(F.cross_entropy(logits[p: p + n_a], row[p + 1:], reduction="none"))
        else:
            with dual.with_config(n_latents=rows.n_latents):
                terms.append(naive_site_nll(dual, row, p, n_a)[0])
    return torch.cat(terms).mean()


FROZEN_BASE = {"liu", "liu-reread", "liu-last-hidden", "h1", "pause"}  # their curriculum starts at stage 1


@pytest.mark.parametrize("family", ["gpt2-tiny", "qwen3-tiny"])
@pytest.mark.parametrize(("case", "stage"), [(c, s) for c in CASES for s in (0, 1, 2)
                                             if not (s == 0 and c in FROZEN_BASE)])
def test_batched_loss_equals_one_example_at_a_time(gpt2, family, case, stage):
    dual = make(family, gpt2, **CASES[case])
    rows = StageExamples(EXAMPLES, gpt2, Curriculum(CUR), stage)
    assert len({len(t) for t in rows.targets}) == 3 and len({len(p) for p in rows.prompts}) == 3
    b = rows.batch([0, 1, 2])
    model = LatentSFTModel(dual)
    nll, n, _ = model(b["input_ids"], b["sites"], b["ahead_mask"], b["n_latents"])
    packed = nll / n
    naive = naive_example_loss(dual, rows)
    torch.testing.assert_close(packed, naive, atol=1e-5, rtol=0)
    params = [(name, p) for name, p in dual.named_parameters() if p.requires_grad]
    g_packed = torch.autograd.grad(packed, [p for _, p in params], allow_unused=True)
    g_naive = torch.autograd.grad(naive, [p for _, p in params], allow_unused=True)
    used = 0
    for (name, _), gp, gn in zip(params, g_packed, g_naive, strict=True):
        if gn is None:  # stage 0: the Coprocessor and slots are idle (a zero gradient in the packed path)
            assert stage == 0 and (gp is None or not gp.any()), name
            continue
        used += 1
        torch.testing.assert_close(gp, gn, atol=1e-4, rtol=0, msg=lambda m, n=name: f"grad of {n}: {m}")
    assert used


def test_the_answer_does_not_leak_into_its_own_latents(gpt2):
    """Changing an example's targets changes nothing that predicts its first target."""
    dual = make("gpt2-tiny", gpt2, variant="h2")
    rows = StageExamples(EXAMPLES[:1], gpt2, Curriculum(CUR), 2)
    b = rows.batch([0])
    p = int(b["sites"][0, 0])
    with dual.with_config(n_latents=4, n_ahead=1, n_sites=1):
        def first_logits(ids):
            out = dual.base(ids, return_kv=True, return_logits=False)
            lat, kv = dual.slot_contents(b["sites"], out.kv, out.hidden_states)
            return dual.decode_logits(ids, b["sites"], 1, out.kv, lat, kv)
        other = b["input_ids"].clone()
        other[0, p + 1:] = 123
        torch.testing.assert_close(first_logits(b["input_ids"]), first_logits(other))


def test_batch_layout_pads_and_masks(gpt2):
    rows = StageExamples(EXAMPLES, gpt2, Curriculum(CUR), 1)
    b = rows.batch([1, 2])
    for r, i in enumerate([1, 2]):
        p, t = rows.prompts[i], rows.targets[i]
        assert b["sites"][r, 0] == len(p) - 1
        assert b["input_ids"][r, : len(p) + len(t)].tolist() == p + t
        assert b["ahead_mask"][r].sum() == len(t) and b["ahead_mask"][r, : len(t)].all()
        assert t[-1] == gpt2.eos_id
    assert gpt2.decode(rows.targets[2][:-1]) == "19-4=15\ncheck 15\n### 15 cows"
    assert b["n_latents"] == 2


def test_with_config_refuses_more_latents_than_built(gpt2):
    dual = make("gpt2-tiny", gpt2, variant="soft_embedding")
    with pytest.raises(PipelineError, match="exceeds"), dual.with_config(n_latents=5):
        pass


# ---------------------------------------------------------------------- through the DeepSpeed loop
def latent_config(train_file: Path, out: Path, variant: str, **curriculum) -> LatentConfig:
    return from_dict(LatentConfig, {
        "model": {"overrides": {"vocab_size": 50257, "eos_token_id": 50256, "max_position_embeddings": 320}},
        "data": {"train_file": str(train_file), "valid_file": str(train_file), "max_len": 300},
        "dual": {"variant": variant},
        "curriculum": {"latents_per_step": 1, "epochs_per_stage": 1, "max_stage": 2, **curriculum},
        "train": {"max_steps": 6, "log_every": 1, "eval_every": 1, "eval_sequences": 4, "output_dir": str(out)},
        "tracking": {"enabled": False}})


def latent_ranks(out: str, train_file: str, reset: bool) -> dict:
    """6 steps of liu curriculum fine-tuning (8 examples, global batch 4: a stage per 2 steps)."""
    from pipeline.train.trainer import train

    ds = json.loads((ROOT / "ds_configs" / "zero2_cpu.json").read_text())
    ds |= {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1}
    res = train(LatentSFT(latent_config(Path(train_file), Path(out), "liu", reset_optimizer=reset)), ds)
    opt = res.engine.optimizer
    while not isinstance(opt, torch.optim.Optimizer):
        opt = opt.optimizer
    adam_steps = {int(st["step"]) for st in opt.state.values()}
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {"export": str(res.export_dir), "adam_steps": adam_steps,
            "stages": [r["stage"] for r in rows if "stage" in r], "val": [r for r in rows if "val_loss" in r]}


@pytest.mark.parametrize("reset", [True, False])
def test_trains_through_the_loop_resets_per_stage_and_exports(tmp_path, reset):
    """A frozen-Base variant starts at stage 1; the optimizer restarts at stage 2 when told to;
    the export augments with the final stage's count."""
    examples = prosqa.generate_prosqa(8, seed=3, preset="mini")
    train_file = save_examples(tmp_path / "mini.json", examples)
    (r,) = run_distributed(latent_ranks, str(tmp_path / "run"), str(train_file), reset, world_size=1)
    assert r["stages"] == [1, 1, 2, 2, 2, 2]
    assert r["adam_steps"] == ({4} if reset else {6})
    # validated at the final stage always, at the current one while it differs
    assert any("val_stage_loss" in v for v in r["val"]) and "val_stage_loss" not in r["val"][-1]
    meta = json.loads((Path(r["export"]) / "pipeline.json").read_text())
    assert meta["variant"] == "liu" and meta["dual"]["n_latents"] == 2
    assert meta["run_config"]["task"] == "latent_sft"


def test_config_refuses_a_variant_without_latents():
    with pytest.raises(PipelineError, match="reasoning_sft"):
        from_dict(LatentConfig, {"dual": {"variant": "continued_pretraining"}})


@pytest.mark.parametrize("name", ["orthogonality_weight", "lm_loss_weight", "draft_loss_weight"])
def test_config_refuses_pretraining_loss_terms_it_would_not_apply(name):
    with pytest.raises(PipelineError, match=f"dual.{name} is a loss term of dual pretraining"):
        from_dict(LatentConfig, {"dual": {"variant": "h2", name: 0.5}})


def test_build_skips_examples_too_long_at_some_stage(tmp_path):
    long = dict(EXAMPLES[2], question=EXAMPLES[2]["question"] * 12)
    f = save_examples(tmp_path / "t.json", [*EXAMPLES, long])
    cfg = latent_config(f, tmp_path / "r", "h2")
    cfg.data.max_len = 120
    task = LatentSFT(cfg)
    task.build(BatchLayout(2, 1, 1, 0, torch.device("cpu")))
    assert len(task.examples["train"]) == 3 and task.skipped["train"] == 1
