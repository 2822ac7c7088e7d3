"""Model FLOPs and MFU: the one definition every benchmark and the trainer share.

Model FLOPs are the arithmetic the model needs, not what a kernel happens to
execute: recomputation (activation checkpointing) is not counted, and neither
are query-key pairs an attention kernel computes only to mask them out.

    model FLOPs = matmul FLOPs + attention FLOPs

Matmul: one multiply-add is 2 FLOPs. A token through a matmul with N parameters
costs 2N forward, 2N for the gradient of its input and 2N for the gradient of
the weights; so a trained layer costs 6N per token, a frozen layer that still
passes gradients back 4N, and a forward-only one 2N.

Attention: per layer and head, each query-key pair the mask lets through costs
2 d_qk (a row of Q K^T) + 2 d_v (a column of P V) forward; backward costs twice
the forward (dV = P^T dO and dP = dO V^T, then dQ = dS K and dK = dS^T Q). A causal sequence of T tokens
has T (T + 1) / 2 visible pairs, half what the PaLM count (12 L T d per token,
every pair) credits, so figures computed here are lower than PaLM/nanoGPT ones
for the same run.

MFU is achieved model FLOP/s over the dense bf16 peak of all devices used.
"""

from __future__ import annotations

import torch

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}
"""Dense bf16 peaks (no sparsity) in TFLOP/s by GPU name substring, first match wins."""
ATTENTION_BACKWARD_FACTOR = 2
"""Backward attention FLOPs per pair, as a multiple of the forward ones."""


def peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    """Dense bf16 peak of one `device` in TFLOP/s: `override` if given, else the table entry
    for a CUDA GPU's name; None when unknown (every CPU: no peak there is reliable)."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def matmul_flops(n_params: int, tokens: int, *, forward: bool = True, input_grad: bool = False,
                 weight_grad: bool = False) -> float:
    """FLOPs of `tokens` tokens through matmuls holding `n_params` parameters: 2 N per token
    for each of the forward, the input gradient and the weight gradient that is asked for."""
    return float(2 * n_params * tokens * (int(forward) + int(input_grad) + int(weight_grad)))


def attention_pair_flops(d_qk: int, d_v: int | None = None) -> int:
    """Forward FLOPs of one head on one visible query-key pair: 2 d_qk (Q K^T) + 2 d_v (P V)."""
    return 2 * (d_qk + (d_qk if d_v is None else d_v))


def attention_flops(pairs: int, *, n_layer: int, n_head: int, head_dim: int, backward: bool = False) -> float:
    """Attention FLOPs for `pairs` visible query-key pairs per layer and head (summed over the
    batch), over `n_layer` layers of `n_head` heads; forward, or forward + backward."""
    per_pair = attention_pair_flops(head_dim) * (1 + (ATTENTION_BACKWARD_FACTOR if backward else 0))
    return float(pairs * n_layer * n_head * per_pair)


def causal_pairs(q_len: int, k_len: int | None = None) -> int:
    """Visible pairs of a causal mask, bottom-right aligned: with `k_len - q_len` prefix keys
    (a cache) before the queries, query i sees `k_len - q_len + i + 1` keys."""
    k_len = q_len if k_len is None else k_len
    if k_len < q_len:
        raise ValueError(f"causal_pairs: k_len {k_len} < q_len {q_len}; the queries' own keys are missing")
    return q_len * (k_len - q_len) + q_len * (q_len + 1) // 2


def training_flops_per_token(n_matmul_params: int, n_layer: int, n_head: int, head_dim: int,
                             seq_len: int) -> float:
    """Forward + backward FLOPs per token of a plain causal-LM step on `seq_len`-token
    sequences: 6 N + causal attention forward + backward, averaged over the sequence."""
    weights = matmul_flops(n_matmul_params, 1, forward=True, input_grad=True, weight_grad=True)
    attention = attention_flops(causal_pairs(seq_len), n_layer=n_layer, n_head=n_head, head_dim=head_dim,
                                backward=True)
    return weights + attention / seq_len


def mfu(tflops_achieved: float, peak: float | None, world: int) -> float | None:
    """Model FLOPs utilisation: `tflops_achieved` (summed over all `world` devices) over
    `world` x the per-device `peak`; None without a peak."""
    return tflops_achieved / (peak * world) if peak else None
