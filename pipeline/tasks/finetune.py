"""Chain-of-thought and no-CoT fine-tuning of a plain model on a task file, as a training task.

    cfg = from_dict(ReasoningConfig, {"data": {"train_file": "prosqa-train.json", ...}})
    result = train(ReasoningSFT(cfg), ds_config)       # or: launchers/pretrain.py --config reason-prosqa-cot

The paper's reference rows (Coconut's CoT and no-CoT baselines) and the comparators of
the latent variants. Each example is one sequence (no packing):

    prompt_text(example) + target_text(example, cot) + EOS      (pipeline.tasks.format)

and the loss covers only what follows the prompt: the steps (CoT), "### answer", EOS.

Tokenization: the prompt and the target are encoded *separately* and concatenated. The
prompt's ids are then exactly those the evaluator feeds the model (`evaluate.py reasoning`
encodes `prompt_text` alone), whatever the tokenizer does at a text's end: a
sentencepiece model drops the trailing "\\n" of the prompt when it is encoded alone, and
encoding the full text would teach the model a boundary it never sees at evaluation. For
GPT-2's byte-level BPE the two ways give the same ids (the tests check both facts).

Batches are a seeded permutation of the examples per epoch, cut by global position
(`pipeline.train.data.BatchOrder`), so micro-batch (step, micro, rank) is a pure function
of those numbers and the seed: exact resume, and 2 x 2 accumulation sees what 1 x 4 does.
Micro-batches are right-padded (pad = EOS, never a target): with causal attention a real
token never sees the padding after it, so no attention mask is needed; the loss mask is the
targets' -100. Examples longer than `data.max_len` are counted and left out, with one
warning per file (never truncated: a cut example would teach an answer without its facts).

Logits are computed only at target positions (the head of a 50k vocabulary dominates a
tiny model; a ProsQA prompt is ~360 tokens and its no-CoT target ~10).

Export: the model as a plain Hugging Face directory, `export/base/` (with the tokenizer's
files copied beside its weights), and `export/pipeline.json` (the `continued_pretraining`
layout: no augmentation), so `evaluate.py reasoning --model export` loads it. Everything
export needs (model config, tokenizer identity, EOS) is in the checkpoint's meta.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.config import from_dict
from pipeline.data.tokenizer import Tokenizer, load_tokenizer, sha256_file
from pipeline.dual import DualConfig, DualModel, export_dual
from pipeline.errors import PipelineError
from pipeline.flops import attention_flops, causal_pairs, matmul_flops
from pipeline.models import CausalLM, ModelConfig, build_model, from_pretrained, preset
from pipeline.paths import shared_data_dir
from pipeline.tasks.format import prompt_text, target_text
from pipeline.tasks.schema import load_examples
from pipeline.train.config import ModelSection, TrackingSection, TrainSection
from pipeline.train.data import BatchOrder
from pipeline.train.dual_task import base_dir
from pipeline.train.task import (
    BatchLayout,
    StepOutput,
    Task,
    load_checked,
    register_task,
    require_meta,
)

log = logging.getLogger(__name__)
IGNORE = -100
"""Target value of positions without a loss (prompt, padding)."""


@dataclasses.dataclass
class ExampleData:
    """The `data:` section every task-file fine-tune shares (CoT/no-CoT, latent curriculum, Coconut)."""

    train_file: str = ""
    """Task file to train on (`python -m data_prep tasks ... --output F.json`)."""
    valid_file: str = ""
    """Task file whose loss is the validation loss (its first `train.eval_sequences` examples)."""
    tokenizer: str = ""
    """Hugging Face dir / tokenizer.json / sentencepiece .model; "" = the shared GPT-2 tokenizer."""
    max_len: int = 512
    """Longest sequence an example needs (prompt, latents or markers, target, EOS) at any stage;
    longer examples are skipped and counted."""
    seed: int = 1234
    """Seeds the example order and a fresh model's init."""

    MIN_LEN = 2

    def __post_init__(self) -> None:
        if self.max_len < self.MIN_LEN:
            raise PipelineError(f"data.max_len={self.max_len}: must be >= {self.MIN_LEN}")


@dataclasses.dataclass
class ReasoningData(ExampleData):
    cot: bool = True
    """Target = steps + "### answer" (CoT) or "### answer" alone (no-CoT)."""


def examples_meta(data: ExampleData, counts: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """What a checkpoint records of its task files: per role (train, valid) the file's path and
    sha256, the examples kept and those skipped as too long (`counts[role]`)."""
    files = {"train": data.train_file, "valid": data.valid_file}
    return {role: {**file_identity(files[role]), "examples": kept, "skipped_too_long": skipped}
            for role, (kept, skipped) in counts.items()}


@dataclasses.dataclass
class ReasoningConfig:
    """The pipeline config of a `reasoning_sft` run (a preset says `task: reasoning_sft`)."""

    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: ReasoningData = dataclasses.field(default_factory=ReasoningData)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    tracking: TrackingSection = dataclasses.field(default_factory=TrackingSection)


def tokenizer_path(cfg: ReasoningData) -> Path:
    return Path(cfg.tokenizer) if cfg.tokenizer else shared_data_dir() / "tokenizers" / "gpt2"


# ---------------------------------------------------------------------- examples as token rows
class EncodedExamples:
    """A task file tokenized once: one row per kept example, held in flat int32 arrays."""

    def __init__(self, examples: list[dict[str, Any]], tok: Tokenizer, *, cot: bool, max_len: int, where: str):
        prompts = tok.encode_batch([prompt_text(ex) for ex in examples])
        targets = tok.encode_batch([target_text(ex, cot) for ex in examples])
        rows, n_prompt, too_long = [], [], 0
        for i, (p, t) in enumerate(zip(prompts, targets, strict=True)):
            if not p:
                raise PipelineError(f"{where}: example {i}: the prompt tokenizes to nothing")
            ids = p + t + [tok.eos_id]
            if len(ids) > max_len:
                too_long += 1
                continue
            rows.append(ids)
            n_prompt.append(len(p))
        if too_long:
            log.warning("%s: %d of %d examples are longer than data.max_len=%d tokens and are skipped "
                        "(raise data.max_len, within the model's positions, to keep them)",
                        where, too_long, len(examples), max_len)
        if not rows:
            raise PipelineError(f"{where}: no example fits data.max_len={max_len} tokens")
        self.where, self.too_long, self.pad_id = where, too_long, tok.eos_id
        self.lengths = np.array([len(r) for r in rows], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)[:-1]])
        self.n_prompt = np.array(n_prompt, dtype=np.int64)
        self.tokens = np.fromiter((x for r in rows for x in r), dtype=np.int32, count=int(self.lengths.sum()))

    def __len__(self) -> int:
        return len(self.lengths)

    def row(self, i: int) -> tuple[np.ndarray, int]:
        """(ids of example i: prompt + target + EOS, number of prompt tokens)."""
        s = int(self.starts[i])
        return self.tokens[s: s + int(self.lengths[i])], int(self.n_prompt[i])

    def batch(self, indices: list[int]) -> dict[str, Tensor]:
        """Right-padded `input_ids` (B, T), `targets` (B, T): targets[b, t] is the id to predict
        at position t (the next token) where it belongs to the target side, else -100."""
        rows = [self.row(i) for i in indices]
        T = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        targets = torch.full((len(rows), T), IGNORE, dtype=torch.long)
        for b, (ids, n_prompt) in enumerate(rows):
            x = torch.from_numpy(ids.astype(np.int64))
            input_ids[b, : len(x)] = x
            targets[b, n_prompt - 1: len(x) - 1] = x[n_prompt:]  # predicts the first target token onwards
        return {"input_ids": input_ids, "targets": targets,
                "lengths": torch.from_numpy(self.lengths[indices].copy())}


class TargetLM(nn.Module):
    """A causal LM whose forward returns the target tokens' summed NLL, count and hits, computing
    logits only where a target is (what DeepSpeed wraps; the export holds `lm` alone)."""

    def __init__(self, lm: CausalLM):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h = self.lm(input_ids, return_logits=False).hidden_states  # (B, T, d)
        keep = targets != IGNORE                                     # (B, T)
        logits = self.lm.lm_head(h[keep])                            # (N, V)
        gold = targets[keep]                                         # (N,)
        nll = F.cross_entropy(logits.float(), gold, reduction="sum")
        hits = (logits.argmax(-1) == gold).sum()
        return nll, keep.sum(), hits


def build_lm(cfg: ReasoningConfig, tokenizer: dict[str, Any]) -> CausalLM:
    """A fresh seeded preset (vocabulary and EOS from the tokenizer unless overridden) or `model.path`."""
    torch.manual_seed(cfg.data.seed)
    if cfg.model.path:
        lm = from_pretrained(base_dir(cfg.model.path))
    else:
        ids = {"vocab_size": tokenizer["vocab_size"], "eos_token_id": tokenizer["eos_id"]}
        lm = build_model(preset(cfg.model.preset, **(ids | cfg.model.overrides)))
    check_model(lm.config, cfg, tokenizer)
    lm.activation_checkpointing = cfg.model.activation_checkpointing
    return lm


def check_model(mc: ModelConfig, cfg: ReasoningConfig, tokenizer: dict[str, Any]) -> None:
    where = cfg.model.path or f"model preset {cfg.model.preset}"
    if mc.eos_token_id is not None and mc.eos_token_id != tokenizer["eos_id"]:
        raise PipelineError(f"{where} ends text with id {mc.eos_token_id} but the tokenizer "
                            f"{tokenizer['path']} uses {tokenizer['eos_id']}: use the model's own tokenizer "
                            "(data.tokenizer) or set model.overrides.eos_token_id")
    if tokenizer["vocab_size"] > mc.vocab_size:
        raise PipelineError(f"the tokenizer {tokenizer['path']} has {tokenizer['vocab_size']} ids but {where} "
                            f"has a vocabulary of {mc.vocab_size}: set model.overrides.vocab_size")
    if cfg.data.max_len > mc.max_position_embeddings:
        raise PipelineError(f"data.max_len={cfg.data.max_len} exceeds the max_position_embeddings="
                            f"{mc.max_position_embeddings} of {where}; lower data.max_len or "
                            "set model.overrides.max_position_embeddings")


def file_identity(path: str) -> dict[str, Any]:
    return {"path": str(Path(path).resolve()), "sha256": sha256_file(path)}


class ExampleTask(Task):
    """What the three task-file fine-tunes (reasoning_sft, latent_sft, coconut) share: the
    task-file check, the checkpoint record (tokenizer, model config, data counts) and the
    rebuild from it. A subclass says which model config and which example counts it records."""

    tokenizer: dict[str, Any]
    _meta: dict[str, Any] | None

    @staticmethod
    def task_file(file: str, role: str) -> str:
        if not file:
            raise PipelineError(f"data.{role}_file is not set: point it at a task file "
                                "(python -m data_prep tasks {gsm8k,prosqa,countdown} --output F.json)")
        return file

    def model_config(self) -> ModelConfig:
        """The config of the model whose weights the checkpoint holds (the Base for a dual one)."""
        raise NotImplementedError

    def example_counts(self) -> dict[str, tuple[int, int]]:
        """role -> (examples kept, examples skipped as too long), from `train_rows` / `valid_rows`."""
        return {"train": (len(self.train_rows), self.train_rows.too_long),
                "valid": (len(self.valid_rows), self.valid_rows.too_long)}

    def provenance(self) -> dict[str, Any]:
        meta = self.checkpoint_meta()
        return {"data": meta["data"], "tokenizer": meta["tokenizer"]}

    def checkpoint_meta(self) -> dict[str, Any]:
        if self._meta is None:
            self._meta = {"tokenizer": self.tokenizer, "model_config": dataclasses.asdict(self.model_config()),
                          "data": examples_meta(self.config.data, self.example_counts())}
        return self._meta

    def rebuild_lm(self, state: dict[str, Tensor], where: str) -> CausalLM:
        """The checkpoint's plain LM (`state` without its module prefix), built from the recorded config."""
        lm = build_model(from_dict(ModelConfig, self._meta["model_config"], where=f"{where}: model_config"))
        load_checked(lm, state, f"{where}: checkpoint", tied=lm.config.tie_word_embeddings)
        lm.tie_weights()
        return lm

    @classmethod
    def from_checkpoint(cls, config: dict[str, Any], meta: dict[str, Any], *, where: str) -> ExampleTask:
        require_meta(meta, {"tokenizer", "model_config"}, where)
        return cls(from_dict(cls.config_class, config, where=where), meta=meta)


@register_task
class ReasoningSFT(ExampleTask):
    """Supervised fine-tuning on question -> (steps ->) "### answer", loss on the target side only."""

    kind = "reasoning_sft"
    config_class = ReasoningConfig

    def __init__(self, config: ReasoningConfig, *, meta: dict[str, Any] | None = None):
        self.config = config
        self._meta = meta
        self.lm: CausalLM | None = None

    # ------------------------------------------------------------------ data
    def encode(self, file: str, role: str, tok: Tokenizer) -> EncodedExamples:
        d = self.config.data
        return EncodedExamples(load_examples(self.task_file(file, role)), tok, cot=d.cot, max_len=d.max_len,
                               where=file)

    # ------------------------------------------------------------------ training
    def build(self, layout: BatchLayout) -> nn.Module:
        d = self.config.data
        tok = load_tokenizer(tokenizer_path(d))
        self.tokenizer = tok.identity()
        self.train_rows = self.encode(d.train_file, "train", tok)
        self.valid_rows = self.encode(d.valid_file, "valid", tok)
        self.layout = layout
        self.order = BatchOrder(len(self.train_rows), d.seed, layout.micro_batch, layout.accumulation, layout.world)
        self.lm = build_lm(self.config, self.tokenizer)
        self.n_matmul = self.lm.num_params(matmul_only=True)
        return TargetLM(self.lm)

    def batch(self, step: int, micro_step: int) -> dict[str, Tensor]:
        indices = self.order.indices(step, micro_step, self.layout.rank)
        return {k: v.to(self.layout.device) for k, v in self.train_rows.batch(indices).items()}

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> StepOutput:
        nll, n, hits = model(batch["input_ids"], batch["targets"])
        n = n.clamp(min=1)
        return StepOutput(loss=nll / n, metrics={"token_acc": hits.float() / n})

    def flops(self, batch: dict[str, Tensor]) -> float:
        """Forward + backward of the real (unpadded) tokens through the body, of the target
        positions through the head, and causal attention within each row."""
        mc = self.lm.config
        head = mc.vocab_size * mc.d_model
        body = self.n_matmul - head  # counted in build, before ZeRO-3 could partition the weights
        train = {"input_grad": True, "weight_grad": True}
        lengths = batch["lengths"].tolist()
        n_targets = int((batch["targets"] != IGNORE).sum())
        pairs = sum(causal_pairs(n) for n in lengths)
        return (matmul_flops(body, sum(lengths), **train) + matmul_flops(head, n_targets, **train)
                + attention_flops(pairs, n_layer=mc.n_layer, n_head=mc.n_head, head_dim=mc.head_dim, backward=True))

    def tokens(self, batch: dict[str, Tensor]) -> int:
        return int(batch["lengths"].sum())

    @torch.no_grad()
    def validate(self, model: nn.Module) -> dict[str, float]:
        """Token-mean target loss (and next-token accuracy) over the first `train.eval_sequences`
        examples of the valid file; the same on every rank."""
        n = min(self.config.train.eval_sequences, len(self.valid_rows))
        micro = self.layout.micro_batch
        nll = count = hits = 0.0
        for first in range(0, n, micro):
            b = self.valid_rows.batch(list(range(first, min(first + micro, n))))
            s, c, h = model(b["input_ids"].to(self.layout.device), b["targets"].to(self.layout.device))
            nll, count, hits = nll + float(s), count + float(c), hits + float(h)
        return {"val_loss": nll / max(count, 1.0), "val_token_acc": hits / max(count, 1.0)}

    # ------------------------------------------------------------------ checkpoints and export
    def model_config(self) -> ModelConfig:
        return self.lm.config

    def export(self, state: dict[str, Tensor], out_dir: Path, *, where: str) -> None:
        meta = self._meta
        lm = self.rebuild_lm({k.removeprefix("lm."): v for k, v in state.items()}, where)
        run_config = {**self.config_dict(), "task": self.kind, "tokenizer": meta["tokenizer"]}
        plain = DualModel(lm, DualConfig(variant="continued_pretraining", n_sites=1),
                          eos_id=meta["tokenizer"]["eos_id"])
        export_dual(plain, out_dir, run_config=run_config)
        copy_tokenizer(meta["tokenizer"], out_dir / "base")


def copy_tokenizer(identity: dict[str, Any], dest: Path) -> list[Path]:
    """Copy the tokenizer's files (checked against their recorded sha256) into `dest`, so the
    export carries its tokenizer; with a file gone or changed, warn and copy nothing."""
    src = Path(identity["path"])
    files = identity.get("files", {})
    sources = {name: (src / name if src.is_dir() else src) for name in files}
    bad = [name for name, p in sources.items() if not p.is_file() or sha256_file(p) != files[name]]
    if bad or not files:
        log.warning("tokenizer %s is gone or changed (%s): the export has no tokenizer files; "
                    "give evaluate.py --tokenizer", src, ", ".join(bad) or "no files recorded")
        return []
    return [Path(shutil.copyfile(p, dest / name)) for name, p in sources.items()]
