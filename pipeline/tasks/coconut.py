"""Coconut fine-tuning with the latent curriculum, as a training task (`task: coconut`).

    cfg = from_dict(CoconutConfig, {"data": {...}, "curriculum": {"latents_per_step": 1, ...}})
    result = train(CoconutTask(cfg), ds_config)   # or: launchers/pretrain.py --config reason-prosqa-coconut

One model (`pipeline.coconut.CoconutLM`). At curriculum stage k an example is read as
question, `<bot>`, k·c continuous thoughts, `<eot>`, the remaining steps, "### answer",
EOS (`pipeline.tasks.curriculum`); the loss is the token mean over what follows `<eot>`.

Tokenization follows `reasoning_sft`: the prompt (question + newline) is encoded alone, so
its ids are exactly what `evaluate.py reasoning` feeds; each stage's remaining text is
encoded alone too. Every stage of every example is encoded once at build; an example is
kept only if it fits `data.max_len` (question + 2 markers + thoughts + rest + EOS) at every
stage it can be trained at, so the example set, and with it the batch order, is the same
at every stage (dropped ones are counted, with one warning per file).

Stage of a step: `Curriculum.stage_at_step` (the epoch of the step's first example), so all
micro-batches and ranks of a step share a stage and a resumed run lands on the same one.
With `curriculum.reset_optimizer` the optimizer's moments are zeroed at the first step of
each new stage (`before_step`; `pipeline.train.optimizer_state`). Validation runs at the
current stage.

`model.path` may be a Hugging Face directory or an export (its `base/`): a CoT fine-tune,
as Coconut starts GSM8K from one (then `curriculum.first_stage: 1`), or a coconut export,
whose <bot>/<eot> embeddings are then kept as well.

Export: `pipeline.coconut.export` (variant `coconut`, `base/` with the tokenizer's files,
the marker embeddings, and the final stage's thought count, which evaluation uses).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from pipeline.coconut import CoconutLM, export_coconut
from pipeline.coconut.export import MARKERS_FILE
from pipeline.data.tokenizer import Tokenizer, load_tokenizer
from pipeline.errors import PipelineError
from pipeline.flops import attention_flops, causal_pairs, matmul_flops
from pipeline.models import ModelConfig
from pipeline.models.generate import right_pad
from pipeline.tasks.curriculum import Curriculum, CurriculumConfig
from pipeline.tasks.finetune import (
    ExampleData,
    ExampleTask,
    build_lm,
    copy_tokenizer,
    tokenizer_path,
)
from pipeline.tasks.schema import load_examples
from pipeline.train.config import ModelSection, TrackingSection, TrainSection
from pipeline.train.data import BatchOrder
from pipeline.train.optimizer_state import reset_optimizer_moments
from pipeline.train.task import (
    BatchLayout,
    StepOutput,
    register_task,
)

log = logging.getLogger(__name__)
MARKERS = 2
"""<bot> and <eot>: input slots of every example beside its tokens and thoughts."""


@dataclasses.dataclass
class CoconutData(ExampleData):
    """`data:` of a Coconut run; max_len counts question + <bot> + thoughts + <eot> + rest + EOS."""

    MIN_LEN = 4


@dataclasses.dataclass
class CoconutConfig:
    """The pipeline config of a `coconut` run (a preset says `task: coconut`)."""

    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: CoconutData = dataclasses.field(default_factory=CoconutData)
    curriculum: CurriculumConfig = dataclasses.field(default_factory=CurriculumConfig)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    tracking: TrackingSection = dataclasses.field(default_factory=TrackingSection)


class StagedExamples:
    """A task file tokenized once per stage: the prompts, and each stage's remaining text + EOS."""

    def __init__(self, examples: list[dict[str, Any]], tok: Tokenizer, cur: Curriculum, *, max_len: int, where: str):
        stages = range(cur.first, cur.last + 1)
        prompts = tok.encode_batch([cur.view(ex, cur.first).prompt for ex in examples])
        rests = {k: [r + [tok.eos_id] for r in tok.encode_batch([cur.view(ex, k).target for ex in examples])]
                 for k in stages}
        keep = []
        for i, p in enumerate(prompts):
            if not p:
                raise PipelineError(f"{where}: example {i}: the prompt tokenizes to nothing")
            if all(len(p) + MARKERS + cur.n_latents(k) + len(rests[k][i]) <= max_len for k in stages):
                keep.append(i)
        self.where, self.too_long = where, len(examples) - len(keep)
        if self.too_long:
            log.warning("%s: %d of %d examples are longer than data.max_len=%d at some curriculum stage and are "
                        "skipped (raise data.max_len, within the model's positions, to keep them)",
                        where, self.too_long, len(examples), max_len)
        if not keep:
            raise PipelineError(f"{where}: no example fits data.max_len={max_len} at every curriculum stage")
        self.prompts = [np.array(prompts[i], dtype=np.int64) for i in keep]
        self.rests = {k: [np.array(r[i], dtype=np.int64) for i in keep] for k, r in rests.items()}
        self.cur = cur

    def __len__(self) -> int:
        return len(self.prompts)

    def batch(self, indices: list[int], stage: int) -> dict[str, Any]:
        """Right-padded questions and rests with their lengths, and the stage's thought count."""
        question, q_len = right_pad([self.prompts[i] for i in indices])
        rest, rest_len = right_pad([self.rests[stage][i] for i in indices])
        return {"question": question, "q_len": q_len, "rest": rest, "rest_len": rest_len,
                "n_latents": self.cur.n_latents(stage), "stage": stage}


@register_task
class CoconutTask(ExampleTask):
    """Coconut: question -> <bot> -> k·c continuous thoughts -> <eot> -> remaining text, staged."""

    kind = "coconut"
    config_class = CoconutConfig

    def __init__(self, config: CoconutConfig, *, meta: dict[str, Any] | None = None):
        self.config = config
        self._meta = meta
        self.curriculum = Curriculum(config.curriculum, stage_zero_trains=True)
        self.model: CoconutLM | None = None
        self.stage = self.curriculum.first
        self.resets: list[int] = []
        """Steps at which the optimizer's moments were reset (on this rank)."""

    # ------------------------------------------------------------------ data
    def encode(self, file: str, role: str, tok: Tokenizer) -> StagedExamples:
        return StagedExamples(load_examples(self.task_file(file, role)), tok, self.curriculum,
                              max_len=self.config.data.max_len, where=file)

    def stage_at(self, step: int) -> int:
        return self.curriculum.stage_at_step(step, self.layout.global_batch, len(self.train_rows))

    # ------------------------------------------------------------------ training
    def build(self, layout: BatchLayout) -> nn.Module:
        d = self.config.data
        tok = load_tokenizer(tokenizer_path(d))
        self.tokenizer = tok.identity()
        self.train_rows = self.encode(d.train_file, "train", tok)
        self.valid_rows = self.encode(d.valid_file, "valid", tok)
        self.layout = layout
        self.order = BatchOrder(len(self.train_rows), d.seed, layout.micro_batch, layout.accumulation, layout.world)
        self.model = CoconutLM(build_lm(self.config, self.tokenizer), self.start_markers())
        self.n_matmul = self.model.lm.num_params(matmul_only=True)
        log.info("coconut curriculum: %s", self.curriculum.describe())
        return self.model

    def start_markers(self) -> Tensor | None:
        """The <bot>/<eot> rows of a coconut export that `model.path` names (training continues
        from it), else None: fresh markers, a copy of EOS's embedding."""
        path = self.config.model.path
        if path and (Path(path) / MARKERS_FILE).is_file():
            tensors = load_file(str(Path(path) / MARKERS_FILE))
            log.info("markers from %s", path)
            return torch.stack([tensors["bot"], tensors["eot"]])
        return None

    def before_step(self, step: int, engine: Any) -> None:
        stage = self.stage_at(step)
        if self.config.curriculum.reset_optimizer and step > 0 and stage != self.stage_at(step - 1):
            n = reset_optimizer_moments(engine)
            self.resets.append(step)
            log.info("step %d: curriculum stage %d (%d thoughts); optimizer moments of %d parameter groups reset",
                     step, stage, self.curriculum.n_latents(stage), n)
        self.stage = stage

    def batch(self, step: int, micro_step: int) -> dict[str, Any]:
        indices = self.order.indices(step, micro_step, self.layout.rank)
        b = self.train_rows.batch(indices, self.stage_at(step))
        return {k: v.to(self.layout.device) if torch.is_tensor(v) else v for k, v in b.items()}

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> StepOutput:
        nll, n, hits = model(batch["question"], batch["q_len"], batch["rest"], batch["rest_len"], batch["n_latents"])
        n = n.clamp(min=1)
        return StepOutput(loss=nll / n, metrics={"token_acc": hits.float() / n, "stage": float(batch["stage"])})

    def flops(self, batch: dict[str, Any]) -> float:
        """Forward + backward of every fed input (question, markers, thoughts, rest but its EOS)
        through the body, of the targets through the head, and causal attention over each row."""
        mc = self.model.lm.config
        head = mc.vocab_size * mc.d_model
        body = self.n_matmul - head  # counted in build, before ZeRO-3 could partition the weights
        train = {"input_grad": True, "weight_grad": True}
        fed = (batch["q_len"] + MARKERS + batch["n_latents"] + batch["rest_len"] - 1).tolist()
        n_targets = int(batch["rest_len"].sum())
        return (matmul_flops(body, sum(fed), **train) + matmul_flops(head, n_targets, **train)
                + attention_flops(sum(causal_pairs(n) for n in fed), n_layer=mc.n_layer, n_head=mc.n_head,
                                  head_dim=mc.head_dim, backward=True))

    def tokens(self, batch: dict[str, Any]) -> int:
        return int((batch["q_len"] + MARKERS + batch["n_latents"] + batch["rest_len"]).sum())

    @torch.no_grad()
    def validate(self, model: nn.Module) -> dict[str, float]:
        """Token-mean loss (and next-token accuracy) of the answer side over the first
        `train.eval_sequences` valid examples, at the current stage; the same on every rank."""
        n = min(self.config.train.eval_sequences, len(self.valid_rows))
        micro = self.layout.micro_batch
        nll = count = hits = 0.0
        for first in range(0, n, micro):
            b = self.valid_rows.batch(list(range(first, min(first + micro, n))), self.stage)
            dev = self.layout.device
            s, c, h = model(b["question"].to(dev), b["q_len"].to(dev), b["rest"].to(dev), b["rest_len"].to(dev),
                            b["n_latents"])
            nll, count, hits = nll + float(s), count + float(c), hits + float(h)
        return {"val_loss": nll / max(count, 1.0), "val_token_acc": hits / max(count, 1.0),
                "val_stage": float(self.stage)}

    def provenance(self) -> dict[str, Any]:
        return {**super().provenance(), "curriculum": self.curriculum.describe()}

    # ------------------------------------------------------------------ checkpoints and export
    def model_config(self) -> ModelConfig:
        return self.model.lm.config

    def export(self, state: dict[str, Tensor], out_dir: Path, *, where: str) -> None:
        meta = self._meta
        if "markers" not in state:
            raise PipelineError(f"{where}: checkpoint has no 'markers' (the <bot>/<eot> embeddings)")
        lm = self.rebuild_lm({k.removeprefix("lm."): v for k, v in state.items() if k != "markers"}, where)
        model = CoconutLM(lm, state["markers"])
        c = self.config.curriculum
        run_config = {**self.config_dict(), "task": self.kind, "tokenizer": meta["tokenizer"]}
        export_coconut(model, out_dir, n_latents=self.curriculum.final_latents, run_config=run_config,
                       extra={"latents_per_step": c.latents_per_step, "schedule": c.schedule,
                              "max_stage": self.curriculum.last})
        copy_tokenizer(meta["tokenizer"], out_dir / "base")
