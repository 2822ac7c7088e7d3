"""The dual model: a Base and a Coprocessor that talk through the KV-cache.

`DualModel.forward` is the packed three-pass schedule of DESIGN.md §3 for all M
sites of every sequence at once:

    pass 1  Base on x (causal)                     -> cache KV_θ(x), hidden states
    pass 2  Coprocessor on M·N_L slots             -> Z (M, N_L, d) and its K/V at the slots
            (slot j of site m: position p_m+1+j, sees cache <= p_m and its own site's slots <= j)
    pass 3  Base on M blocks, reusing the cache    -> logits for the M·N_A targets
            (block m: [slots ; (x[p_m]) ; x[p_m+1 .. p_m+N_A-1]], sees cache <= p_m and
             itself causally; h1 puts the Coprocessor's K/V in the cache instead of slots)

Every pass is one call of the model core with a `prefix_block_causal` mask; there is
no Python loop over sites. What fills the slots and what trains comes from the
variant row (`pipeline.dual.variants`), not from branches on variant names.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.attention import (
    AttentionPattern,
    Backend,
    causal,
    doc_ids_from_eos,
    document_causal,
    uniform_blocks,
)
from pipeline.dual.config import DualConfig
from pipeline.dual.lora import add_lora
from pipeline.dual.sites import sample_sites
from pipeline.errors import PipelineError
from pipeline.models import KV, CausalLM, build_model

log = logging.getLogger(__name__)


@dataclasses.dataclass
class DualOutput:
    loss: Tensor
    """The training objective: ahead loss + λ·orthogonality + w·LM (LM only for
    continued_pretraining)."""
    ahead_loss: Tensor | None
    """Mean cross-entropy over the M·N_A targets (None without augmentation)."""
    lm_loss: Tensor | None
    """Causal LM loss of pass 1 (when weighted in, or the whole loss)."""
    orthogonality: Tensor | None
    """The unweighted orthogonality penalty (when its weight is > 0)."""
    nll: Tensor | None
    """Per-target NLL `(B, M, N_A)`: nll[b, m, k-1] is -log p(x[p_m + k])."""
    draft_loss: Tensor | None = None
    """Mean cross-entropy of the Coprocessor's own head at the slots (when weighted in)."""


class DualModel(nn.Module):
    """Base + (optional) Coprocessor + learnable slot embeddings, for one variant."""

    def __init__(
        self,
        base: CausalLM,
        config: DualConfig,
        *,
        coprocessor: CausalLM | None = None,
        soft_tokens: Tensor | None = None,
        latent_code: Tensor | None = None,
        eos_id: int | None = None,
    ):
        super().__init__()
        spec = config.spec
        self.config = config
        self.eos_id = eos_id
        if (config.document_mask or config.document_aware_sites) and eos_id is None:
            raise PipelineError("document_mask / document_aware_sites need the data's eos_id")
        self.base = base
        self.coprocessor: CausalLM | None = None
        if spec.has_coprocessor:
            if coprocessor is None:
                if config.coprocessor_init == "base":
                    coprocessor = copy.deepcopy(base)
                else:  # a fresh init, where the Base lives and in its dtype
                    coprocessor = build_model(base.config).to(_device(base), _param_dtype(base))
            _check_compatible(base, coprocessor)
            self.coprocessor = coprocessor
        self.soft_tokens: nn.Embedding | None = None
        """The learnable slot (or pause) embeddings, rows `(N_L or 1, d)`. An nn.Embedding
        called in forward, not a bare Parameter, so ZeRO-3 gathers it like any layer."""
        if spec.augments:
            rows = 1 if spec.slots == "pause" else config.n_latents
            if soft_tokens is None:
                # Start at the scale of the Base's own token embeddings.
                with torch.no_grad():
                    std = float(base.embed(torch.arange(2, device=_device(base))).std()) or 0.02
                soft_tokens = torch.randn(rows, base.config.d_model) * std
            if tuple(soft_tokens.shape) not in ((rows, base.config.d_model), (config.n_latents, base.config.d_model)):
                raise PipelineError(
                    f"soft_tokens has shape {tuple(soft_tokens.shape)}, expected ({rows}, {base.config.d_model})"
                )
            self.soft_tokens = nn.Embedding(rows, base.config.d_model, device=_device(base), dtype=_param_dtype(base))
            with torch.no_grad():
                self.soft_tokens.weight.copy_(soft_tokens[:rows])
        self.latent_code: nn.Linear | None = None
        """`latent_readout: vocab`: the code table C `(V, d)` held as a linear map V -> d, so the
        Base reads softmax(head(Z)) @ C; called in forward, so ZeRO-3 gathers it."""
        if config.latent_readout == "vocab":
            vocab, d = base.config.vocab_size, base.config.d_model
            if latent_code is None:
                with torch.no_grad():  # start as the Base's token embeddings
                    latent_code = base.embed(torch.arange(vocab, device=_device(base))).detach()
            if tuple(latent_code.shape) != (vocab, d):
                raise PipelineError(f"latent_code has shape {tuple(latent_code.shape)}, expected ({vocab}, {d})")
            self.latent_code = nn.Linear(vocab, d, bias=False, device=_device(base), dtype=_param_dtype(base))
            with torch.no_grad():
                self.latent_code.weight.copy_(latent_code.T)
        self._set_trainable()

    # ------------------------------------------------------------------ trainable parameters
    def _set_trainable(self) -> None:
        """Train exactly the groups the variant row says; freeze what cannot reach the loss."""
        cfg, spec = self.config, self.config.spec
        self.base.requires_grad_(cfg.train_base)
        if self.coprocessor is not None:
            if cfg.coprocessor_adapter == "lora":
                self.coprocessor.requires_grad_(False)
                n = add_lora(self.coprocessor, cfg.lora_rank, cfg.lora_alpha)
                log.info("coprocessor: LoRA rank %d on %d linear layers", cfg.lora_rank, n)
            else:
                self.coprocessor.requires_grad_(True)
        if self.soft_tokens is not None:
            self.soft_tokens.requires_grad_(True)
        if self.latent_code is not None:
            self.latent_code.requires_grad_(True)
        if spec.has_coprocessor:
            self.unused = self._freeze_unused()
            if self.unused:
                log.info("frozen (no path to the %s loss): %s", cfg.variant, ", ".join(self.unused))

    def _freeze_unused(self) -> list[str]:
        """Freeze trainable parameters that get no gradient (e.g. the Coprocessor's head).

        Found with one probe forward/backward on a minimal sequence rather than a list of
        names per family and variant: h1, for instance, never uses the Coprocessor's last
        MLP or final norm, and DeepSpeed must not see such parameters as trainable.
        """
        cfg = self.config
        seq = cfg.n_ahead + 2
        ids = torch.zeros(1, seq, dtype=torch.long, device=_device(self.base))
        sites = torch.zeros(1, 1, dtype=torch.long, device=ids.device)
        probe = dataclasses.replace(cfg, n_sites=1, document_mask=False, document_aware_sites=False)
        saved, self.config = self.config, probe
        try:
            trainable = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
            loss = self.forward(ids, sites).loss
            grads = torch.autograd.grad(loss, [p for _, p in trainable], allow_unused=True)
        finally:
            self.config = saved
        unused = [n for (n, p), g in zip(trainable, grads, strict=True) if g is None]
        for name in unused:
            self.get_parameter(name).requires_grad_(False)
        return unused

    def slot_embeddings(self) -> Tensor:
        """The soft-token rows `(N_L or 1, d)` (through the module call, for ZeRO-3).

        With fewer latents than rows (a curriculum stage, `with_config(n_latents=...)`),
        the first N_L rows: slot j keeps its embedding from stage to stage."""
        rows = min(self.soft_tokens.num_embeddings, self.config.n_latents)
        return self.soft_tokens(torch.arange(rows, device=self.soft_tokens.weight.device))

    @contextlib.contextmanager
    def with_config(self, **changes):
        """Run with some config fields changed (e.g. a curriculum stage's `n_latents`, a
        batch's `n_ahead`); the parameters stay as built, so `n_latents` may only shrink."""
        if changes.get("n_latents", 0) > self.config.n_latents:
            raise PipelineError(f"n_latents={changes['n_latents']} exceeds the {self.config.n_latents} "
                                "latent slots this model was built with")
        saved, self.config = self.config, dataclasses.replace(self.config, **changes)
        try:
            yield self.config
        finally:
            self.config = saved

    # ------------------------------------------------------------------ the three passes
    def sample_sites(self, input_ids: Tensor, generator: torch.Generator) -> Tensor:
        """`(B, M)` sorted sites for a batch, drawn with the config's constraints."""
        cfg = self.config
        return sample_sites(
            input_ids, cfg.n_sites, n_latents=cfg.n_latents, n_ahead=cfg.n_ahead, reread=cfg.reread,
            max_positions=self.base.config.max_position_embeddings, generator=generator,
            eos_id=self.eos_id if cfg.document_aware_sites else None,
        )

    def forward(self, input_ids: Tensor, sites: Tensor | None = None) -> DualOutput:
        """Loss of one packed batch `input_ids` `(B, S)` with sites `(B, M)` (sorted)."""
        cfg, spec = self.config, self.config.spec
        docs = doc_ids_from_eos(input_ids, self.eos_id) if cfg.document_mask else None

        # Pass 1: Base over x, keeping its cache.
        want_lm = cfg.lm_loss_weight > 0 or not spec.augments
        base_out = self.base(
            input_ids, attention=_causal_pattern(input_ids, docs),
            return_kv=spec.augments, return_logits=want_lm,
        )
        lm_loss = _lm_loss(base_out.logits, input_ids) if want_lm else None
        if not spec.augments:
            return DualOutput(loss=lm_loss, ahead_loss=None, lm_loss=lm_loss, orthogonality=None, nll=None)
        if sites is None:
            raise PipelineError(f"variant {cfg.variant!r} needs augmentation sites")

        nll, latents, z = self._augmented_nll(input_ids, sites, cfg.n_ahead, base_out.kv, base_out.hidden_states,
                                              docs)
        ahead = nll.mean()
        loss = ahead
        draft = None
        if cfg.draft_loss_weight > 0:
            draft = self.draft_nll(z, input_ids, sites).mean()
            loss = loss + cfg.draft_loss_weight * draft
        ortho = None
        if cfg.orthogonality_weight > 0:
            ortho = orthogonality_penalty(latents)
            loss = loss + cfg.orthogonality_weight * ortho
        if cfg.lm_loss_weight > 0:
            loss = loss + cfg.lm_loss_weight * lm_loss
        return DualOutput(loss=loss, ahead_loss=ahead, lm_loss=lm_loss, orthogonality=ortho, nll=nll,
                          draft_loss=draft)

    def _augmented_nll(
        self, input_ids: Tensor, sites: Tensor, n_ahead: int, cache: list[KV], base_hidden: Tensor,
        docs: Tensor | None,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Passes 2 and 3: NLL `(B, M, n_ahead)` of x[p_m + k], k = 1..n_ahead; the slot latents
        the Base read; the Coprocessor's output Z (None without a Coprocessor)."""
        _check_targets_fit(input_ids, sites, n_ahead)
        latents, extra_kv, z = self.slots(sites, cache, base_hidden, docs)
        logits = self.decode_logits(input_ids, sites, n_ahead, cache, latents, extra_kv, docs)
        return _site_nll(logits, site_targets(input_ids, sites, n_ahead)), latents, z

    def draft_nll(self, z: Tensor, input_ids: Tensor, sites: Tensor) -> Tensor:
        """NLL `(B, M, j)` of x[p_m + 1 + i] under the Coprocessor's head at slot i, i < j = min(N_L, N_A)."""
        j = min(self.config.n_latents, self.config.n_ahead)
        return _site_nll(self.coprocessor.lm_head(z[:, :, :j]), site_targets(input_ids, sites, j))

    def slot_contents(
        self, sites: Tensor, cache: list[KV], base_hidden: Tensor, docs: Tensor | None = None
    ) -> tuple[Tensor | None, list[KV] | None]:
        """Pass 2: what fills each site's slots: latents `(B, M, N_L, d)` as input
        embeddings, or (h1) per-layer K/V `(B, nkv, M*N_L, hs)` to join the cache."""
        latents, extra_kv, _ = self.slots(sites, cache, base_hidden, docs)
        return latents, extra_kv

    def slots(
        self, sites: Tensor, cache: list[KV], base_hidden: Tensor, docs: Tensor | None
    ) -> tuple[Tensor | None, list[KV] | None, Tensor | None]:
        """Pass 2 in full: `slot_contents` plus the Coprocessor's raw output Z `(B, M, N_L, d)`
        (None without a Coprocessor), which the draft loss and the probe read. The one place
        the slots are filled: forward and slot_contents both go through it."""
        spec, n_l, d = self.config.spec, self.config.n_latents, self.base.config.d_model
        if spec.has_coprocessor:
            z, cop_kv = self._coprocessor_pass(sites, cache, base_hidden, docs)
            if spec.slots == "coprocessor_kv":
                return None, cop_kv, z
            return self.read_latents(z), None, z
        B, M = sites.shape
        return self.slot_embeddings().expand(n_l, d).expand(B, M, n_l, d), None, None  # slot or pause embeddings

    def read_latents(self, z: Tensor) -> Tensor:
        """What the Base reads from the Coprocessor's output Z `(..., d)` (`latent_readout`)."""
        if self.latent_code is None:
            return z
        probs = torch.softmax(self.coprocessor.lm_head(z).float(), dim=-1)
        return self.latent_code(probs.to(z.dtype))

    def site_logits(
        self, input_ids: Tensor, sites: Tensor, n_ahead: int, cache: list[KV], base_hidden: Tensor,
        docs: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Passes 2 and 3: logits `(B, M, n_ahead, V)` predicting x[p_m + k], k = 1..n_ahead."""
        _check_targets_fit(input_ids, sites, n_ahead)
        latents, extra_kv = self.slot_contents(sites, cache, base_hidden, docs)
        return self.decode_logits(input_ids, sites, n_ahead, cache, latents, extra_kv, docs), latents

    def decode_logits(
        self, input_ids: Tensor, sites: Tensor, n_ahead: int, cache: list[KV], latents: Tensor | None,
        extra_kv: list[KV] | None, docs: Tensor | None = None,
    ) -> Tensor:
        """Pass 3: one block per site over the cache -> logits `(B, M, n_ahead, V)`.

        Block positions continue from p+1; the first N_L are the slots (as input
        embeddings `latents`, or as injected K/V `extra_kv` for h1).
        """
        h = self.decode_hidden(input_ids, sites, n_ahead, cache, latents, extra_kv, docs)
        return self.base.lm_head(h)  # (B, M, n_ahead, V)

    def decode_hidden(
        self, input_ids: Tensor, sites: Tensor, n_ahead: int, cache: list[KV], latents: Tensor | None,
        extra_kv: list[KV] | None, docs: Tensor | None = None,
    ) -> Tensor:
        """`decode_logits` before the head: final hidden states `(B, M, n_ahead, d)`, for a
        caller that needs logits at only some targets (padded ones skip the vocabulary)."""
        cfg = self.config
        B, S = input_ids.shape
        M, n_l, d = sites.shape[1], cfg.n_latents, self.base.config.d_model
        r = int(cfg.reread)
        n_tok = r + n_ahead - 1
        tok_pos = sites.unsqueeze(-1) + (1 - r) + torch.arange(n_tok, device=sites.device)  # (B, M, n_tok)
        tok_emb = self.base.embed(input_ids.gather(1, tok_pos.flatten(1))).view(B, M, n_tok, d)
        if latents is not None:
            block = torch.cat([latents.to(tok_emb.dtype), tok_emb], dim=2)  # (B, M, n_l + n_tok, d)
            first = 1
        else:
            block = tok_emb
            first = 1 + n_l
        q_len = block.shape[2]
        positions = sites.unsqueeze(-1) + first + torch.arange(q_len, device=sites.device)
        prefix = cache if extra_kv is None else cat_kv(cache, extra_kv)
        pattern = _site_blocks(sites, S, q_len, n_l if extra_kv is not None else 0, docs, cfg.attention_backend)
        out = self.base(
            inputs_embeds=block.flatten(1, 2), position_ids=positions.flatten(1), prefix_kv=prefix,
            attention=pattern, return_logits=False,
        )
        return out.hidden_states.view(B, M, q_len, d)[:, :, -n_ahead:]  # outputs that predict targets

    def _coprocessor_pass(
        self, sites: Tensor, cache: list[KV], base_hidden: Tensor, docs: Tensor | None
    ) -> tuple[Tensor, list[KV]]:
        """Z `(B, M, N_L, d)` and the Coprocessor's per-layer K/V at the M·N_L slots."""
        cfg = self.config
        B, S = base_hidden.shape[:2]
        M, n_l, d = sites.shape[1], cfg.n_latents, self.base.config.d_model
        if cfg.coprocessor_input == "last_hidden":
            # Paper 002 §3.3.3: the Coprocessor reads [h_last(x) ; soft tokens]; its own causal
            # pass over h_last gives the prefix K/V the slots then attend to.
            cache = self.coprocessor(
                inputs_embeds=base_hidden, attention=_causal_pattern(base_hidden[..., 0], docs),
                return_kv=True, return_logits=False,
            ).kv
        slots = self.slot_embeddings().expand(B, M, n_l, d)
        positions = sites.unsqueeze(-1) + 1 + torch.arange(n_l, device=sites.device)  # (B, M, N_L)
        out = self.coprocessor(
            inputs_embeds=slots.flatten(1, 2), position_ids=positions.flatten(1), prefix_kv=cache,
            attention=_site_blocks(sites, S, n_l, 0, docs, cfg.attention_backend), return_kv=True,
            return_logits=False,
        )
        return out.hidden_states.view(B, M, n_l, d), out.kv

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def score_sites(self, input_ids: Tensor, sites: Tensor, k: int, *, augment: bool = True,
                    greedy: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """NLL `(B, M, k)` (fp32) of the j-th token after each site, j = 1..k (k may exceed N_A).

        `augment=False` scores the same targets with the Base alone (no slots), the
        baseline every augmentation is compared against. `greedy=True` returns
        `(nll, is_greedy)`, is_greedy `(B, M, k)` telling whether each target is the
        argmax of its logits (lm-eval's `is_greedy`).
        """
        cfg = self.config
        _check_targets_fit(input_ids, sites, k)
        docs = doc_ids_from_eos(input_ids, self.eos_id) if cfg.document_mask else None
        augment = augment and cfg.spec.augments
        base_out = self.base(
            input_ids, attention=_causal_pattern(input_ids, docs), return_kv=augment, return_logits=False,
        )
        if augment:  # passes 2 and 3
            logits = self.site_logits(input_ids, sites, k, base_out.kv, base_out.hidden_states, docs)[0]
        else:  # the Base's outputs at p .. p+k-1 predict x[p+1 .. p+k]: only those rows get the head
            h = base_out.hidden_states  # (B, S, d)
            pos = sites.unsqueeze(-1) + torch.arange(k, device=sites.device)  # (B, M, k)
            rows = h.gather(1, pos.flatten(1).unsqueeze(-1).expand(-1, -1, h.shape[-1]))  # (B, M*k, d)
            logits = self.base.lm_head(rows).view(*pos.shape, -1)  # (B, M, k, V)
        targets = site_targets(input_ids, sites, k)
        nll = _site_nll(logits, targets)
        if not greedy:
            return nll
        return nll, logits.argmax(-1) == targets.view_as(nll)


# ---------------------------------------------------------------------- helpers
def site_targets(input_ids: Tensor, sites: Tensor, n_ahead: int) -> Tensor:
    """`(B, M*n_ahead)` targets x[p_m + k], k = 1..n_ahead, site-major."""
    ahead = 1 + torch.arange(n_ahead, device=sites.device)
    return input_ids.gather(1, (sites.unsqueeze(-1) + ahead).flatten(1))


def _site_nll(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-target NLL `(B, M, k)` in fp32 from logits `(B, M, k, V)` and `site_targets`:
    the one place the training loss and the scorer (both paths) turn logits into NLL."""
    nll = F.cross_entropy(logits.float().flatten(0, 2), targets.flatten(), reduction="none")
    return nll.view(logits.shape[:-1])


def _check_targets_fit(input_ids: Tensor, sites: Tensor, n_ahead: int) -> None:
    if int(sites.max()) + n_ahead >= input_ids.shape[1]:
        raise PipelineError(
            f"a site at {int(sites.max())} has targets past the sequence end ({input_ids.shape[1]})"
        )


def orthogonality_penalty(latents: Tensor) -> Tensor:
    """mean over sites of ||ẑ ẑᵀ − I||²_F, ẑ the row-normalised `(..., N_L, d)` latents."""
    z = F.normalize(latents.float(), dim=-1)
    gram = z @ z.transpose(-1, -2)  # (..., N_L, N_L)
    eye = torch.eye(gram.shape[-1], device=gram.device)
    return ((gram - eye) ** 2).sum(dim=(-1, -2)).mean()


def _causal_pattern(input_ids: Tensor, docs: Tensor | None) -> AttentionPattern:
    return causal(input_ids.shape[1]) if docs is None else document_causal(docs)


def _lm_loss(logits: Tensor, input_ids: Tensor) -> Tensor:
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), input_ids[:, 1:].flatten())


def _site_blocks(sites: Tensor, prefix_len: int, q_len: int, n_injected: int, docs: Tensor | None,
                 backend: Backend = "auto") -> AttentionPattern:
    """Mask for M blocks of `q_len` queries after a cache of `prefix_len` positions: the
    cache is visible up to the block's site (in its document), `n_injected` K/V per block
    (h1's Coprocessor cache) to the whole block, the block itself causally."""
    doc_kw = {} if docs is None else {"prefix_doc": docs, "limit_doc": docs.gather(1, sites)}
    return uniform_blocks(sites, q_len, prefix_len, injected=n_injected, backend=backend, **doc_kw)


def cat_kv(a: list[KV], b: list[KV]) -> list[KV]:
    """Per-layer concatenation of two caches along the sequence axis."""
    return [(torch.cat([ka, kb], dim=2), torch.cat([va, vb], dim=2)) for (ka, va), (kb, vb) in zip(a, b, strict=True)]


def _check_compatible(base: CausalLM, cop: CausalLM) -> None:
    """The Coprocessor reads the Base's cache layer by layer: shapes must line up."""
    b, c = base.config, cop.config
    for field in ("n_layer", "n_kv_head", "head_dim", "d_model"):
        if getattr(b, field) != getattr(c, field):
            raise PipelineError(
                f"coprocessor {field}={getattr(c, field)} differs from the base's {getattr(b, field)}; "
                "the coprocessor reads the base cache layer by layer, so they must match"
            )


def _param_dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device
