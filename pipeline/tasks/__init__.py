"""Reasoning-task data (DESIGN.md §5): one schema, loaders, generators, checkers, verifiers.

    from pipeline.tasks import schema, format, gsm8k, prosqa, countdown, verify
    gsm8k.load_gsm8k("valid")                                  # seeded 500 carved from train
    prosqa.load_prosqa("test"); prosqa.generate_prosqa(17886, seed=0, preset="full", exclude=official)
    prosqa.check_prosqa(example)                               # [] when sound
    countdown.generate_countdown("train", operands=4)          # 262,144 solvable instances
    schema.save_examples("x.json", examples); schema.load_examples("x.json")
    format.prompt_text(ex) + format.target_text(ex, cot=True)  # "question\\nstep\\n...### answer"
    verify.score("countdown", ex, generated_text)              # 1.0 / 0.1 / 0.0

`data-prep tasks {gsm8k,prosqa,countdown}` is the CLI. Submodules are imported on use:
`gsm8k` reads through `pipeline.eval.gsm8k` (torch); the others need only the standard library.
"""
