"""Knowledge distillation: train the stage's input (the student) to match the base model (teacher).

The student is whatever the previous stage produced — a layer-dropped or pruned copy of the
teacher, usually — and is trained on the recipe's calibration windows to match the teacher's
next-token distribution (KL divergence at a temperature, Hinton et al. 2015), optionally also its
last hidden state. Plain torch training loop: the same code runs on CPU here and on a GPU worker.
"""

from __future__ import annotations

import time
from importlib.metadata import version

from pydantic import BaseModel, ConfigDict, Field

from byoai.memory import trains_student
from byoai.progress import advance
from byoai.tasks.techniques import BuildInputs, BuildResult, Technique, TechniqueError


class DistillConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(default=30, ge=1)
    learning_rate: float = Field(default=5e-5, gt=0, lt=1)
    batch_size: int = Field(default=4, ge=1)
    # Softened distributions carry the teacher's "dark knowledge"; the loss is scaled by T^2 so
    # gradient sizes do not depend on T.
    temperature: float = Field(default=2.0, gt=0)
    # Weight of the MSE between the student's and the teacher's last hidden states (0 = logits only).
    hidden_weight: float = Field(default=0.0, ge=0)
    weight_decay: float = Field(default=0.0, ge=0)
    seed: int = 0


def distillation_loss(student_out, teacher_out, config: DistillConfig):
    import torch.nn.functional as F

    t = config.temperature
    student_logp = F.log_softmax(student_out.logits.float() / t, dim=-1)
    teacher_logp = F.log_softmax(teacher_out.logits.float() / t, dim=-1)
    loss = F.kl_div(student_logp, teacher_logp, log_target=True, reduction="batchmean") * t * t
    loss = loss / student_out.logits.shape[1]  # batchmean sums over positions: make it per token
    if config.hidden_weight:
        loss = loss + config.hidden_weight * F.mse_loss(student_out.hidden_states[-1], teacher_out.hidden_states[-1])
    return loss


def distill(inputs: BuildInputs, config: DistillConfig, prepare=None):
    """Train the stage input against the base model; return (student, tokenizer, facts).

    `prepare(student)` changes the student before training (e.g. quantization-aware training
    puts its weights behind a fake quantizer)."""
    import torch

    from byoai.tasks.techniques.io import checkpoint_dtype, load_model, load_stage_input

    # The student trains in float32 (AdamW on bf16 weights loses small updates); it is saved back
    # in the input's dtype. The teacher only runs forward: its own dtype.
    student, tokenizer = load_stage_input(inputs.model_dir, dtype="float32")
    teacher, _ = load_model(inputs.base_model_dir)
    if student.config.vocab_size != teacher.config.vocab_size:
        raise TechniqueError(
            f"student vocabulary ({student.config.vocab_size}) differs from the teacher's "
            f"({teacher.config.vocab_size}): distillation matches next-token distributions, so both "
            "must share the tokenizer"
        )
    if config.hidden_weight and student.config.hidden_size != teacher.config.hidden_size:
        raise TechniqueError("params.hidden_weight needs equal hidden sizes; set it to 0 for this student")
    if prepare is not None:
        prepare(student)
    device = torch.device(inputs.device)
    student.to(device).train()
    teacher.to(device).eval()
    windows = inputs.calibration_ids
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    want_hidden = bool(config.hidden_weight)

    losses = []
    started = time.perf_counter()
    for step in range(config.steps):
        batch = windows[torch.randint(len(windows), (config.batch_size,), generator=generator)].to(device)
        with torch.no_grad():
            teacher_out = teacher(batch, output_hidden_states=want_hidden)
        student_out = student(batch, output_hidden_states=want_hidden)
        loss = distillation_loss(student_out, teacher_out, config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        advance(step + 1, config.steps, "steps")
    train_s = time.perf_counter() - started

    student.eval()
    head = max(1, len(losses) // 5)  # mean of the first and last fifth: one step is too noisy
    facts = {
        "format": "safetensors",
        "library": f"torch {version('torch')}",
        "teacher": str(inputs.base_model_dir),
        "student_layers": student.config.num_hidden_layers,
        "teacher_layers": teacher.config.num_hidden_layers,
        "loss_start": sum(losses[:head]) / head,
        "loss_end": sum(losses[-head:]) / head,
        "train_s": round(train_s, 2),
        "tokens_seen": config.steps * config.batch_size * windows.shape[1],
        "train_dtype": "float32",
        "saved_dtype": checkpoint_dtype(inputs.model_dir),
    }
    return student, tokenizer, facts


def run(inputs: BuildInputs) -> BuildResult:
    from byoai.tasks.techniques.io import saved

    import torch

    student, tokenizer, facts = distill(inputs, inputs.config)
    return saved(student.to(getattr(torch, facts["saved_dtype"])), tokenizer, inputs, facts=facts)


TECHNIQUE = Technique(
    name="distill",
    quantizes=False,
    summary="knowledge distillation of the stage input (student) from the base model (teacher)",
    config=DistillConfig,
    footprint=trains_student(),
    run=run,
    devices=frozenset({"cpu", "cuda"}),
    needs_calibration=True,
)
