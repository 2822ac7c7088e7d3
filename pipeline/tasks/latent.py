"""Latent curriculum fine-tuning of a dual model (liu, h1, h2, soft_embedding, pause) on a task file.

    cfg = from_dict(LatentConfig, {"dual": {"variant": "h2"}, "data": {...}, "curriculum": {...}})
    result = train(LatentSFT(cfg), ds_config)      # or: launchers/pretrain.py --config reason-prosqa-h2

Paper `000` §4.2 / App. B and DESIGN.md §5: each example is one augmentation site of the
three-pass schedule (DESIGN.md §3), at the question's last token p (its newline; no
marker tokens). At curriculum stage k the first k steps are removed (`Curriculum.view`),
N_L = k·c slots are filled at p (Coprocessor output, its K/V for h1, soft or pause
embeddings), and the *rest of the example* (remaining steps, "### answer", EOS) is
that site's ahead tokens: a different number per example, padded to the batch's longest
and masked, never truncated. The loss is the token mean over those ahead tokens only.

A micro-batch is one call of the packed model with M = 1 site per row:

    input_ids  (B, T)   prompt + remaining target + EOS, right-padded with EOS (+1 column,
                        so the last target of the longest row is inside the sequence)
    sites      (B, 1)   len(prompt) - 1
    ahead_mask (B, A)   which of the A = longest (target + EOS) ahead positions are real

Pass 1 runs the Base over whole rows, but a site's slots and block see the cache only up
to p (the packed schedule's masks), so the answer never leaks into its own latents. One
Coprocessor pass per batch, whatever N_L. Stage 0 (no latents; only when the Base trains)
is the plain fine-tune of the Base on the full chain of thought.

Tokenization: prompt and target are encoded separately and concatenated (as in
`pipeline.tasks.finetune`): the prompt's ids are exactly what evaluation augments after.

Exported as a dual model whose `n_latents` is the final stage's count, so
`evaluate.py reasoning --model export` augments each question's end with it and decodes.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.config import from_dict
from pipeline.data.tokenizer import Tokenizer, load_tokenizer
from pipeline.dual import DualConfig, DualModel, export_dual
from pipeline.errors import PipelineError
from pipeline.models import CausalLM, ModelConfig, build_model
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
from pipeline.train.dual_task import dual_flops, matmul_params
from pipeline.train.optimizer_state import reset_optimizer_moments
from pipeline.train.task import (
    BatchLayout,
    StepOutput,
    load_checked,
    register_task,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass
class LatentConfig:
    """The pipeline config of a `latent_sft` run (a preset says `task: latent_sft`).

    `dual.n_latents`, `n_ahead` and `n_sites` are set by the task (the curriculum's final
    count, the examples' lengths, one site per example); the curriculum decides which steps
    remain."""

    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: ExampleData = dataclasses.field(default_factory=ExampleData)
    dual: DualConfig = dataclasses.field(default_factory=lambda: DualConfig(variant="h2"))
    curriculum: CurriculumConfig = dataclasses.field(default_factory=CurriculumConfig)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    tracking: TrackingSection = dataclasses.field(default_factory=TrackingSection)

    def __post_init__(self) -> None:
        if not self.dual.spec.augments:
            raise PipelineError(f"dual.variant={self.dual.variant!r} has no latents; for a plain fine-tune "
                                "use task: reasoning_sft (a -cot or -nocot preset)")
        for name in ("orthogonality_weight", "lm_loss_weight", "draft_loss_weight"):
            if getattr(self.dual, name) > 0:  # the curriculum's loss is the remaining text only
                raise PipelineError(f"dual.{name} is a loss term of dual pretraining; task latent_sft does not "
                                    "apply it (leave it at 0)")


def curriculum_of(cfg: LatentConfig) -> Curriculum:
    return Curriculum(cfg.curriculum, stage_zero_trains=cfg.dual.train_base)


# ---------------------------------------------------------------------- examples per stage
class StageExamples:
    """A task file tokenized for one curriculum stage: prompt ids and target ids (+ EOS) per example."""

    def __init__(self, examples: list[dict[str, Any]], tok: Tokenizer, cur: Curriculum, stage: int):
        views = [cur.view(ex, stage) for ex in examples]
        self.stage, self.n_latents, self.pad_id = stage, cur.n_latents(stage), tok.eos_id
        self.prompts = tok.encode_batch([v.prompt for v in views])
        self.targets = [t + [tok.eos_id] for t in tok.encode_batch([v.target for v in views])]

    def length(self, i: int, reread: bool) -> int:
        """Positions example i uses: prompt, latents, (re-read x[p]), target + EOS."""
        return len(self.prompts[i]) + self.n_latents + int(reread) + len(self.targets[i])

    def batch(self, indices: list[int]) -> dict[str, Tensor]:
        prompts = [self.prompts[i] for i in indices]
        targets = [self.targets[i] for i in indices]
        A = max(len(t) for t in targets)
        T = max(len(p) for p in prompts) + A + 1
        input_ids = torch.full((len(indices), T), self.pad_id, dtype=torch.long)
        ahead_mask = torch.zeros(len(indices), A, dtype=torch.bool)
        for b, (p, t) in enumerate(zip(prompts, targets, strict=True)):
            input_ids[b, : len(p) + len(t)] = torch.tensor(p + t)
            ahead_mask[b, : len(t)] = True
        sites = torch.tensor([[len(p) - 1] for p in prompts])
        lengths = torch.tensor([len(p) + len(t) for p, t in zip(prompts, targets, strict=True)])
        return {"input_ids": input_ids, "sites": sites, "ahead_mask": ahead_mask, "lengths": lengths,
                "n_latents": self.n_latents}


class LatentSFTModel(nn.Module):
    """What DeepSpeed wraps: the dual model, returning a batch's summed target NLL, count and hits."""

    def __init__(self, dual: DualModel):
        super().__init__()
        self.dual = dual

    def forward(self, input_ids: Tensor, sites: Tensor, ahead_mask: Tensor, n_latents: int
                ) -> tuple[Tensor, Tensor, Tensor]:
        dual, A = self.dual, ahead_mask.shape[1]
        gold = input_ids.gather(1, sites + 1 + torch.arange(A, device=sites.device))  # (B, A)
        if n_latents == 0:  # stage 0: the Base reads the whole example; outputs at p .. p+A-1 predict
            h = dual.base(input_ids, return_logits=False).hidden_states
            pos = sites + torch.arange(A, device=sites.device)
            h = h.gather(1, pos.unsqueeze(-1).expand(-1, -1, h.shape[-1]))  # (B, A, d)
            # The Coprocessor and slots get no gradient here; a zero term keeps every trainable
            # parameter in the graph, so DeepSpeed's gradient hooks see the usual set.
            idle = [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("dual.base.")]
            h = h + sum((p.sum() * 0.0 for p in idle), h.new_zeros(()))
        else:
            with dual.with_config(n_latents=n_latents, n_ahead=A, n_sites=1):
                out = dual.base(input_ids, return_kv=True, return_logits=False)
                latents, extra_kv = dual.slot_contents(sites, out.kv, out.hidden_states)
                h = dual.decode_hidden(input_ids, sites, A, out.kv, latents, extra_kv)[:, 0]  # (B, A, d)
        logits = dual.base.lm_head(h[ahead_mask])  # (N, V): only the real targets
        target = gold[ahead_mask]
        nll = F.cross_entropy(logits.float(), target, reduction="sum")
        return nll, ahead_mask.sum(), (logits.argmax(-1) == target).sum()


def build_latent_dual(cfg: LatentConfig, tokenizer: dict[str, Any], n_latents: int) -> DualModel:
    """Base (from `model.path` or a seeded preset, checked against the tokenizer) + the variant."""
    lm: CausalLM = build_lm(cfg, tokenizer)  # type: ignore[arg-type]  # reads model/data sections only
    dual_cfg = dataclasses.replace(cfg.dual, n_latents=n_latents, n_ahead=1, n_sites=1)
    torch.manual_seed(cfg.data.seed + 1)  # the slots' and a scratch Coprocessor's init
    return DualModel(lm, dual_cfg, eos_id=tokenizer["eos_id"])


@register_task
class LatentSFT(ExampleTask):
    """Curriculum fine-tuning of a dual variant: latents at the question's end, loss on what remains."""

    kind = "latent_sft"
    config_class = LatentConfig

    def __init__(self, config: LatentConfig, *, meta: dict[str, Any] | None = None):
        self.config = config
        self.curriculum = curriculum_of(config)
        self._meta = meta
        self._stages: dict[tuple[str, int], StageExamples] = {}
        self.stage = self.curriculum.first

    # ------------------------------------------------------------------ data
    def _load(self, file: str, role: str) -> tuple[list[dict[str, Any]], int]:
        """The examples of `file` that fit `data.max_len` at every stage (others counted, warned)."""
        examples = load_examples(self.task_file(file, role))
        reread, limit = self.dual_config.reread, self.config.data.max_len
        longest = np.zeros(len(examples), dtype=np.int64)
        for stage in range(self.curriculum.first, self.curriculum.last + 1):
            rows = StageExamples(examples, self.tok, self.curriculum, stage)
            longest = np.maximum(longest, [rows.length(i, reread) for i in range(len(examples))])
        keep = [ex for ex, n in zip(examples, longest, strict=True) if n <= limit]
        if len(keep) < len(examples):
            log.warning("%s: %d of %d examples need more than data.max_len=%d positions at some stage "
                        "(prompt + latents + remaining text) and are skipped", file,
                        len(examples) - len(keep), len(examples), limit)
        if not keep:
            raise PipelineError(f"{file}: no example fits data.max_len={limit} positions")
        return keep, len(examples) - len(keep)

    def rows(self, role: str, stage: int) -> StageExamples:
        key = (role, stage)
        if key not in self._stages:
            self._stages = {k: v for k, v in self._stages.items() if k[0] != role}  # one stage per role held
            self._stages[key] = StageExamples(self.examples[role], self.tok, self.curriculum, stage)
        return self._stages[key]

    @property
    def dual_config(self) -> DualConfig:
        return dataclasses.replace(self.config.dual, n_latents=max(self.curriculum.final_latents, 1))

    # ------------------------------------------------------------------ training
    def build(self, layout: BatchLayout) -> nn.Module:
        d = self.config.data
        self.tok = load_tokenizer(tokenizer_path(d))
        self.tokenizer = self.tok.identity()
        self.examples, self.skipped = {}, {}
        for role, file in (("train", d.train_file), ("valid", d.valid_file)):
            self.examples[role], self.skipped[role] = self._load(file, role)
        self.layout = layout
        n = len(self.examples["train"])
        self.order = BatchOrder(n, d.seed, layout.micro_batch, layout.accumulation, layout.world)
        self.dual = build_latent_dual(self.config, self.tokenizer, self.curriculum.final_latents)
        if self.dual.base.config.max_position_embeddings < d.max_len:
            raise PipelineError(f"data.max_len={d.max_len} exceeds the model's max_position_embeddings="
                                f"{self.dual.base.config.max_position_embeddings}")
        self.params = matmul_params(self.dual)
        log.info("latent curriculum: %s; %d train examples (%d epochs of %d steps per stage)",
                 self.curriculum.describe(), n, self.config.curriculum.epochs_per_stage,
                 -(-n // self.order.global_batch))
        return LatentSFTModel(self.dual)

    def stage_at(self, step: int) -> int:
        return self.curriculum.stage_at_step(step, self.order.global_batch, len(self.examples["train"]))

    def before_step(self, step: int, engine: Any) -> None:
        """Follow the curriculum; at a stage change, reset the optimizer's moments if configured
        (a pure function of the step, so a run resumed at a stage's first step resets too)."""
        stage = self.stage_at(step)
        if step == 0 or stage != self.stage_at(step - 1):
            log.info("step %d: curriculum stage %d (%d latents)", step, stage, self.curriculum.n_latents(stage))
            if step > 0 and self.config.curriculum.reset_optimizer:
                n = reset_optimizer_moments(engine)
                log.info("optimizer moments reset for stage %d (%d parameter states cleared)", stage, n)
        self.stage = stage

    def batch(self, step: int, micro_step: int) -> dict[str, Any]:
        indices = self.order.indices(step, micro_step, self.layout.rank)
        b = self.rows("train", self.stage_at(step)).batch(indices)
        return {k: v.to(self.layout.device) if isinstance(v, Tensor) else v for k, v in b.items()}

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> StepOutput:
        nll, n, hits = model(batch["input_ids"], batch["sites"], batch["ahead_mask"], batch["n_latents"])
        n = n.clamp(min=1)
        return StepOutput(loss=nll / n, metrics={"token_acc": hits.float() / n,
                                                 "stage": torch.tensor(float(self.stage_of(batch)))})

    def stage_of(self, batch: dict[str, Any]) -> int:
        c = self.curriculum
        return c.last if c.config.schedule == "none" else batch["n_latents"] // c.config.latents_per_step

    def flops(self, batch: dict[str, Any]) -> float:
        """The three passes at this batch's N_L and longest target, rows counted padded (the
        packed schedule runs them padded); stage 0 as dual pretraining's no-latent row."""
        n_l, A = batch["n_latents"], batch["ahead_mask"].shape[1]
        if n_l == 0:
            with self.dual.with_config(variant="continued_pretraining"):
                return dual_flops(self.dual, batch["input_ids"], None, self.params)
        with self.dual.with_config(n_latents=n_l, n_ahead=A, n_sites=1):
            return dual_flops(self.dual, batch["input_ids"], batch["sites"], self.params)

    def tokens(self, batch: dict[str, Any]) -> int:
        return int(batch["lengths"].sum())

    @torch.no_grad()
    def validate(self, model: nn.Module) -> dict[str, float]:
        """Target loss (token mean) over the first `train.eval_sequences` valid examples at the
        final stage (what evaluation measures) and, when different, at the current stage."""
        out = self._valid_loss(model, self.curriculum.last, "val")
        if self.stage != self.curriculum.last:
            out |= self._valid_loss(model, self.stage, "val_stage")
        return out

    def _valid_loss(self, model: nn.Module, stage: int, name: str) -> dict[str, float]:
        rows = self.rows("valid", stage)
        n = min(self.config.train.eval_sequences, len(self.examples["valid"]))
        nll = count = hits = 0.0
        for first in range(0, n, self.layout.micro_batch):
            b = rows.batch(list(range(first, min(first + self.layout.micro_batch, n))))
            s, c, h = model(b["input_ids"].to(self.layout.device), b["sites"].to(self.layout.device),
                            b["ahead_mask"].to(self.layout.device), b["n_latents"])
            nll, count, hits = nll + float(s), count + float(c), hits + float(h)
        return {f"{name}_loss": nll / max(count, 1.0), f"{name}_token_acc": hits / max(count, 1.0)}

    def provenance(self) -> dict[str, Any]:
        return {**super().provenance(), "curriculum": self.curriculum.describe()}

    # ------------------------------------------------------------------ checkpoints and export
    def model_config(self) -> ModelConfig:
        return self.dual.base.config

    def example_counts(self) -> dict[str, tuple[int, int]]:
        return {role: (len(self.examples[role]), self.skipped[role]) for role in ("train", "valid")}

    def export(self, state: dict[str, Tensor], out_dir: Path, *, where: str) -> None:
        """The dual model at the final stage's latent count, with the tokenizer beside its Base."""
        meta = self._meta
        mc = from_dict(ModelConfig, meta["model_config"], where=f"{where}: model_config")
        torch.manual_seed(0)
        dual = DualModel(build_model(mc), self.dual_config, eos_id=meta["tokenizer"]["eos_id"])
        state = {k.removeprefix("dual."): v for k, v in state.items()}
        load_checked(dual, state, f"{where}: checkpoint", tied=dual.base.config.tie_word_embeddings)
        dual.base.tie_weights()
        if dual.coprocessor is not None:
            dual.coprocessor.tie_weights()
        run_config = {**self.config_dict(), "task": self.kind, "tokenizer": meta["tokenizer"],
                      "curriculum": self.curriculum.describe()}
        export_dual(dual, out_dir, run_config=run_config)
        copy_tokenizer(meta["tokenizer"], out_dir / "base")
