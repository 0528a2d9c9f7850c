"""plan_memory: every variant x target x runtime's peak memory, before anything loads.

The footprints are the techniques' and runtimes' own (byoai.memory); this module only adds them
up along each variant's chain, chooses where the gate's reference is measured, and decides how
many heavy steps may run at once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from byoai import hostmem
from byoai.memory import Capacity, ModelShape, PlanContext, PlanRow, VariantPlan, Windows, gb, shape_from_config, shape_from_gguf
from byoai.recipe import EmbeddedModel, GgufModel, HubModel, LocalModel, Recipe, StageSpec, TargetProfile, VariantSpec
from byoai.tasks.runtimes import RUNTIMES, runtimes_for
from byoai.tasks.techniques import TECHNIQUES

# The gate's reference: the base model in transformers where it fits, else a GGUF of the
# checkpoint's own dtype, memory-mapped by llama.cpp.
REFERENCE = "reference"
REFERENCE_RUNTIME = "transformers"
GGUF_REFERENCE_TYPES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}


def reference_variant(shape: ModelShape, runtime: str) -> VariantSpec:
    """The reference as a variant: the base model (transformers) or its GGUF in its own dtype (llama.cpp)."""
    if runtime == REFERENCE_RUNTIME:
        return VariantSpec(name=REFERENCE, stages=(StageSpec(technique="baseline"),))
    return VariantSpec(name=REFERENCE, stages=(StageSpec(technique="gguf", params={"quant_type": GGUF_REFERENCE_TYPES[shape.dtype]}),))


@dataclass
class MemoryPlan:
    shape: ModelShape
    variants: list[VariantPlan] = field(default_factory=list)
    reference_runtime: dict[str, str | None] = field(default_factory=dict)  # target -> runtime, None: nowhere
    max_workers: int = 1
    notes: list[str] = field(default_factory=list)

    def of(self, variant: str, target: str) -> VariantPlan | None:
        """The variant's plan on a target; a search trial (<variant>-tN) is planned as its variant."""
        for name in (variant, variant.rsplit("-t", 1)[0]):
            if found := next((p for p in self.variants if p.variant == name and p.target == target), None):
                return found
        return None


def windows_of(recipe: Recipe) -> Windows:
    latency = recipe.evaluation.latency
    batches = max([1, *latency.batch_sizes])
    return Windows(
        calibration_samples=recipe.calibration.n_samples,
        calibration_seq_len=recipe.calibration.seq_len,
        eval_seq_len=recipe.evaluation.perplexity.seq_len,
        latency_context=max(max([latency.prompt_tokens, *latency.prompt_lengths]), batches * (latency.prompt_tokens + latency.new_tokens)),
        max_batch=batches,
        serving_context=max(serving.users) * serving.slot_context if (serving := recipe.evaluation.serving) else 0,
        draft_share=0.5 if recipe.speculative or any(v.speculative for v in recipe.variants) else 0.0,
    )


def target_dtype(target: TargetProfile, shape: ModelShape) -> str:
    return shape.dtype if target.dtype == "auto" else target.dtype


def plan_variant(variant: VariantSpec, target: TargetProfile, ctx: PlanContext, capacity: Capacity) -> VariantPlan:
    """The variant's chain, stage by stage (each stage's output is the next one's input), then
    each of the target's runtimes that runs the last stage's format."""
    plan = VariantPlan(variant.name, target.name, capacity=capacity)
    artifact, artifact_format = ctx.input_bytes, "hf"
    for stage in variant.stages:
        technique = TECHNIQUES[stage.technique]
        footprint = technique.footprint(technique.config.model_validate(stage.params), replace(ctx, input_bytes=artifact))
        plan.rows.append(PlanRow(variant.name, target.name, "", f"build {stage.technique}", footprint.host, footprint.device, footprint.why))
        artifact = footprint.artifact if footprint.artifact is not None else artifact
        artifact_format = technique.output_of(stage.params)
    plan.artifact = artifact
    for runtime in (r for r in target.runtimes if r in runtimes_for(artifact_format)):
        footprint = RUNTIMES[runtime].footprint(ctx, artifact)
        plan.rows.append(PlanRow(variant.name, target.name, runtime, "evaluate", footprint.host, footprint.device, footprint.why))
    return plan


def capacity_here() -> Capacity:
    """What this worker has now: RAM available within its cgroup, free GPU memory."""
    return Capacity(host=hostmem.available_bytes(), device=hostmem.device_free_bytes(), source="this worker")


def capacity_of(target: TargetProfile) -> Capacity:
    """Planning another machine: the profile's memory_gb / device_memory_gb, else this worker's."""
    here = capacity_here()
    if target.memory_gb is None and target.device_memory_gb is None:
        return here
    return Capacity(
        host=int(target.memory_gb * 1e9) if target.memory_gb is not None else here.host,
        device=int(target.device_memory_gb * 1e9) if target.device_memory_gb is not None else here.device,
        source=f"target {target.name} (its profile's memory_gb/device_memory_gb)",
    )


def plan_memory(recipe: Recipe, shape: ModelShape, targets: list[TargetProfile], capacity, max_workers: int = 1) -> MemoryPlan:
    """`capacity(target) -> Capacity`: this worker's (a run) or the target's profile (`byoai plan`)."""
    plan = MemoryPlan(shape=shape)
    windows = windows_of(recipe)
    for target in targets:
        room = capacity(target)
        ctx = PlanContext(shape=shape, windows=windows, device=target.device, dtype=target_dtype(target, shape), input_bytes=shape.bytes_in(shape.dtype),
                          host_capacity=room.host)
        # the reference: transformers where it fits, else llama.cpp on its own-dtype GGUF
        chosen = None
        for runtime in (REFERENCE_RUNTIME, "llama_cpp"):
            if runtime not in target.runtimes:
                continue
            reference = plan_variant(reference_variant(shape, runtime), target, ctx, room)
            reference.rows = [r for r in reference.rows if not r.runtime or r.runtime == runtime]
            if chosen is None or reference.skip_reason() is None:
                chosen = (runtime, reference)
            if reference.skip_reason() is None:
                break
        if chosen is not None:
            runtime, reference = chosen
            plan.variants.append(reference)
            plan.reference_runtime[target.name] = runtime if reference.skip_reason() is None else None
            if runtime != REFERENCE_RUNTIME and REFERENCE_RUNTIME in target.runtimes and reference.skip_reason() is None:
                plan.notes.append(f"{target.name}: the base model does not fit in transformers; the gate's reference is its {GGUF_REFERENCE_TYPES[shape.dtype]} GGUF in llama.cpp")
        for variant in recipe.variants:
            plan.variants.append(plan_variant(variant, target, ctx, room))
    plan.max_workers = workers_that_fit(plan, targets, capacity, max_workers)
    if plan.max_workers < max_workers:
        plan.notes.append(f"heavy steps run one at a time: {max_workers} at once would need more than the worker has")
    return plan


def workers_that_fit(plan: MemoryPlan, targets: list[TargetProfile], capacity, wanted: int) -> int:
    """At most `wanted` heavy steps at once, and fewer when the largest ones together would not fit."""
    if wanted <= 1:
        return 1
    peaks = sorted((p.peak_host for p in plan.variants if p.skip_reason() is None), reverse=True)
    room = min(capacity(t).host for t in targets)
    for n in range(wanted, 1, -1):
        if sum(peaks[:n]) <= room:
            return n
    return 1


def workers_that_fit_here(recipe: Recipe, wanted: int) -> int:
    """How many heavy steps may run at once on this worker (before the flow starts its runner);
    `wanted` when the model's shape cannot be read yet (a hub model offline: the flow reports it)."""
    try:
        shape = model_shape(recipe)
    except Exception:  # noqa: BLE001 - resolving the model is the flow's job, with its retries
        return wanted
    return plan_memory(recipe, shape, list(recipe.targets), lambda target: capacity_here(), wanted).max_workers


# ---------------------------------------------------------------- the model's shape, without weights
def model_shape(recipe: Recipe, model_config: Path | None = None, models_dir: Path | None = None) -> ModelShape:
    """From `--model-config`, the recipe's local folder, the hub's config.json, or the GGUF's metadata."""
    if model_config is not None:
        return shape_from_config(json.loads(model_config.read_text()))
    match recipe.model:
        case LocalModel(path=path):
            return shape_from_config(json.loads((path / "config.json").read_text()))
        case HubModel():
            from huggingface_hub import hf_hub_download

            config = hf_hub_download(recipe.model.id, "config.json", revision=recipe.model.revision, cache_dir=models_dir / "hub" if models_dir else None)
            return shape_from_config(json.loads(Path(config).read_text()))
        case GgufModel(path=path):
            return materialized_shape(shape_from_gguf(path))
        case EmbeddedModel():
            from byoai.tasks.model import embedded_gguf

            return materialized_shape(shape_from_gguf(embedded_gguf()))
    raise AssertionError(recipe.model)


def materialized_shape(shape: ModelShape) -> ModelShape:
    """A GGUF model is materialized in float32 when that fits this worker, else in bfloat16."""
    return replace(shape, dtype=materialize_dtype(shape.params))


def materialize_dtype(params: int) -> str:
    # dequantizing holds the loaded model and the rebuilt one: twice the weights
    return "float32" if 2 * params * 4 < hostmem.available_bytes() else "bfloat16"


def plan_table_rows(plan: MemoryPlan) -> list[tuple[str, ...]]:
    """(variant, target, step, runtime, host, device, fits) rows for the console."""
    rows = []
    for vp in plan.variants:
        reason = vp.skip_reason()
        for i, row in enumerate(vp.rows):
            verdict = ("fits" if reason is None else f"skip: {reason}") if i == len(vp.rows) - 1 else ""
            rows.append((vp.variant, vp.target, row.step, row.runtime, gb(row.host), gb(row.device) if row.device else "", row.why, verdict))
    return rows
