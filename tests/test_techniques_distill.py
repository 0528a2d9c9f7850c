"""Distillation: the student moves toward the teacher, and on SmolLM2 it recovers perplexity (a
`quality` test: pytest -m quality)."""

from __future__ import annotations

import pytest


def test_distillation_lowers_the_loss_to_the_teacher(tiny_bench):
    # A degraded student: the tiny model quantized to 2 bits, decompressed, then distilled from
    # the full-precision tiny model. Its KL to the teacher must fall.
    student = tiny_bench.build("rtn", {"bits": 2, "group_size": 32})
    distilled = tiny_bench.build("distill", {"steps": 20, "learning_rate": 1e-3, "batch_size": 4}, model=student.as_model())
    facts = distilled.facts
    assert facts["loss_end"] < facts["loss_start"]
    assert facts["student_layers"] == facts["teacher_layers"] == 2
    assert facts["reload_rel_err"] <= 1e-3
    assert facts["tokens_seen"] == 20 * 4 * 64


@pytest.mark.quality
def test_distilled_student_beats_itself_before_distillation_on_smollm2(smol_bench):
    # Student: SmolLM2-135M with 4 of its 30 layers dropped (least important, measured on the
    # calibration windows); 16 steps x batch 2 x 256 tokens of distillation: the whole test takes
    # ~100 s here, where 40 steps x batch 4 took 426 s without testing more.
    dropped = smol_bench.build("drop_layers", {"n_layers": 4})
    distilled = smol_bench.build("distill", {"steps": 16, "learning_rate": 1e-4, "batch_size": 2}, model=dropped.as_model())
    before, after = smol_bench.evaluate(dropped), smol_bench.evaluate(distilled)
    assert after.ppl < before.ppl
    assert distilled.facts["student_layers"] == 26
