"""The latent curriculum (paper `000` App. B, after Coconut): which steps become latents when.

    cur = Curriculum(CurriculumConfig(latents_per_step=1, epochs_per_stage=5, max_stage=6))
    cur.stage(epoch)                    # 0, 0, 0, 0, 0, 1, ... up to max_stage
    cur.n_latents(stage)                # stage * c
    view = cur.view(example, stage)     # what the model reads and writes at that stage

At stage k the first k reasoning steps of an example are removed and k·c latents stand in
their place; the model is trained only on the remaining language tokens (the remaining
steps, "### answer", EOS), never on the question or the latents. At the last stage
(k = max_stage) *all* steps are removed, however many an example has, and the number of
latents stays max_stage·c: every example of a batch has the same number of latents at
every stage, so the dual models run one Coprocessor pass per batch, and evaluation uses
the final stage's count (`n_latents(max_stage)`). An example with fewer steps than k
(before the last stage) loses all its steps and still gets k·c latents (Coconut does the
same unless told to cap the count).

Countdown trains without curriculum (`schedule: none`): one stage, all steps removed,
`n_latents` latents throughout.

Stage of a step: the epoch of the step's first example, `step * global_batch // n`; so
every micro-batch of a step (and every rank) is at the same stage, and the stage is a pure
function of the step (exact resume). `reset_optimizer` (Coconut builds a new optimizer per
stage) clears the optimizer's moments at the first step of each new stage.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from pipeline.errors import PipelineError
from pipeline.tasks.format import ANSWER_MARK, answer_text, prompt_text


@dataclasses.dataclass
class CurriculumConfig:
    schedule: Literal["staged", "none"] = "staged"
    """staged: Coconut's curriculum; none: one stage, all steps latent (Countdown, paper `000` §4.2)."""
    latents_per_step: int = 1
    """c: latents per removed step (GSM8K 2, ProsQA 1 in Coconut; `000` sweeps 1-4)."""
    epochs_per_stage: int = 5
    """Epochs spent at each stage before the next (GSM8K 3, ProsQA 5)."""
    max_stage: int = 6
    """The last stage: all steps latent, max_stage·c latents (GSM8K 3, ProsQA 6)."""
    first_stage: int | None = None
    """Stage of epoch 0. None = 0 when something trains at stage 0 (a plain CoT fine-tune of
    the model), 1 for dual variants with a frozen Base (nothing would train without latents)."""
    n_latents: int = 0
    """With schedule=none: N_L, the latents that replace all steps."""
    reset_optimizer: bool = True
    """Clear the optimizer's moments at each stage change (Coconut starts a new optimizer)."""

    def __post_init__(self) -> None:
        if self.schedule not in ("staged", "none"):
            raise PipelineError(f"curriculum.schedule={self.schedule!r}: expected staged or none")
        if self.schedule == "none":
            if self.n_latents < 1:
                raise PipelineError("curriculum.schedule=none needs curriculum.n_latents >= 1 "
                                    "(the latents that replace every step)")
            return
        for key in ("latents_per_step", "epochs_per_stage", "max_stage"):
            if getattr(self, key) < 1:
                raise PipelineError(f"curriculum.{key}={getattr(self, key)}: must be >= 1")
        if self.first_stage is not None and not 0 <= self.first_stage <= self.max_stage:
            raise PipelineError(f"curriculum.first_stage={self.first_stage}: must be in [0, max_stage="
                                f"{self.max_stage}]")


@dataclasses.dataclass(frozen=True)
class ExampleView:
    """One example as the model sees it at one stage."""

    prompt: str
    """The question and its newline: the context (no loss)."""
    n_latents: int
    """Latents after the prompt (0 at stage 0)."""
    target: str
    """The remaining steps, one a line, then "### " and the answer (the caller adds EOS)."""
    removed_steps: int


class Curriculum:
    def __init__(self, config: CurriculumConfig, *, stage_zero_trains: bool = True):
        self.config = config
        c = config
        if c.schedule == "none":
            self.first = self.last = 1
        else:
            self.first = c.first_stage if c.first_stage is not None else (0 if stage_zero_trains else 1)
            self.last = c.max_stage

    def stage(self, epoch: int) -> int:
        if self.config.schedule == "none":
            return 1
        return min(self.first + epoch // self.config.epochs_per_stage, self.last)

    def stage_at_step(self, step: int, global_batch: int, n_examples: int) -> int:
        return self.stage(step * global_batch // n_examples)

    def n_latents(self, stage: int) -> int:
        c = self.config
        return c.n_latents if c.schedule == "none" else stage * c.latents_per_step

    @property
    def final_latents(self) -> int:
        """Latents at the last stage: what evaluation uses."""
        return self.n_latents(self.last)

    def removed_steps(self, n_steps: int, stage: int) -> int:
        return n_steps if stage >= self.last else min(stage, n_steps)

    def view(self, example: dict[str, Any], stage: int) -> ExampleView:
        steps = example["steps"]
        k = self.removed_steps(len(steps), stage)
        target = "".join(s + "\n" for s in steps[k:]) + ANSWER_MARK + answer_text(example)
        return ExampleView(prompt_text(example), self.n_latents(stage), target, k)

    def describe(self) -> str:
        c = self.config
        if c.schedule == "none":
            return f"no curriculum: all steps -> {c.n_latents} latents"
        return (f"stages {self.first}..{self.last}, {c.epochs_per_stage} epochs each, "
                f"{c.latents_per_step} latents per step (final {self.final_latents})")
