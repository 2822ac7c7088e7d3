"""Training-step time of an LTM against a plain causal LM of equal non-embedding size.

    python -m pipeline.ltm.benchmark --preset ltm-tiny --vocab 4000 --batch 8 --seq-len 128 --steps 16

Prints, per optimizer step (median of `--repeats` after one warm-up): the LTM's inner loop
(T_fast forward + input-gradient passes), its slow pass (forward + full backward), their sum,
and a plain Llama-family LM's forward + backward on the same batch, whose SwiGLU width is
chosen so its non-embedding matmul parameters match the LTM's (the LTM's cross-attention
weights included); then FLOPs per token: paper 003 §2.4's count ((T_fast + 1) x 3 forward),
what runs (inner passes without weight gradients), and the plain LM's (`pipeline.flops`).
No optimizer step is timed (the same AdamW update for both). Figures, not a test.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pipeline.flops import training_flops_per_token
from pipeline.ltm.inference import InferenceConfig, draw_noise, elbo_terms, infer, sequence_seeds
from pipeline.ltm.model import LTMDecoder, ltm_preset, next_token_targets
from pipeline.ltm.task import paper_trflops_per_token, run_flops_per_token
from pipeline.models import build_model, preset


def matched_lm(ltm: LTMDecoder):
    """A Llama-family LM with the LTM's width, depth, heads and vocabulary, SwiGLU widened to
    carry the same non-embedding matmul parameters (the cross-attention's 4 d^2 per layer)."""
    c = ltm.config
    d_ff = c.d_ff + round(4 * c.d_model * c.d_model / (3 * c.d_model))
    return build_model(preset("llama-tiny", vocab_size=c.vocab_size, d_model=c.d_model, n_layer=c.n_layer,
                              n_head=c.n_head, n_kv_head=c.n_head, d_ff=d_ff, tie_word_embeddings=True,
                              max_position_embeddings=c.max_position_embeddings))


def _time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(preset_name: str, vocab: int, batch: int, seq_len: int, steps: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    ltm = LTMDecoder(ltm_preset(preset_name, vocab_size=vocab))
    lm = matched_lm(ltm)
    x = torch.randint(0, vocab, (batch, seq_len))
    cfg = InferenceConfig(steps=steps)
    noise = draw_noise(sequence_seeds(0, 0, 0, 0, batch), steps + 1, ltm.config.latent_shape)
    post = infer(ltm, x, cfg, noise)

    def slow():
        terms = elbo_terms(ltm, x, post.mu, post.logvar, noise[steps])
        ((terms.nll + terms.kl) / terms.tokens).mean().backward()

    def plain():
        logits = lm(x).logits
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), next_token_targets(x).flatten(),
                                          ignore_index=-100).backward()

    t_inner = _time(lambda: infer(ltm, x, cfg, noise), repeats)
    t_slow, t_plain = _time(slow, repeats), _time(plain, repeats)
    mc, lc = ltm.config, lm.config
    body = lambda m: m.num_params(matmul_only=True) - m.config.vocab_size * m.config.d_model  # noqa: E731
    return {"inner_s": t_inner, "slow_s": t_slow, "ltm_step_s": t_inner + t_slow, "plain_step_s": t_plain,
            "ratio": (t_inner + t_slow) / t_plain, "ltm_body_params": body(ltm), "plain_body_params": body(lm),
            "paper_trflops_per_token": paper_trflops_per_token(mc, seq_len, steps),
            "run_flops_per_token": run_flops_per_token(mc, seq_len, steps),
            "plain_flops_per_token": training_flops_per_token(lm.num_params(matmul_only=True), lc.n_layer, lc.n_head,
                                                              lc.head_dim, seq_len)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="ltm-tiny")
    ap.add_argument("--vocab", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=16, help="T_fast")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    r = run(args.preset, args.vocab, args.batch, args.seq_len, args.steps, args.repeats)
    print(f"{args.preset}, batch {args.batch} x {args.seq_len}, T_fast = {args.steps}, {torch.get_num_threads()} threads")
    print(f"  non-embedding matmul params: LTM {r['ltm_body_params']:,}, plain LM {r['plain_body_params']:,}")
    print(f"  LTM step {r['ltm_step_s'] * 1e3:.0f} ms = inner {r['inner_s'] * 1e3:.0f} ms + slow {r['slow_s'] * 1e3:.0f} ms;"
          f" plain LM {r['plain_step_s'] * 1e3:.0f} ms; ratio {r['ratio']:.1f}x")
    print(f"  FLOPs/token: paper 003 §2.4 {r['paper_trflops_per_token'] / 1e6:.1f}M, as run "
          f"{r['run_flops_per_token'] / 1e6:.1f}M, plain LM {r['plain_flops_per_token'] / 1e6:.1f}M")


if __name__ == "__main__":
    main()
