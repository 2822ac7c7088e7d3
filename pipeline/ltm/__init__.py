"""Latent Thought Models (paper 003, DESIGN.md §4): a decoder conditioned on per-layer latent
thought vectors, trained by dual-rate variational Bayes as the `ltm` training task.

    from pipeline.ltm import LTMDecoder, ltm_preset, infer, elbo_terms, load_ltm
"""

from pipeline.ltm.export import is_ltm_export, load_ltm, save_ltm
from pipeline.ltm.inference import (
    ElboTerms,
    InferenceConfig,
    Posterior,
    draw_noise,
    elbo_terms,
    infer,
    kl_to_prior,
    ltm_objective,
    sequence_seeds,
)
from pipeline.ltm.model import PRESETS, LTMDecoder, LTMModelConfig, ltm_preset, next_token_targets

__all__ = [
    "PRESETS", "ElboTerms", "InferenceConfig", "LTMDecoder", "LTMModelConfig", "Posterior", "draw_noise",
    "elbo_terms", "infer", "is_ltm_export", "kl_to_prior", "load_ltm", "ltm_objective", "ltm_preset",
    "next_token_targets", "save_ltm", "sequence_seeds",
]
