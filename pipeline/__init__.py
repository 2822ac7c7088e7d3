"""Pretraining pipeline for latent-reasoning dual language models.

Subpackages: `data` (shard format, corpus readers, tokenizers), `models`
(gpt2 / llama families), `attention` (mask rules), and later `dual`, `train`, `eval`.
"""

__version__ = "0.1.0"
