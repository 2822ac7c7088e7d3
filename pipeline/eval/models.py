"""What the evaluation stage scores: an exported dual model, or a plain HF checkpoint.

    model = load_eval_model("runs/x/export")        # pipeline.json -> DualModel
    model = load_eval_model("hf/gpt2")              # no pipeline.json -> Base alone
    nll, greedy = model.site_logprobs(ids, sites, k)  # (B, M, k) each
    rows = model.generate_batch(prompts, max_new_tokens=64, eos_token_id=eos)  # greedy, any lengths

A plain checkpoint is wrapped as the `continued_pretraining` row (no augmentation), so
both kinds go through the same `DualModel` scorer; `augments` says which one it is.
A Coconut export (variant `coconut`) loads as `CoconutEvalModel`: generation thinks with
the final stage's thought count; per-site scoring (ppl-at-k, mc) is refused for it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pipeline.coconut import CoconutLM, load_coconut
from pipeline.coconut.export import is_coconut
from pipeline.data.tokenizer import Tokenizer, load_tokenizer
from pipeline.dual import DualConfig, DualModel, augment_and_generate, load_dual, read_pipeline_json
from pipeline.dual.inference import augment_and_generate_batch
from pipeline.dual.sites import last_allowed_site
from pipeline.errors import PipelineError
from pipeline.models import from_pretrained

log = logging.getLogger(__name__)


@dataclasses.dataclass
class EvalModel:
    """A loaded model directory plus what the evaluation needs to know about it."""

    name: str
    path: Path
    dual: DualModel
    meta: dict[str, Any] | None
    """pipeline.json of an export; None for a plain Hugging Face checkpoint."""

    @property
    def augments(self) -> bool:
        return self.dual.config.spec.augments

    @property
    def device(self) -> torch.device:
        return next(self.dual.parameters()).device

    @property
    def variant(self) -> str:
        return self.dual.config.variant if self.meta is not None else "hf_base"

    @property
    def max_positions(self) -> int:
        return self.dual.base.config.max_position_embeddings

    def last_site(self, k: int, augment: bool = True) -> int:
        """Largest site p whose k following tokens fit the model's positions.

        The scored row x[0 .. p+k] is one Base pass (p + k + 1 <= max positions), and the
        decode block after augmentation uses positions up to p + N_L + reread + k - 1.
        """
        by_row = self.max_positions - k - 1
        if augment and self.augments:
            cfg = self.dual.config
            return min(by_row, last_allowed_site(1 << 62, cfg.n_latents, k, cfg.reread, self.max_positions))
        return by_row

    @property
    def trained_window(self) -> int | None:
        """The sequence length the export trained on (run_config.data.seq_len), if recorded."""
        run = (self.meta or {}).get("run_config") or {}
        data = run.get("data") or {}
        seq = data.get("seq_len") if isinstance(data, dict) else None
        return seq if isinstance(seq, int) and seq > 0 else None

    def data_path(self) -> str | None:
        """The shard directory the model trained on (run_config.data.path), if recorded."""
        run = (self.meta or {}).get("run_config") or {}
        data = run.get("data") or {}
        return data.get("path") if isinstance(data, dict) else None

    def describe(self) -> dict[str, Any]:
        cfg = self.dual.config
        return {
            "name": self.name, "path": str(self.path), "variant": self.variant,
            "n_latents": cfg.n_latents if self.augments else 0,
            "n_ahead": cfg.n_ahead if self.augments else 0,
        }

    # ------------------------------------------------------------------ scoring
    def score_sites(self, input_ids: Tensor, sites: Tensor, k: int, *, augment: bool = True) -> Tensor:
        """NLL `(B, M, k)` of x[p+1 .. p+k] per site (`DualModel.score_sites`)."""
        return self.dual.score_sites(input_ids.to(self.device), sites.to(self.device), k, augment=augment)

    def site_logprobs(self, input_ids: Tensor, sites: Tensor, k: int, *, augment: bool = True
                      ) -> tuple[Tensor, Tensor]:
        """`score_sites` plus whether each target is the argmax (lm-eval's `is_greedy`)."""
        return self.dual.score_sites(input_ids.to(self.device), sites.to(self.device), k, augment=augment,
                                     greedy=True)

    @torch.no_grad()
    def score_answers(self, contexts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]) -> list[list[float]]:
        """Teacher-forced NLL of each target (a list of ids) after its context, augmented once at
        the context's last token: one site per row through `score_sites`, rows right-padded."""
        k = max(len(t) for t in targets)
        too_long = [i for i, c in enumerate(contexts) if len(c) - 1 > self.last_site(k)]
        if too_long:
            raise PipelineError(f"example {too_long[0]}: its prompt ({len(contexts[too_long[0]])} tokens) and "
                                f"{k} answer tokens do not fit the {self.max_positions} positions of {self.name}")
        width = max(len(c) for c in contexts) + k + 1
        ids = torch.zeros((len(contexts), width), dtype=torch.long)
        for i, (c, t) in enumerate(zip(contexts, targets, strict=True)):
            ids[i, : len(c) + len(t)] = torch.tensor([*c, *t])
        sites = torch.tensor([[len(c) - 1] for c in contexts])
        nll = self.score_sites(ids, sites, k).cpu()  # (B, 1, k)
        return [nll[i, 0, : len(t)].tolist() for i, t in enumerate(targets)]

    @torch.no_grad()
    def generate(self, prompt_ids: Tensor, *, max_new_tokens: int, eos_token_id: int | None) -> Tensor:
        """Greedy continuation `(B, max_new_tokens)`, augmenting once at the prompt's end."""
        return augment_and_generate(self.dual, prompt_ids.to(self.device), max_new_tokens=max_new_tokens,
                                    temperature=0.0, eos_token_id=eos_token_id)

    @torch.no_grad()
    def generate_batch(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int | Sequence[int],
                       eos_token_id: int | None, stop: Sequence[Sequence[int]] | None = None,
                       stop_strings: Sequence[str] | None = None,
                       decode: Callable[[list[int]], str] | None = None) -> list[list[int]]:
        """Greedy new tokens of each prompt (token-id lists of any lengths), decoded as one batch,
        each augmented once at its own end (a plain checkpoint: the Base alone).

        A row ends at `eos_token_id`, a `stop` token sequence, a `stop_strings` string in
        `decode(new tokens)` (the stopping token is kept), or its `max_new_tokens` (one
        int or one per prompt). Row for row the tokens of `generate` on that prompt alone.
        """
        return augment_and_generate_batch(self.dual, prompts, max_new_tokens=max_new_tokens,
                                          eos_token_id=eos_token_id, stop=stop, stop_strings=stop_strings,
                                          decode=decode)


@dataclasses.dataclass
class CoconutEvalModel(EvalModel):
    """A Coconut export: question, <bot>, `n_latents` continuous thoughts, <eot>, then decoding.

    `dual` is its LM as the plain `continued_pretraining` row (for what reads the Base's
    config); scoring through it would skip the thoughts, so the scorers refuse."""

    coconut: CoconutLM | None = None
    n_latents: int = 0

    @property
    def augments(self) -> bool:
        return True

    @property
    def variant(self) -> str:
        return "coconut"

    def last_site(self, k: int, augment: bool = True) -> int:
        return self.coconut.max_prompt(self.n_latents, k) - 1

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path), "variant": "coconut", "n_latents": self.n_latents,
                "n_ahead": 0}

    def score_sites(self, *args, **kwargs) -> Tensor:
        raise PipelineError(f"{self.path}: a coconut export is evaluated by `evaluate.py reasoning`; per-site "
                            "scoring (ppl-at-k, mc) is not defined for it")

    site_logprobs = score_sites

    @torch.no_grad()
    def score_answers(self, contexts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]) -> list[list[float]]:
        """Each target's NLL after its context, <bot>, the final stage's thoughts and <eot>."""
        return self.coconut.score_answers(contexts, targets, n_latents=self.n_latents)

    @torch.no_grad()
    def generate(self, prompt_ids: Tensor, *, max_new_tokens: int, eos_token_id: int | None) -> Tensor:
        rows = self.generate_batch(prompt_ids.tolist(), max_new_tokens=max_new_tokens, eos_token_id=eos_token_id)
        fill = eos_token_id if eos_token_id is not None else 0
        out = torch.full((len(rows), max_new_tokens), fill, dtype=torch.long)
        for r, new in enumerate(rows):
            out[r, : len(new)] = torch.tensor(new, dtype=torch.long)
        return out.to(prompt_ids.device)

    @torch.no_grad()
    def generate_batch(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int | Sequence[int],
                       eos_token_id: int | None, stop: Sequence[Sequence[int]] | None = None,
                       stop_strings: Sequence[str] | None = None,
                       decode: Callable[[list[int]], str] | None = None) -> list[list[int]]:
        return self.coconut.generate_batch(prompts, n_latents=self.n_latents, max_new_tokens=max_new_tokens,
                                           eos_token_id=eos_token_id, stop=stop, stop_strings=stop_strings,
                                           decode=decode)


def fit_prompts(model: EvalModel, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                flag: str = "--max-new-tokens") -> tuple[list[list[int]], int]:
    """Prompts cut from the left to fit the model's positions with `max_new_tokens` after them
    (as lm-eval truncates generation contexts), and how many were cut. A budget that leaves
    no room for any prompt is an error naming the context size, `flag` and its largest value."""
    if max_new_tokens < 1:
        raise PipelineError(f"{flag} must be >= 1, got {max_new_tokens}")
    keep = model.last_site(max_new_tokens) + 1
    if keep < 1:
        largest = next((m for m in range(max_new_tokens, 0, -1) if model.last_site(m) >= 0), 0)
        raise PipelineError(
            f"{flag} {max_new_tokens} does not fit {model.name}'s context of {model.max_positions} positions "
            f"(prompt, latent slots and new tokens together); lower {flag} to at most {largest}")
    cut = sum(len(p) > keep for p in prompts)
    return [list(p[-keep:]) for p in prompts], cut


def generate_all(model: EvalModel, prompts: Sequence[Sequence[int]], *, batch_size: int, max_new_tokens: int,
                 eos_token_id: int | None, stop_strings: Sequence[str] | None = None,
                 decode: Callable[[list[int]], str] | None = None,
                 progress: Callable[[int], None] | None = None) -> list[list[int]]:
    """`model.generate_batch` over many prompts, `batch_size` at a time, longest first (rows of
    a batch then pad little); results in the prompts' order. `progress(n)` after each batch."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: dict[int, list[int]] = {}
    for a in range(0, len(order), batch_size):
        chunk = order[a: a + batch_size]
        rows = model.generate_batch([prompts[i] for i in chunk], max_new_tokens=max_new_tokens,
                                    eos_token_id=eos_token_id, stop_strings=stop_strings, decode=decode)
        out.update(zip(chunk, rows, strict=True))
        if progress is not None:
            progress(len(chunk))
    return [out[i] for i in range(len(prompts))]


def load_eval_model(path: str | Path, *, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32, name: str | None = None) -> EvalModel:
    """An export (has pipeline.json) or a plain Hugging Face checkpoint directory."""
    path = Path(path)
    if not path.is_dir():
        raise PipelineError(f"--model {path}: not a directory")
    name = name or (path.parent.name if path.name == "export" else path.name)  # runs/x/liu/export -> liu
    if (path / "pipeline.json").is_file():
        meta = read_pipeline_json(path)
        if is_coconut(meta):
            coconut, meta = load_coconut(path, device=device, dtype=dtype)
            plain = DualModel(coconut.lm, DualConfig(variant="continued_pretraining", n_sites=1), eos_id=meta["eos_id"])
            log.info("loaded coconut export %s (%d thoughts)", path, meta["n_latents"])
            return CoconutEvalModel(name, path, plain.eval(), meta, coconut=coconut, n_latents=meta["n_latents"])
        dual = load_dual(path, device=device).to(dtype)
        log.info("loaded export %s (variant %s)", path, meta["variant"])
        return EvalModel(name, path, dual.eval(), meta)
    if not (path / "config.json").is_file():
        raise PipelineError(f"--model {path}: neither an export (pipeline.json) nor a Hugging Face "
                            "checkpoint (config.json + model.safetensors)")
    base = from_pretrained(path, dtype=dtype, device=device)
    cfg = DualConfig(variant="continued_pretraining", n_sites=1)
    dual = DualModel(base, cfg, eos_id=base.config.eos_token_id)
    return EvalModel(name, path, dual.eval(), None)


def resolve_tokenizer(models: list[EvalModel], override: str | None = None) -> Tokenizer:
    """`--tokenizer`, else one beside a model, else the one of the model's training data."""
    if override:
        return load_tokenizer(override)
    for m in models:
        for d in (m.path, m.path / "base"):
            if (d / "tokenizer.json").is_file() or len(list(d.glob("*.model"))) == 1:  # HF or sentencepiece
                return load_tokenizer(d)
    from pipeline.data.shards import load_manifest

    for m in models:
        data = m.data_path()
        if data and Path(data).is_dir():
            tok = load_manifest(data).tokenizer.get("path")
            if tok and Path(tok).exists():
                return load_tokenizer(tok)
    raise PipelineError("no tokenizer found: give --tokenizer (none beside the models, and no "
                        "run_config.data.path manifest in their pipeline.json names one)")


def unique_names(models: list[EvalModel]) -> None:
    """Make model names distinct (directory names can repeat: a/export, b/export)."""
    seen: dict[str, int] = {}
    for m in models:
        if m.name in seen:
            seen[m.name] += 1
            m.name = f"{m.name}-{seen[m.name]}"
        else:
            seen[m.name] = 1
