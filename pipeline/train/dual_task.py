"""Dual-model pretraining (every variant of DESIGN.md §3) as a training task.

    cfg = load_config("tiny-liu", ["data.path=runs/data"])
    result = train(DualPretraining(cfg), ds_config, resume="auto")    # or train_dual(cfg, ...)

Batches are packed `seq_len` windows of the data-prep shards in a seeded order,
with sites drawn from a generator seeded by (seed, step, micro-step, rank): both
pure functions of the step (`pipeline.train.data`), so a checkpoint needs nothing
else to continue exactly. The checkpoint meta records the data's identity
(vocabulary, EOS, tokenizer) and the hash of the frozen Base the run started
from, so export needs neither the data directory nor trust that `model.path`
still holds the same weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.config import from_dict
from pipeline.data.shards import Manifest, check_dataset, load_manifest
from pipeline.dual import DualModel, export_dual
from pipeline.errors import PipelineError
from pipeline.flops import attention_flops, causal_pairs, matmul_flops
from pipeline.models import build_model, from_pretrained, preset
from pipeline.train.config import TrainConfig
from pipeline.train.data import BatchOrder, PackedSequences, site_generator
from pipeline.train.task import BatchLayout, StepOutput, Task, register_task

log = logging.getLogger(__name__)
EVAL_STEP = 10**9  # site draws of validation batches use their own stream
METRICS = ("ahead_loss", "lm_loss", "orthogonality", "draft_loss")


@dataclasses.dataclass(frozen=True)
class DataIdentity:
    """What a model built for a dataset must agree with; recorded in every checkpoint."""

    vocab_size: int
    eos_id: int
    tokenizer: dict[str, Any]
    """data-prep's tokenizer block (kind, path, sha256, ...)."""
    path: str
    """The data directory it was read from (informational once recorded)."""

    @classmethod
    def of(cls, data_path: str, manifest: Manifest | None = None) -> DataIdentity:
        manifest = manifest or load_manifest(data_path)
        return cls(vocab_size=manifest.vocab_size, eos_id=manifest.eos_id,
                   tokenizer=manifest.to_json().get("tokenizer", {}), path=str(Path(data_path).resolve()))


def base_dir(model_path: str) -> Path:
    """`model.path` as a Hugging Face directory: an export directory stands for its base/."""
    path = Path(model_path)
    return path / "base" if (path / "base" / "config.json").is_file() else path


def weights_sha256(directory: Path) -> str:
    """One hash over a Hugging Face directory's config and weight files (names and bytes)."""
    files = sorted(p for p in directory.iterdir() if p.name == "config.json" or p.suffix == ".safetensors"
                   or p.name.endswith(".safetensors.index.json"))
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


def build_dual(cfg: TrainConfig, data: DataIdentity) -> DualModel:
    """The run's model: Base from a checkpoint or a seeded preset, wrapped for the variant."""
    torch.manual_seed(cfg.data.seed)
    if cfg.model.path:
        base = from_pretrained(base_dir(cfg.model.path))
    else:
        data_ids = {"vocab_size": data.vocab_size, "eos_token_id": data.eos_id}
        base = build_model(preset(cfg.model.preset, **(data_ids | cfg.model.overrides)))
    mc = base.config
    if cfg.model.path and mc.eos_token_id is not None and mc.eos_token_id != data.eos_id:
        # Sizes alone miss a different tokenizer of a large enough vocabulary (GPT-2 vs a small spm).
        raise PipelineError(
            f"the model at {cfg.model.path} ends documents with id {mc.eos_token_id} but the data's "
            f"tokenizer ({data.tokenizer.get('path', '?')}) uses {data.eos_id}: "
            "the data was tokenized with a different tokenizer than the model's; rebuild it with the model's")
    if data.vocab_size > mc.vocab_size:
        raise PipelineError(
            f"the data's tokenizer has {data.vocab_size} ids but the model's vocabulary is "
            f"{mc.vocab_size}: use a model whose vocabulary covers the tokenizer, or rebuild the data")
    if cfg.data.seq_len > mc.max_position_embeddings:
        raise PipelineError(f"data.seq_len={cfg.data.seq_len} exceeds the model's "
                            f"max_position_embeddings={mc.max_position_embeddings}")
    base.activation_checkpointing = cfg.model.activation_checkpointing
    return DualModel(base, cfg.dual, eos_id=data.eos_id)


def matmul_params(dual: DualModel) -> tuple[int, int]:
    """Matmul parameters of the Base and the Coprocessor (0 without one). Counted once, before
    `deepspeed.initialize`: under ZeRO-3 a partitioned parameter's `numel()` is no longer its size."""
    cop = dual.coprocessor.num_params(matmul_only=True) if dual.coprocessor is not None else 0
    return dual.base.num_params(matmul_only=True), cop


def dual_flops(dual: DualModel, input_ids: Tensor, sites: Tensor | None,
               params: tuple[int, int] | None = None) -> float:
    """Model FLOPs of one forward + backward of `dual` on a batch, counting only the work
    that runs: a frozen Base does forward only in pass 1 (nothing upstream trains) and
    forward + input gradients in pass 3 (gradients flow through it to the slots); the LM
    head only where logits are computed; attention over the pairs the masks let through
    (document masks, which see fewer, are not subtracted)."""
    cfg, spec, mc = dual.config, dual.config.spec, dual.base.config
    B, S = input_ids.shape
    head = mc.vocab_size * mc.d_model
    n_base, n_cop = params or matmul_params(dual)
    body = n_base - head
    geometry = {"n_layer": mc.n_layer, "n_head": mc.n_head, "head_dim": mc.head_dim}
    train_base = cfg.train_base
    grads = {"input_grad": train_base, "weight_grad": train_base}
    want_lm = cfg.lm_loss_weight > 0 or not spec.augments
    # pass 1: the Base over x
    flops = matmul_flops(body, B * S, **grads) + (matmul_flops(head, B * S, **grads) if want_lm else 0.0)
    flops += attention_flops(B * causal_pairs(S), backward=train_base, **geometry)
    if not spec.augments:
        return flops
    p = sites.double() + 1  # cache positions each site's slots and block see
    M = sites.shape[1]
    # pass 2: the Coprocessor over M·N_L slots (+ its own pass over x for last_hidden input)
    if dual.coprocessor is not None:
        n_l = cfg.n_latents
        cop = n_cop - head
        full = cfg.coprocessor_adapter == "full"
        cop_tokens = B * M * n_l + (B * S if cfg.coprocessor_input == "last_hidden" else 0)
        flops += matmul_flops(cop, cop_tokens, input_grad=True, weight_grad=full)
        pairs = float((n_l * p).sum()) + B * M * causal_pairs(n_l)
        if cfg.coprocessor_input == "last_hidden":
            pairs += B * causal_pairs(S)
        flops += attention_flops(int(pairs), backward=True, **geometry)
    # pass 3: one block per site over the cache; gradients always flow back to the slots
    injected = cfg.n_latents if spec.slots == "coprocessor_kv" else 0
    q_len = (cfg.n_latents - injected) + int(cfg.reread) + cfg.n_ahead - 1
    grads3 = {"input_grad": True, "weight_grad": train_base}
    flops += matmul_flops(body, B * M * q_len, **grads3) + matmul_flops(head, B * M * cfg.n_ahead, **grads3)
    pairs = float((q_len * (p + injected)).sum()) + B * M * causal_pairs(q_len)
    flops += attention_flops(int(pairs), backward=True, **geometry)
    return float(flops)


@register_task
class DualPretraining(Task):
    """Pretraining one variant of the dual model on packed data-prep shards."""

    kind = "dual_pretraining"
    config_class = TrainConfig

    def __init__(self, config: TrainConfig, *, data: DataIdentity | None = None,
                 frozen_base: dict[str, str] | None = None):
        self.config = config
        self._data = data
        self._frozen_base = frozen_base
        self.model: DualModel | None = None

    # ------------------------------------------------------------------ training
    def build(self, layout: BatchLayout) -> nn.Module:
        cfg = self.config
        if not cfg.data.path:
            raise PipelineError("data.path is not set: point it at a data-prep output directory")
        self.manifest = check_dataset(cfg.data.path, checksums=cfg.data.verify)  # before any step
        manifest = self.manifest
        self._data = DataIdentity.of(cfg.data.path, manifest)
        self.manifest_file = Path(cfg.data.path) / "manifest.json"
        self.train_data = PackedSequences(manifest, "train", cfg.data.seq_len)
        self.val_data = PackedSequences(manifest, "validation", cfg.data.seq_len)
        self.layout = layout
        self.order = BatchOrder(len(self.train_data), cfg.data.seed, layout.micro_batch, layout.accumulation,
                                layout.world)
        self.model = build_dual(cfg, self._data)
        self.params = matmul_params(self.model)
        return self.model

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """The Base's trainable parameters at `train.base_lr_scale`, everything else at 1."""
        base = {id(p) for p in model.base.parameters()}
        trainable = [p for p in model.parameters() if p.requires_grad]
        return [{"params": [p for p in trainable if id(p) in base], "lr_scale": self.config.train.base_lr_scale},
                {"params": [p for p in trainable if id(p) not in base], "lr_scale": 1.0}]

    def batch(self, step: int, micro_step: int) -> dict[str, Tensor]:
        x = self.train_data.batch(self.order.indices(step, micro_step, self.layout.rank))
        x = x.to(self.layout.device)
        sites = None
        if self.config.dual.spec.augments:
            gen = site_generator(self.config.data.seed, step, micro_step, self.layout.rank)
            sites = self.model.sample_sites(x, gen)
        return {"input_ids": x, "sites": sites}

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> StepOutput:
        out = model(batch["input_ids"], batch["sites"])
        metrics = {name: getattr(out, name).detach() for name in METRICS if getattr(out, name) is not None}
        return StepOutput(loss=out.loss, metrics=metrics)

    def flops(self, batch: dict[str, Tensor]) -> float:
        return dual_flops(self.model, batch["input_ids"], batch["sites"], self.params)

    def tokens(self, batch: dict[str, Tensor]) -> int:
        return batch["input_ids"].numel()

    @torch.no_grad()
    def validate(self, model: nn.Module) -> dict[str, float]:
        """Mean loss over the first `eval_sequences` validation sequences (same on every rank)."""
        cfg, micro = self.config, self.layout.micro_batch
        n = min(cfg.train.eval_sequences, len(self.val_data))
        losses = []
        for i, first in enumerate(range(0, n, micro)):
            x = self.val_data.batch(list(range(first, min(first + micro, n)))).to(self.layout.device)
            sites = None
            if cfg.dual.spec.augments:
                sites = self.model.sample_sites(x, site_generator(cfg.data.seed, EVAL_STEP, i, 0))
            out = model(x, sites)
            losses.append(float(out.ahead_loss if out.ahead_loss is not None else out.loss))
        return {"val_loss": sum(losses) / max(len(losses), 1)}

    def provenance(self) -> dict[str, Any]:
        return {"data": {k: v for k, v in self.manifest.to_json().items() if k != "shards"}}

    def artifacts(self) -> list[Path]:
        return [self.manifest_file]

    # ------------------------------------------------------------------ checkpoints and export
    def checkpoint_meta(self) -> dict[str, Any]:
        if self._frozen_base is None:
            self._frozen_base = {}
            if self.config.model.path:
                src = base_dir(self.config.model.path).resolve()
                self._frozen_base = {"path": str(src), "sha256": weights_sha256(src)}
        return {"data": dataclasses.asdict(self._data), "base_source": self._frozen_base}

    @classmethod
    def from_checkpoint(cls, config: dict[str, Any], meta: dict[str, Any], *, where: str) -> DualPretraining:
        cfg = from_dict(TrainConfig, config, where=where)
        data = DataIdentity(**meta["data"]) if meta.get("data") else DataIdentity.of(cfg.data.path)
        return cls(cfg, data=data, frozen_base=meta.get("base_source"))

    def export(self, state: dict[str, Tensor], out_dir: Path, *, where: str) -> None:
        cfg = self.config
        if cfg.model.path and self._frozen_base:
            self._check_frozen_base(where)  # then build from where it was found, not a relative path
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=self._frozen_base["path"]))
        dual = build_dual(cfg, self._data)
        missing, unexpected = dual.load_state_dict(state, strict=False)
        # Tied weights appear once in the checkpoint. Frozen parameters are absent from ZeRO-1
        # checkpoints' optimizer shards; they never change, so the rebuild (from model.path,
        # checked against its recorded hash, or the seeded init, exactly as at step 0) holds them.
        tied = {n for n in missing if n.endswith("lm_head.weight")}
        frozen = {n for n, p in dual.named_parameters() if not p.requires_grad}
        lost = set(missing) - tied - frozen
        if lost or unexpected:
            raise PipelineError(f"{where}: checkpoint does not match the model "
                                f"(missing {sorted(lost)[:5]}, unexpected {unexpected[:5]})")
        run_config = self.config_dict()
        run_config["data"]["path"] = self._data.path
        run_config["tokenizer"] = dict(self._data.tokenizer)
        export_dual(dual, out_dir, run_config=run_config)

    def _check_frozen_base(self, where: str) -> None:
        """The Base is rebuilt from model.path: it must still be the weights the run started from."""
        src = Path(self._frozen_base["path"])
        if not src.is_dir():
            raise PipelineError(f"{where}: the run started from the Base at {src}, which is gone; export "
                                f"rebuilds the frozen weights from it (sha256 {self._frozen_base['sha256'][:12]}…): "
                                "restore it there")
        now = weights_sha256(src)
        if now != self._frozen_base["sha256"]:
            raise PipelineError(f"{where}: the Base at {src} changed since training (sha256 "
                                f"{self._frozen_base['sha256'][:12]}… then, {now[:12]}… now); exporting would mix "
                                "the trained weights with other frozen ones: restore the original Base")
