"""Packed training sequences and their order, both pure functions of (seed, step).

Sequences are fixed windows of `seq_len` tokens over each shard's token stream
(documents back to back, EOS-separated; the tail shorter than a window is
dropped). The order is a seeded permutation per epoch, and the batch of a given
optimizer step, micro-step and rank is computed, not iterated to: resuming at step
N needs nothing but N, and the same run on another world size sees the same
global batches.

Why not megatron-core's GPTDataset / BlendedMegatronDatasetBuilder: they do work
here (megatron.core.datasets.helpers_cpp is importable on this CPU image), but they
need a Megatron tokenizer object, write sample-index caches on first use (a rank-0
build plus a barrier, and a cache directory to manage), and split by document ranges
themselves, while data-prep already made the train/validation split. For one split of
one dataset this sampler is shorter and exact resume holds by construction. Weighted
blending of several datasets is what it does not do yet; that is the point to switch.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.data.shards import Manifest, token_stream
from pipeline.errors import PipelineError


class PackedSequences:
    """`seq_len`-token windows over one split of a data-prep dataset."""

    def __init__(self, manifest: Manifest, split: str, seq_len: int):
        prefixes = manifest.prefixes(split)
        if not prefixes:
            raise PipelineError(f"{manifest.root}: no {split} shards; rebuild with data-prep "
                                f"(--val-fraction > 0 for a validation split)")
        self.streams = [token_stream(p, manifest.numpy_dtype) for p in prefixes]
        self.seq_len = seq_len
        counts = [len(s) // seq_len for s in self.streams]
        self.offsets = np.concatenate([[0], np.cumsum(counts)])
        if self.offsets[-1] == 0:
            raise PipelineError(f"{manifest.root}: the {split} split has fewer than {seq_len} tokens; "
                                "lower data.seq_len or add data")

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> np.ndarray:
        shard = int(np.searchsorted(self.offsets, i, side="right")) - 1
        start = (i - int(self.offsets[shard])) * self.seq_len
        return np.asarray(self.streams[shard][start : start + self.seq_len], dtype=np.int64)

    def batch(self, indices: list[int]) -> torch.Tensor:
        return torch.from_numpy(np.stack([self[i] for i in indices]))


class BatchOrder:
    """Which sequences make up micro-batch (step, micro) of a rank."""

    def __init__(self, n_sequences: int, seed: int, micro_batch: int, accumulation: int, world: int):
        self.n, self.seed = n_sequences, seed
        self.micro, self.accum, self.world = micro_batch, accumulation, world
        self._epoch, self._perm = -1, None

    @property
    def global_batch(self) -> int:
        return self.micro * self.accum * self.world

    def indices(self, step: int, micro_step: int, rank: int) -> list[int]:
        first = step * self.global_batch + (micro_step * self.world + rank) * self.micro
        return [self._at(first + j) for j in range(self.micro)]

    def _at(self, position: int) -> int:
        epoch, offset = divmod(position, self.n)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._epoch = torch.randperm(self.n, generator=g), epoch
        return int(self._perm[offset])


def site_generator(seed: int, step: int, micro_step: int, rank: int) -> torch.Generator:
    """The site draw of one micro-batch, independent of everything before it."""
    # hash() of a tuple of ints is the same in every process (no hash randomisation for ints).
    return torch.Generator().manual_seed(hash((seed, step, micro_step, rank)) & (2**63 - 1))
