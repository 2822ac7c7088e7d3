"""Multiple choice: equal to brute-force per-choice log-likelihoods, and to lm-eval's acc."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from pipeline.data.tokenizer import load_tokenizer
from pipeline.dual import load_dual
from pipeline.dual.reference import naive_loss
from pipeline.errors import PipelineError
from pipeline.eval import multiple_choice as mc
from pipeline.eval.models import load_eval_model
from pipeline.eval.runner import run_mc

ROWS = {
    "hellaswag": [
        {"activity_label": "Baking cookies", "ctx_a": "A woman puts dough on a tray.", "ctx_b": "she",
         "endings": ["puts the tray in the oven.", "eats the [title] tray.", "runs away fast.", "sings."], "label": 0},
        {"activity_label": "Running", "ctx_a": "A man laces his shoes.", "ctx_b": "then he",
         "endings": ["starts jogging down the road.", "sleeps.", "cooks pasta for dinner tonight.", "flies."],
         "label": 0},
    ],
    "arc_easy": [
        {"id": "q1", "question": {"stem": "Which is a liquid at room temperature?", "choices": [
            {"text": "water", "label": "A"}, {"text": "iron", "label": "B"}, {"text": "salt", "label": "C"}]},
         "answerKey": "A"},
        {"id": "q2", "question": "What do plants need to make food?",  # the Hugging Face row layout
         "choices": {"text": ["sunlight", "darkness", "sand", "plastic"], "label": ["1", "2", "3", "4"]},
         "answerKey": "1"},
    ],
    "piqa": [
        {"goal": "To open a jar,", "sol1": "twist the lid.", "sol2": "freeze the jar for a week.", "label": 0},
        {"goal": "To dry wet hands,", "sol1": "use a towel.", "sol2": "use a glass of water.", "label": 0},
    ],
    "siqa": [
        {"context": "Alex gave Sam a gift.", "question": "How would Sam feel?", "answerA": "grateful",
         "answerB": "angry", "answerC": "sleepy", "label": "1"},
        {"context": "Jo missed the bus.", "question": "What will Jo do next?", "answerA": "fly",
         "answerB": "wait for the next bus", "answerC": "swim", "label": "2"},
    ],
    "winogrande": [
        {"sentence": "The trophy did not fit in the case because the _ was too big.", "option1": "trophy",
         "option2": "case", "answer": "1"},
        {"sentence": "Anna helped Beth because _ was kind.", "option1": "Anna", "option2": "Beth", "answer": "1"},
    ],
}


def write_tasks(root: Path) -> dict[str, str]:
    files = {}
    for task, rows in ROWS.items():
        path = root / f"{task}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        files[task] = str(path)
    return files


def brute_force_ll(dual, ctx: list[int], cont: list[int], augment: bool) -> float:
    """log p(cont | ctx), one request at a time: the per-site reference, or a plain Base forward."""
    x = torch.tensor([ctx + cont])
    if augment:
        saved = dual.config
        dual.config = dataclasses.replace(saved, n_ahead=len(cont))
        try:
            with torch.no_grad():
                return -float(naive_loss(dual, x, torch.tensor([[len(ctx) - 1]]))) * len(cont)
        finally:
            dual.config = saved
    with torch.no_grad():
        logp = dual.base(x).logits[0].log_softmax(-1)
    return float(sum(logp[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))


@pytest.mark.parametrize("variant", ["liu", "h1", "hf_base"])
def test_scores_equal_brute_force(variant, exports, gpt2_tokenizer_dir, tmp_path):
    tok = load_tokenizer(gpt2_tokenizer_dir)
    model = load_eval_model(exports[variant])
    dual = load_dual(exports[variant]) if variant != "hf_base" else model.dual
    files = write_tasks(tmp_path)
    for task, path in files.items():
        docs = mc.read_task(task, path)
        res = mc.evaluate_docs(model, tok, docs, batch_size=3)  # batches mix questions and lengths
        acc, acc_norm = [], []
        for doc, lls in zip(docs, res["loglikelihoods"], strict=True):
            want = [brute_force_ll(dual, *mc.encode_pair(tok, c, x), augment=variant != "hf_base")
                    for c, x in zip(doc.contexts, doc.continuations, strict=True)]
            assert lls == pytest.approx(want, rel=1e-4, abs=1e-4), task
            acc.append(float(max(range(len(want)), key=lambda i: want[i]) == doc.gold))
            if doc.norm_lengths:
                norm = [w / len(x.strip()) for w, x in zip(want, doc.continuations, strict=True)]
                acc_norm.append(float(max(range(len(norm)), key=lambda i: norm[i]) == doc.gold))
        assert res["acc"] == pytest.approx(sum(acc) / len(acc))
        if task == "winogrande":
            assert "acc_norm" not in res
        else:
            assert res["acc_norm"] == pytest.approx(sum(acc_norm) / len(acc_norm))


def test_context_variants_and_encoding(gpt2_tokenizer_dir, tmp_path):
    files = write_tasks(tmp_path)
    hs = mc.read_task("hellaswag", files["hellaswag"])[0]
    assert hs.contexts[0] == "Baking cookies: A woman puts dough on a tray. She"
    assert hs.continuations[1] == " eats the. tray."  # lm-eval's hellaswag preprocessing
    wg = mc.read_task("winogrande", files["winogrande"])[0]
    assert wg.contexts == ["The trophy did not fit in the case because the trophy",
                           "The trophy did not fit in the case because the case"]
    assert wg.continuations == [" was too big."] * 2 and wg.gold == 0
    assert mc.read_task("siqa", files["siqa"])[1].gold == 1  # labels are 1-based
    tok = load_tokenizer(gpt2_tokenizer_dir)
    ctx, cont = mc.encode_pair(tok, "Answer: ", "yes")  # the trailing space moves to the continuation
    assert tok.decode(ctx) == "Answer:" and tok.decode(cont) == " yes"


def test_piqa_labels_from_sibling_file(tmp_path):
    rows = [{"goal": "g", "sol1": "a", "sol2": "b"}] * 2
    (tmp_path / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "valid-labels.lst").write_text("1\n0\n")
    assert [d.gold for d in mc.read_task("piqa", tmp_path / "valid.jsonl")] == [1, 0]


@pytest.mark.parametrize("task,line,missing", [
    ("hellaswag", {"activity_label": "x", "ctx_a": "a", "ctx_b": "b", "label": 0}, "endings"),
    ("arc_easy", {"question": {"stem": "s", "choices": []}}, "answerKey"),
    ("piqa", {"goal": "g", "sol1": "a", "label": 0}, "sol2"),
    ("siqa", {"context": "c", "question": "q", "answerA": "a", "answerB": "b", "answerC": "c"}, "label"),
    ("winogrande", {"sentence": "a _ b", "option1": "x", "answer": "1"}, "option2"),
])
def test_malformed_file_names_file_line_and_field(task, line, missing, tmp_path):
    path = tmp_path / f"{task}.jsonl"
    path.write_text(json.dumps(ROWS[task][0]) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(PipelineError) as e:
        mc.read_task(task, path)
    assert f"{path}:2" in str(e.value) and repr(missing) in str(e.value)
    path.write_text("{not json\n")
    with pytest.raises(PipelineError, match=f"{path}:1: not valid JSON"):
        mc.read_task(task, path)


def test_run_mc_writes_results(exports, gpt2_tokenizer_dir, tmp_path):
    files = write_tasks(tmp_path)
    model = load_eval_model(exports["liu"])  # tokenizer found through the export's data manifest
    res = run_mc([model], {"piqa": files["piqa"], "winogrande": files["winogrande"]}, out=tmp_path / "o", limit=1)
    assert res["results"]["liu"]["piqa"]["n"] == 1
    md = (tmp_path / "o" / "multiple_choice.md").read_text()
    assert "piqa acc" in md and "| liu |" in md


LM_EVAL_TASKS = {
    "piqa": ('doc_to_text: "Question: {{goal}}\\nAnswer:"\ndoc_to_target: label\n'
             'doc_to_choice: "{{[sol1, sol2]}}"\n'),
    "siqa": ('doc_to_text: "Q: {{context}} {{question}}\\nA:"\ntarget_delimiter: " "\n'
             'doc_to_choice: "{{[answerA, answerB, answerC]}}"\ndoc_to_target: "{{ (label|int) - 1 }}"\n'),
    "arc_easy": ('doc_to_text: "Question: {{question}}\\nAnswer:"\n'
                 'doc_to_target: "{{choices.label.index(answerKey)}}"\ndoc_to_choice: "{{choices.text}}"\n'),
}


def test_acc_equals_lm_eval_harness(exports, gpt2_tokenizer_dir, tmp_path):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e .[eval])")
    pytest.importorskip("accelerate", reason="lm-eval's HF model needs accelerate (pip install -e .[eval])")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    rows = dict(ROWS)
    rows["arc_easy"] = [ROWS["arc_easy"][1], {**ROWS["arc_easy"][1], "answerKey": "2"}]  # HF row layout only
    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    files = {}
    for task, body in LM_EVAL_TASKS.items():
        data = tmp_path / f"{task}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows[task] * 3))
        files[task] = str(data)
        (tasks_dir / f"{task}.yaml").write_text(
            f"task: local_{task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"test_split: test\noutput_type: multiple_choice\n{body}"
            "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    lm = HFLM(pretrained=str(exports["hf_base"] / ""), tokenizer=str(gpt2_tokenizer_dir), batch_size=4,
              device="cpu")
    out = simple_evaluate(model=lm, tasks=[f"local_{t}" for t in LM_EVAL_TASKS],
                          task_manager=TaskManager(include_path=str(tasks_dir)), log_samples=True)
    ours = run_mc([load_eval_model(exports["hf_base"])], files, out=tmp_path / "o",
                  tokenizer=str(gpt2_tokenizer_dir))["results"]["hf_base"]
    tok = load_tokenizer(gpt2_tokenizer_dir)
    model = load_eval_model(exports["hf_base"])
    for task in LM_EVAL_TASKS:
        theirs = out["results"][f"local_{task}"]
        assert ours[task]["acc"] == pytest.approx(theirs["acc,none"]), task
        assert ours[task]["acc_norm"] == pytest.approx(theirs["acc_norm,none"]), task
        # and the per-choice log-likelihoods themselves
        lls = mc.evaluate_docs(model, tok, mc.read_task(task, files[task]))["loglikelihoods"]
        samples = sorted(out["samples"][f"local_{task}"], key=lambda s: s["doc_id"])
        for mine, s in zip(lls, samples, strict=True):
            assert mine == pytest.approx([r[0][0] for r in s["resps"]], abs=1e-3)
