"""Evaluation stage (DESIGN.md §1 step 4, §3 "Inference", "Per-site dump").

    from pipeline.eval.models import load_eval_model      # export dir or plain HF checkpoint
    from pipeline.eval import ppl, multiple_choice, gsm8k, runner
    runner.run_ppl_at_k([model], out="eval/")              # ppl of the k-th token after augmentation
    multiple_choice.read_task("hellaswag", "hellaswag_val.jsonl")
    gsm8k.extract_answer("... #### 1,234")                 # -> "1234"

`launchers/evaluate.py` is the CLI; `pipeline.eval.lm_eval_adapter` registers the dual
model with lm-evaluation-harness (optional `eval` extra); `pipeline.eval.benchmark`
prints sites/s and questions/s.
"""
