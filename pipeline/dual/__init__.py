"""The dual model (Base + Coprocessor) and its variants, DESIGN.md §3.

    from pipeline.dual import DualConfig, DualModel
    dual = DualModel(base, DualConfig(variant="liu", n_latents=16, n_ahead=16, n_sites=64), eos_id=eos)
    sites = dual.sample_sites(input_ids, generator)     # (B, M), sorted
    out = dual(input_ids, sites)                        # .loss, .ahead_loss, .nll (B, M, N_A)
    nll = dual.score_sites(input_ids, sites, k=32)      # per-site scorer, k may exceed N_A
    export_dual(dual, "out/"); dual = load_dual("out/")
    new_tokens = augment_and_generate(dual, prompt_ids, max_new_tokens=20)
"""

from pipeline.dual.config import DualConfig
from pipeline.dual.export import export_dual, load_dual, read_pipeline_json
from pipeline.dual.inference import augment_and_generate
from pipeline.dual.model import DualModel, DualOutput, orthogonality_penalty
from pipeline.dual.variants import VARIANTS, Variant, get_variant

__all__ = [
    "VARIANTS",
    "DualConfig",
    "DualModel",
    "DualOutput",
    "Variant",
    "augment_and_generate",
    "export_dual",
    "get_variant",
    "load_dual",
    "orthogonality_penalty",
    "read_pipeline_json",
]
