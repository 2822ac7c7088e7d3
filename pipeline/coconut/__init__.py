"""Coconut (continuous thoughts, Hao et al. 2024) as a comparator of the dual variants.

    from pipeline.coconut import CoconutLM, export_coconut, load_coconut
    model = CoconutLM(lm)                      # lm + <bot>/<eot> marker embeddings
    nll, n, hits = model(question, q_len, rest, rest_len, n_latents)
    export_coconut(model, "runs/x/export", n_latents=6); model, meta = load_coconut("runs/x/export")

`model.py` is the batched, KV-cached path; `reference.py` the one-example-at-a-time check;
`export.py` the export directory; `benchmark.py` training-step and inference timings.
"""

from pipeline.coconut.export import export_coconut, load_coconut
from pipeline.coconut.model import CoconutLM

__all__ = ["CoconutLM", "export_coconut", "load_coconut"]
