"""The lm-eval adapter: its requests go through the same augmented scorer and generator."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e .[eval])")

from lm_eval.api.instance import Instance  # noqa: E402

from pipeline.dual import augment_and_generate, load_dual  # noqa: E402
from pipeline.eval.lm_eval_adapter import DualLM  # noqa: E402
from pipeline.eval.multiple_choice import encode_pair  # noqa: E402

from .test_multiple_choice import brute_force_ll  # noqa: E402


def _req(kind: str, args: tuple) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_loglikelihood_and_generation_augment(exports, gpt2_tokenizer_dir):
    lm = DualLM(pretrained=str(exports["liu"]), tokenizer=str(gpt2_tokenizer_dir), batch_size=2, device="cpu")
    pairs = [("Question: What is 2 + 2?\nAnswer:", " 4"), ("The sky is", " blue today"), ("Hello", " world")]
    got = lm.loglikelihood([_req("loglikelihood", p) for p in pairs])
    dual = load_dual(exports["liu"])
    for (ctx, cont), (ll, greedy) in zip(pairs, got, strict=True):
        assert ll == pytest.approx(brute_force_ll(dual, *encode_pair(lm.tok, ctx, cont), augment=True), abs=1e-4)
        assert isinstance(greedy, bool)
    [text] = lm.generate_until([_req("generate_until", ("Once upon a time", {"until": ["\n\n"], "max_gen_toks": 5}))])
    ids = torch.tensor([lm.tok.encode_batch(["Once upon a time"])[0]])
    new = augment_and_generate(dual, ids, max_new_tokens=5, temperature=0, eos_token_id=lm.tok.eos_id)[0].tolist()
    assert text == lm.tok.decode(new).split("\n\n")[0]


def test_rolling_loglikelihood_of_a_plain_base_is_the_document_loglikelihood(exports, gpt2_tokenizer_dir):
    lm = DualLM(pretrained=str(exports["hf_base"]), tokenizer=str(gpt2_tokenizer_dir), device="cpu")
    text = " ".join(["The quick brown fox jumps over the lazy dog."] * 30)  # > 128 tokens: several windows
    ids = lm.tok.encode_batch([text])[0]
    assert len(ids) > lm.model.max_positions
    [total] = lm.loglikelihood_rolling([_req("loglikelihood_rolling", (text,))])
    # brute force: each of lm-eval's disjoint windows as one plain forward over context + continuation
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    base, want, n = lm.model.dual.base, 0.0, lm.model.last_site(1) + 1
    windows = [make_disjoint_window(w) for w in get_rolling_token_windows(ids, lm.tok.eos_id, n, 1)]
    assert len(windows) > 1 and sum(len(c) for _, c in windows) == len(ids)
    with torch.no_grad():
        for ctx, cont in windows:
            logp = base(torch.tensor([ctx + cont])).logits[0].log_softmax(-1)
            want += float(sum(logp[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))
    assert total == pytest.approx(want, rel=1e-4)
    # a text within one window: the plain log-likelihood of the document after EOS
    short = lm.tok.encode_batch(["The quick brown fox."])[0]
    [ll] = lm.loglikelihood_rolling([_req("loglikelihood_rolling", ("The quick brown fox.",))])
    with torch.no_grad():
        logp = base(torch.tensor([[lm.tok.eos_id] + short])).logits[0].log_softmax(-1)
    assert ll == pytest.approx(float(sum(logp[i, t] for i, t in enumerate(short))), rel=1e-5)


def test_lm_eval_runs_a_task_with_the_adapter(exports, gpt2_tokenizer_dir, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    data = tmp_path / "piqa.jsonl"
    data.write_text("".join(json.dumps({"goal": f"To do thing {i},", "sol1": "use a tool.", "sol2": "wait.",
                                        "label": i % 2}) + "\n" for i in range(4)))
    (tmp_path / "t.yaml").write_text(
        f"task: local_piqa\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        'test_split: test\noutput_type: multiple_choice\ndoc_to_text: "Question: {{goal}}\\nAnswer:"\n'
        'doc_to_target: label\ndoc_to_choice: "{{[sol1, sol2]}}"\nmetric_list:\n  - metric: acc\n')
    out = simple_evaluate(model="latent-dual", model_args=f"pretrained={exports['liu']},tokenizer={gpt2_tokenizer_dir}",
                          tasks=["local_piqa"], task_manager=TaskManager(include_path=str(tmp_path)), device="cpu")
    assert out["results"]["local_piqa"]["acc,none"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    assert out["config"]["model"] == "latent-dual"
