"""The latent curriculum on hand-built examples: stage per epoch, what is removed, latent counts."""

import pytest

from pipeline.errors import PipelineError
from pipeline.tasks.curriculum import Curriculum, CurriculumConfig

EX = {"question": "Q?", "steps": ["a=1", "b=2", "c=3"], "answer": "6"}


def test_stage_per_epoch_prosqa_defaults():
    cur = Curriculum(CurriculumConfig(latents_per_step=1, epochs_per_stage=5, max_stage=6))
    assert [cur.stage(e) for e in (0, 4, 5, 9, 10, 29, 30, 100)] == [0, 0, 1, 1, 2, 5, 6, 6]
    assert cur.final_latents == 6


def test_stage_at_step_uses_the_steps_first_example():
    cur = Curriculum(CurriculumConfig(latents_per_step=2, epochs_per_stage=1, max_stage=3))
    # 10 examples, global batch 4: step 2 starts at example 8 (epoch 0), step 3 at 12 (epoch 1)
    assert [cur.stage_at_step(s, 4, 10) for s in range(6)] == [0, 0, 0, 1, 1, 2]


def test_frozen_base_starts_at_stage_one_unless_told():
    cfg = CurriculumConfig(latents_per_step=2, epochs_per_stage=3, max_stage=3)
    assert Curriculum(cfg, stage_zero_trains=False).stage(0) == 1
    assert Curriculum(CurriculumConfig(first_stage=0), stage_zero_trains=False).stage(0) == 0


def test_views_at_each_stage():
    cur = Curriculum(CurriculumConfig(latents_per_step=2, epochs_per_stage=1, max_stage=4))
    v0, v1, v3, v4 = (cur.view(EX, k) for k in (0, 1, 3, 4))
    assert v0.prompt == "Q?\n" and v0.n_latents == 0 and v0.target == "a=1\nb=2\nc=3\n### 6"
    assert v1.n_latents == 2 and v1.target == "b=2\nc=3\n### 6" and v1.removed_steps == 1
    assert v3.n_latents == 6 and v3.target == "### 6" and v3.removed_steps == 3
    # more stages than steps: every step gone, and the count of latents still k*c
    assert v4.n_latents == 8 and v4.target == "### 6"


def test_last_stage_removes_every_step_even_of_long_examples():
    cur = Curriculum(CurriculumConfig(latents_per_step=1, epochs_per_stage=1, max_stage=2))
    long = dict(EX, steps=["s1", "s2", "s3", "s4"])
    assert cur.view(long, 1).target == "s2\ns3\ns4\n### 6"
    assert cur.view(long, 2).target == "### 6" and cur.view(long, 2).n_latents == 2


def test_no_curriculum_is_one_stage_with_all_steps_latent():
    cur = Curriculum(CurriculumConfig(schedule="none", n_latents=4))
    assert {cur.stage(e) for e in range(10)} == {1}
    v = cur.view({"question": "use 3 4", "steps": ["3+4=7"], "answer": "3 + 4", "numbers": [3, 4], "target": 7}, 1)
    assert v.n_latents == 4 and v.target == "### <answer>3 + 4</answer>"


@pytest.mark.parametrize("bad", [dict(schedule="none"), dict(max_stage=0), dict(latents_per_step=0),
                                 dict(first_stage=9), dict(schedule="linear")])
def test_bad_config_is_refused(bad):
    with pytest.raises(PipelineError, match="curriculum"):
        CurriculumConfig(**bad)
