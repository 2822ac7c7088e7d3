"""lm-evaluation-harness adapter: our exports as the `lm_eval` model `latent-dual`.

    python -m pipeline.eval.lm_eval_adapter --model latent-dual \\
        --model_args pretrained=runs/liu/export,tokenizer=../shared/data/tokenizers/gpt2 \\
        --tasks hellaswag,arc_easy --device cpu --batch_size 16

(lm-eval 0.4 has no plugin entry point for models, so this module registers the class
and then hands the command line to lm-eval's own CLI.) With augmentation as everywhere
in the evaluation stage: the Coprocessor runs once at the end of each context.

- loglikelihood: `score_requests` (site at the context end, k = continuation length);
- loglikelihood_rolling: lm-eval's disjoint rolling windows, each scored as above;
- generate_until: augment at the end of the prompt, greedy, cut at the `until` strings.

A plain Hugging Face directory works too (no augmentation), but lm-eval's own `hf`
model already covers those. Needs the optional `eval` extra (lm-eval, accelerate).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from pipeline.eval.gsm8k import cut_at_stop
from pipeline.eval.models import fit_prompts, load_eval_model, resolve_tokenizer
from pipeline.eval.multiple_choice import encode_pair, score_requests

NAME = "latent-dual"


@register_model(NAME)
class DualLM(LM):
    def __init__(self, pretrained: str, tokenizer: str | None = None, device: str | None = None,
                 batch_size: int | str | None = 16, max_gen_toks: int = 256, dtype: str = "float32",
                 **_: Any) -> None:
        super().__init__()
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
        self.model = load_eval_model(pretrained, device=device, dtype=dt)
        self.tok = resolve_tokenizer([self.model], tokenizer)
        self.batch_size = int(batch_size) if str(batch_size or "").isdigit() else 16
        self.max_gen_toks = int(max_gen_toks)

    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        return score_requests(self.model, pairs, batch_size=self.batch_size, pad_id=self.tok.eos_id)

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [encode_pair(self.tok, *req.args) for req in requests]
        return self._score(pairs)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        window = self.model.last_site(1) + 1  # context + continuation of every window fits
        pairs, owner = [], []
        for i, req in enumerate(requests):
            ids = self.tok.encode_batch([req.args[0]])[0]
            for w in get_rolling_token_windows(ids, self.tok.eos_id, window, 1):
                pairs.append(make_disjoint_window(w))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, self._score(pairs), strict=True):
            totals[i] += ll
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in requests:
            context, kwargs = req.args
            until = kwargs.get("until", [])
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            ids = self.tok.encode_batch([context])[0] or [self.tok.eos_id]
            (ids,), _ = fit_prompts(self.model, [ids], max_new, flag="max_gen_toks")  # left-truncated, as lm-eval
            new = self.model.generate(torch.tensor([ids]), max_new_tokens=max_new,
                                      eos_token_id=self.tok.eos_id)[0].tolist()
            if self.tok.eos_id in new:
                new = new[: new.index(self.tok.eos_id)]
            out.append(cut_at_stop(self.tok.decode(new), tuple(until)) if until else self.tok.decode(new))
        return out


def main(argv: list[str] | None = None) -> None:
    """lm-eval's CLI with `latent-dual` registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
