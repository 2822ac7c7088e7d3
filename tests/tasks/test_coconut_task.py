"""Coconut as a training task: token layout per stage, stage per step, the optimizer reset under
DeepSpeed ZeRO-2, and a run whose export `evaluate.py reasoning` reads and decodes exactly as a
per-example unbatched reference does."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))  # this module importable by the spawned rank

from pipeline.coconut import reference as ref  # noqa: E402
from pipeline.config import from_dict  # noqa: E402
from pipeline.data.tokenizer import load_tokenizer  # noqa: E402
from pipeline.errors import PipelineError  # noqa: E402
from pipeline.tasks import prosqa  # noqa: E402
from pipeline.tasks.coconut import CoconutConfig, CoconutTask, StagedExamples  # noqa: E402
from pipeline.tasks.curriculum import Curriculum, CurriculumConfig  # noqa: E402
from pipeline.tasks.schema import save_examples  # noqa: E402
from pipeline.train.task import BatchLayout  # noqa: E402
from pipeline.train.testing import run_distributed  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TINY = {"vocab_size": 50257, "eos_token_id": 50256, "max_position_embeddings": 320}
HAND = [{"question": "Is Tom a wumpus?", "steps": ["Tom is a yumpus.", "Every yumpus is a wumpus."],
         "answer": "Tom is a wumpus."},
        {"question": "Is Ann a rempus? Think.", "steps": ["Ann is a zumpus."], "answer": "Ann is a rempus."}]


@pytest.fixture(scope="module")
def gpt2(gpt2_tokenizer_dir):
    return load_tokenizer(gpt2_tokenizer_dir)


@pytest.fixture(scope="module")
def mini(tmp_path_factory) -> tuple[Path, list[dict]]:
    examples = prosqa.generate_prosqa(8, seed=5, preset="mini")
    return save_examples(tmp_path_factory.mktemp("coconut") / "mini.json", examples), examples


def config(train_file: Path, **curriculum) -> CoconutConfig:
    return from_dict(CoconutConfig, {
        "model": {"overrides": TINY},
        "data": {"train_file": str(train_file), "valid_file": str(train_file), "max_len": 320},
        "curriculum": {"latents_per_step": 1, "epochs_per_stage": 1, "max_stage": 2, **curriculum},
        "tracking": {"enabled": False}})


def test_token_layout_and_loss_side_at_each_stage(gpt2):
    cur = Curriculum(CurriculumConfig(latents_per_step=2, epochs_per_stage=1, max_stage=2))
    rows = StagedExamples(HAND, gpt2, cur, max_len=10_000, where="hand")
    enc = lambda s: gpt2.encode_batch([s])[0]  # noqa: E731
    eos = gpt2.eos_id
    for stage, (rest0, rest1), n in [
        (0, ("Tom is a yumpus.\nEvery yumpus is a wumpus.\n### Tom is a wumpus.", "Ann is a zumpus.\n### Ann is a rempus."), 0),
        (1, ("Every yumpus is a wumpus.\n### Tom is a wumpus.", "### Ann is a rempus."), 2),
        (2, ("### Tom is a wumpus.", "### Ann is a rempus."), 4),  # last stage: every step gone
    ]:
        b = rows.batch([0, 1], stage)
        assert b["n_latents"] == n and b["stage"] == stage
        for i, (q, r) in enumerate([(HAND[0]["question"] + "\n", rest0), (HAND[1]["question"] + "\n", rest1)]):
            assert b["question"][i, : b["q_len"][i]].tolist() == enc(q)  # the evaluator's prompt ids
            assert b["rest"][i, : b["rest_len"][i]].tolist() == enc(r) + [eos]  # the loss side, EOS last


def test_examples_too_long_at_any_stage_are_skipped(gpt2, caplog):
    cur = Curriculum(CurriculumConfig(latents_per_step=8, epochs_per_stage=1, max_stage=2))
    q1 = len(gpt2.encode_batch([HAND[1]["question"] + "\n"])[0])
    longest = max(len(gpt2.encode_batch([cur.view(HAND[1], k).target])[0]) + 1 + cur.n_latents(k) for k in (0, 1, 2))
    rows = StagedExamples(HAND, gpt2, cur, max_len=q1 + 2 + longest, where="hand")
    assert len(rows) == 1 and rows.too_long == 1 and "1 of 2 examples" in caplog.text
    with pytest.raises(PipelineError, match="no example fits"):
        StagedExamples(HAND, gpt2, cur, max_len=q1, where="hand")


def test_stage_per_step_and_batch_thoughts(mini):
    file, _ = mini
    task = CoconutTask(config(file, latents_per_step=3))
    task.build(BatchLayout(4, 1, 1, 0, torch.device("cpu")))  # 8 examples, global batch 4: 2 steps an epoch
    assert [task.stage_at(s) for s in range(7)] == [0, 0, 1, 1, 2, 2, 2]
    assert [task.batch(s, 0)["n_latents"] for s in (0, 2, 4, 6)] == [0, 3, 6, 6]


# ---------------------------------------------------------------------- a ZeRO-2 run, export, evaluate
class Recording(CoconutTask):
    """Records, at every step, the optimizer's moments right after the task's own before_step."""

    def before_step(self, step, engine):
        from pipeline.train.optimizer_state import torch_optimizer

        super().before_step(step, engine)
        opt = torch_optimizer(engine)
        self.moments = getattr(self, "moments", [])
        self.moments.append(sum(float(t.abs().sum()) for s in opt.state.values() for t in s.values()
                                if torch.is_tensor(t)))


def coconut_rank(out: str, train_file: str, reset: bool, ds_config: str = "zero2_cpu.json",
                 export: bool = True) -> dict:
    from pipeline.train.trainer import train

    ds = json.loads((ROOT / "ds_configs" / ds_config).read_text())
    ds |= {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1}
    ds["optimizer"]["params"]["lr"] = 3e-3
    cfg = config(Path(train_file), reset_optimizer=reset)
    cfg.train.output_dir, cfg.train.max_steps, cfg.train.eval_every, cfg.train.eval_sequences = out, 5, 0, 4
    cfg.train.export = export
    task = Recording(cfg)
    res = train(task, ds)
    return {"export": str(res.export_dir), "moments": task.moments, "resets": task.resets,
            "zero_stage": res.engine.zero_optimization_stage()}


def test_zero3_resets_the_partitioned_moments(mini, tmp_path):
    """Under ZeRO-3 the moments live in the torch optimizer inside DeepSpeed's stage-3 wrapper,
    over this rank's flat fp32 partitions; they too read zero right after each reset."""
    file, _ = mini
    (r,) = run_distributed(coconut_rank, str(tmp_path / "run"), str(file), True, "zero3.json", False, world_size=1)
    assert r["zero_stage"] == 3 and r["resets"] == [2, 4]
    assert r["moments"][2] == r["moments"][4] == 0 and r["moments"][1] > 0 and r["moments"][3] > 0


def test_zero2_run_resets_moments_at_stage_changes_and_exports_for_evaluate(mini, tmp_path):
    from pipeline.eval.models import CoconutEvalModel, load_eval_model

    file, examples = mini
    (r,) = run_distributed(coconut_rank, str(tmp_path / "run"), str(file), True, world_size=1)
    # stages 0,0,1,1,2 (2 steps an epoch): moments zero right after the reset at steps 2 and 4,
    # non-zero before every other step but the first (a fresh optimizer)
    assert r["zero_stage"] == 2 and r["resets"] == [2, 4]
    assert r["moments"][0] == 0 and r["moments"][2] == 0 and r["moments"][4] == 0
    assert r["moments"][1] > 0 and r["moments"][3] > 0

    export = Path(r["export"])
    meta = json.loads((export / "pipeline.json").read_text())
    assert meta["variant"] == "coconut" and meta["n_latents"] == 2 and meta["run_config"]["task"] == "coconut"
    assert (export / "markers.safetensors").is_file() and (export / "base" / "tokenizer.json").is_file()
    model = load_eval_model(export)
    assert isinstance(model, CoconutEvalModel) and model.describe()["n_latents"] == 2
    with pytest.raises(PipelineError, match="reasoning"):
        model.score_sites(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long), 1)

    # evaluate.py reasoning on the export: batched greedy == one example at a time, from scratch
    spec = importlib.util.spec_from_file_location("evaluate_cli", ROOT / "launchers" / "evaluate.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    dump, out = tmp_path / "dump.jsonl", tmp_path / "eval"
    rc = cli.main(["reasoning", "--task", "prosqa", "--model", str(export), "--data", str(file), "--limit", "4",
                   "--max-new-tokens", "8", "--batch-size", "4", "--dump", str(dump), "--out", str(out),
                   "--device", "cpu"])
    assert rc == 0
    result = json.loads((out / "reasoning.json").read_text())["results"][export.parent.name]
    assert result["n"] == 4 and result["model"]["variant"] == "coconut"
    tok = load_tokenizer(export / "base")
    records = [json.loads(line) for line in dump.read_text().splitlines()]
    for ex, rec in zip(examples[:4], records, strict=True):
        prompt = tok.encode_batch([ex["question"] + "\n"])[0]
        new = ref.greedy(model.coconut.lm, model.coconut.markers, prompt, 2, 8, tok.eos_id)
        text = tok.decode([t for t in new if t != tok.eos_id]).split("\n\n")[0]
        assert rec["generated"] == text


@pytest.mark.parametrize("task,c,epochs,stages", [("prosqa", 1, 5, 6), ("gsm8k", 2, 3, 3)])
def test_paper_size_presets_carry_coconuts_curricula(task, c, epochs, stages):
    from pipeline.train.configs import load_task_config

    kind, cfg = load_task_config(f"reason-{task}-coconut-gpt2-124m")
    cur = cfg.curriculum
    assert kind == "coconut" and cfg.model.preset == "gpt2-124m" and cur.reset_optimizer
    assert (cur.latents_per_step, cur.epochs_per_stage, cur.max_stage) == (c, epochs, stages)
    _, tiny = load_task_config(f"reason-{task}-coconut")
    assert (tiny.curriculum.latents_per_step, tiny.curriculum.max_stage) == (c, stages)  # tiny: same shape
    _, countdown = load_task_config("reason-countdown-coconut-gpt2-124m")
    assert countdown.curriculum.schedule == "none" and countdown.curriculum.n_latents == 8


def test_training_continues_from_a_coconut_export_with_its_markers(mini, tmp_path):
    from pipeline.coconut import CoconutLM, export_coconut
    from pipeline.models import build_model, preset

    file, _ = mini
    torch.manual_seed(0)
    lm = build_model(preset("gpt2-tiny", **TINY))
    export_coconut(CoconutLM(lm, torch.randn(2, 64)), tmp_path / "export", n_latents=2)
    cfg = config(file)
    cfg.model.path, cfg.model.overrides = str(tmp_path / "export"), {}
    task = CoconutTask(cfg)
    model = task.build(BatchLayout(4, 1, 1, 0, torch.device("cpu")))
    markers = load_file(str(tmp_path / "export" / "markers.safetensors"))
    torch.testing.assert_close(model.markers.data, torch.stack([markers["bot"], markers["eot"]]))
    torch.testing.assert_close(model.lm.lm_head.weight, lm.lm_head.weight)
