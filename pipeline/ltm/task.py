"""Latent Thought Model pretraining (paper 003 Algorithm 1) as a training task.

    task = load_task("ltm-tiny", ["data.path=runs/data"])     # a preset with `task: ltm`
    result = train(task, ds_config)                             # the generic DeepSpeed loop

One micro-batch: packed `seq_len` windows of the data-prep shards (the same order as dual
pretraining, `pipeline.train.data`), then `pipeline.ltm.inference.ltm_objective`: T_fast
Adam steps on every sequence's own (mu, logvar) (fast learning, nothing else moves), then
the batch's negative ELBO per token at the final posteriors, which the loop back-propagates
into the decoder and DeepSpeed steps (slow learning: AdamW, cosine, from ds_config). The
noise of every inner step is a function of (seed, step, micro-step, rank, row), so a resumed
run redraws it exactly.

Logged per step (MLflow and metrics.jsonl): `loss` (= -ELBO per token), `recon_nll` and
`kl` per token, `elbo` per token (metrics are averaged over micro-batches and ranks, so the
step's ppl bound is exp(loss); validation logs `val_ppl_bound`), the inner loop's
`inner_elbo_first` / `inner_elbo_last` per token (inference working = last > first),
`trflops_per_token` by paper 003 §2.4's count, besides the loop's tokens/s and TFLOP/s
(from `flops`, which counts what runs: the inner backward passes need no weight gradients).

Export: `model.safetensors` (the decoder; tied head stored once), `config.json` (the model
config) and `pipeline.json` (kind "ltm", the run config, inference settings, tokenizer and
data identity) -- loaded by `pipeline.ltm.export.load_ltm` and `evaluate.py ltm-ppl`.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.config import from_dict
from pipeline.data.shards import load_manifest
from pipeline.errors import PipelineError
from pipeline.flops import attention_flops, matmul_flops
from pipeline.ltm.export import save_ltm
from pipeline.ltm.inference import InferenceConfig, draw_noise, ltm_objective, sequence_seeds
from pipeline.ltm.model import LTMDecoder, LTMModelConfig, ltm_preset
from pipeline.train.config import DataSection, TrackingSection, TrainSection
from pipeline.train.data import BatchOrder, PackedSequences
from pipeline.train.dual_task import DataIdentity
from pipeline.train.task import BatchLayout, StepOutput, Task, load_checked, register_task

log = logging.getLogger(__name__)
EVAL_STEP = 10**9  # validation noise comes from its own seed stream


@dataclasses.dataclass
class LTMModelSection:
    preset: str = "ltm-tiny"
    """LTM model preset (pipeline.ltm.model.PRESETS: ltm-tiny, ltm-small, ltm-medium)."""
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    """LTMModelConfig fields to change (vocab_size and eos_token_id follow the data)."""

    def __post_init__(self) -> None:
        try:
            ltm_preset(self.preset, **self.overrides)
        except PipelineError as exc:
            raise PipelineError(f"model: {exc}") from None


@dataclasses.dataclass
class LTMConfig:
    """The pipeline config of an `ltm` run (a preset says `task: ltm`)."""

    model: LTMModelSection = dataclasses.field(default_factory=LTMModelSection)
    inference: InferenceConfig = dataclasses.field(default_factory=InferenceConfig)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    tracking: TrackingSection = dataclasses.field(default_factory=TrackingSection)


def build_decoder(cfg: LTMConfig, data: DataIdentity) -> LTMDecoder:
    """A seeded decoder for the data's vocabulary; checks sequence length against positions."""
    mc = ltm_preset(cfg.model.preset, **({"vocab_size": data.vocab_size, "eos_token_id": data.eos_id}
                                         | cfg.model.overrides))
    if data.vocab_size > mc.vocab_size:
        raise PipelineError(f"the data's tokenizer has {data.vocab_size} ids but model.overrides.vocab_size="
                            f"{mc.vocab_size}")
    if cfg.data.seq_len > mc.max_position_embeddings:
        raise PipelineError(f"data.seq_len={cfg.data.seq_len} exceeds the LTM's max_position_embeddings="
                            f"{mc.max_position_embeddings}")
    torch.manual_seed(cfg.data.seed)
    return LTMDecoder(mc)


def sliding_pairs(seq_len: int, window: int) -> int:
    """Visible query-key pairs of a sliding causal window of `window` keys over `seq_len` tokens."""
    if seq_len <= window:
        return seq_len * (seq_len + 1) // 2
    return window * (window + 1) // 2 + (seq_len - window) * window


def forward_flops_per_token(mc: LTMModelConfig, seq_len: int, *, self_pairs: int | None = None) -> float:
    """One forward pass per token: every matmul (the head included, the lookup table not),
    self-attention over `self_pairs` query-key pairs per sequence (default: those the sliding
    window lets through), cross-attention to the layer's latents. z's key/value projections
    (n_l vectors per layer) are counted too, spread over the sequence's tokens."""
    d, n_l = mc.d_model, mc.latents_per_layer
    body = mc.n_layer * (6 * d * d + 3 * d * mc.d_ff)   # self q,k,v,o + cross q,o + SwiGLU, per token
    kv_z = mc.n_layer * 2 * d * d * n_l / seq_len       # cross k,v over z_l, per token
    head = mc.vocab_size * d
    pairs = sliding_pairs(seq_len, mc.window) if self_pairs is None else self_pairs
    geometry = {"n_layer": mc.n_layer, "n_head": mc.n_head, "head_dim": mc.head_dim}
    attn = attention_flops(pairs + seq_len * n_l, **geometry) / seq_len
    return matmul_flops(body + head, 1) + 2 * kv_z + attn


def paper_trflops_per_token(mc: LTMModelConfig, seq_len: int, steps: int) -> float:
    """Training FLOPs per token as paper 003 §2.4 counts them: (T_fast + 1_slow) forward +
    backward passes, a backward twice a forward, and self-attention over all N^2 query-key
    pairs of the sequence (its O(L N^2 H) term: no window, no causal half). This reproduces
    Table 1's 4.07G (LTM-Small) and 5.52G (LTM-Medium) per token at N = 1024, T_fast = 16."""
    return (steps + 1) * 3 * forward_flops_per_token(mc, seq_len, self_pairs=seq_len * seq_len)


def run_flops_per_token(mc: LTMModelConfig, seq_len: int, steps: int) -> float:
    """What actually runs (`pipeline.flops` conventions): attention only over the pairs the
    sliding window lets through; T_fast forwards + backwards without weight gradients (only
    the path to z), then one full forward + backward. A matmul's weight gradient costs 2N."""
    fwd = forward_flops_per_token(mc, seq_len)
    weights = matmul_flops(mc.n_layer * (6 * mc.d_model**2 + 3 * mc.d_model * mc.d_ff) + mc.vocab_size * mc.d_model, 1)
    return steps * (3 * fwd - weights) + 3 * fwd


@register_task
class LTMPretraining(Task):
    """Dual-rate variational Bayes training of an LTM decoder on packed data-prep shards."""

    kind = "ltm"
    config_class = LTMConfig

    def __init__(self, config: LTMConfig, *, data: DataIdentity | None = None):
        self.config = config
        self._data = data
        self.model: LTMDecoder | None = None

    # ------------------------------------------------------------------ training
    def build(self, layout: BatchLayout) -> nn.Module:
        cfg = self.config
        if not cfg.data.path:
            raise PipelineError("data.path is not set: point it at a data-prep output directory")
        self.manifest = load_manifest(cfg.data.path)
        self._data = DataIdentity.of(cfg.data.path, self.manifest)
        self.manifest_file = Path(cfg.data.path) / "manifest.json"
        self.train_data = PackedSequences(self.manifest, "train", cfg.data.seq_len)
        self.val_data = PackedSequences(self.manifest, "validation", cfg.data.seq_len)
        self.layout = layout
        self.order = BatchOrder(len(self.train_data), cfg.data.seed, layout.micro_batch, layout.accumulation,
                                layout.world)
        self.model = build_decoder(cfg, self._data)
        mc, s, t = self.model.config, cfg.data.seq_len, cfg.inference.steps
        self.per_token = {"paper": paper_trflops_per_token(mc, s, t), "run": run_flops_per_token(mc, s, t)}
        return self.model

    def batch(self, step: int, micro_step: int) -> dict[str, Any]:
        x = self.train_data.batch(self.order.indices(step, micro_step, self.layout.rank)).to(self.layout.device)
        seeds = sequence_seeds(self.config.data.seed, step, micro_step, self.layout.rank, x.shape[0])
        return {"input_ids": x, "seeds": seeds}

    def noise(self, seeds: list[int], steps: int) -> Tensor:
        return draw_noise(seeds, steps + 1, self.model.config.latent_shape, self.layout.device)

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> StepOutput:
        steps = self.config.inference.steps
        x = batch["input_ids"]
        loss, terms, post = ltm_objective(model, x, self.config.inference, self.noise(batch["seeds"], steps),
                                          inner=getattr(model, "module", model))  # the bare decoder: see ltm_objective
        n = terms.tokens.clamp(min=1).float()
        metrics: dict[str, Any] = {"recon_nll": (terms.nll / n).mean().detach(), "kl": (terms.kl / n).mean().detach(),
                                   "elbo": -loss.detach(),
                                   "trflops_per_token": self.per_token["paper"]}
        if post.elbo_first is not None:
            metrics |= {"inner_elbo_first": (post.elbo_first / n).mean(), "inner_elbo_last": (post.elbo_last / n).mean()}
        return StepOutput(loss=loss, metrics=metrics)

    def flops(self, batch: dict[str, Any]) -> float:
        return self.per_token["run"] * batch["input_ids"].numel()

    def tokens(self, batch: dict[str, Any]) -> int:
        return batch["input_ids"].numel()

    @torch.no_grad()
    def validate(self, model: nn.Module) -> dict[str, float]:
        """-ELBO per token (val_loss) and its ppl bound on the first `eval_sequences` validation
        sequences after T_fast inference steps, with fixed noise; the same on every rank."""
        cfg, micro, steps = self.config, self.layout.micro_batch, self.config.inference.steps
        n = min(cfg.train.eval_sequences, len(self.val_data))
        total = tokens = nll = 0.0
        for i, first in enumerate(range(0, n, micro)):
            rows = list(range(first, min(first + micro, n)))
            x = self.val_data.batch(rows).to(self.layout.device)
            seeds = sequence_seeds(cfg.data.seed, EVAL_STEP, i, 0, len(rows))
            _, terms, _ = ltm_objective(model, x, cfg.inference, self.noise(seeds, steps),
                                        inner=getattr(model, "module", model))
            total += float((terms.nll + terms.kl).sum())
            nll += float(terms.nll.sum())
            tokens += float(terms.tokens.sum())
        loss = total / max(tokens, 1.0)
        return {"val_loss": loss, "val_recon_nll": nll / max(tokens, 1.0), "val_ppl_bound": float(torch.tensor(loss).exp())}

    def provenance(self) -> dict[str, Any]:
        return {"data": {k: v for k, v in self.manifest.to_json().items() if k != "shards"},
                "trflops_per_token_paper": self.per_token["paper"], "flops_per_token_run": self.per_token["run"],
                "decoder_params": self.model.num_params()}

    def artifacts(self) -> list[Path]:
        return [self.manifest_file]

    # ------------------------------------------------------------------ checkpoints and export
    def checkpoint_meta(self) -> dict[str, Any]:
        return {"data": dataclasses.asdict(self._data)}

    @classmethod
    def from_checkpoint(cls, config: dict[str, Any], meta: dict[str, Any], *, where: str) -> LTMPretraining:
        cfg = from_dict(LTMConfig, config, where=where)
        data = DataIdentity(**meta["data"]) if meta.get("data") else DataIdentity.of(cfg.data.path)
        return cls(cfg, data=data)

    def export(self, state: dict[str, Tensor], out_dir: Path, *, where: str) -> None:
        decoder = build_decoder(self.config, self._data)
        load_checked(decoder, state, f"{where}: checkpoint", tied=decoder.config.tie_word_embeddings)
        decoder.tie_weights()
        run_config = self.config_dict()
        run_config["data"]["path"] = self._data.path
        save_ltm(decoder, out_dir, run_config=run_config, inference=self.config.inference,
                 tokenizer=dict(self._data.tokenizer), seq_len=self.config.data.seq_len)
