"""Reports of a flow run: Markdown, HTML and a Pareto plot per target, from the run's tables.

The same rendering serves the flow (artifacts of the MLflow parent run) and `byoai report RUN_ID`
(rebuilt later from what MLflow stored), so a report never disagrees with the registry.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from byoai.tasks.tracking import RunRef, client

_RESULT_COLUMNS = [
    ("variant", "variant", None), ("target", "target", None), ("runtime", "runtime", None), ("status", "status", None),
    ("ppl", "ppl", ".3f"), ("ppl_delta_pct", "Δppl %", "+.2f"), ("predicted_loss", "predicted KL", ".4g"), ("size_mb", "size MB", ".1f"),
    ("load_s", "load s", ".2f"), ("prefill_ms", "prefill ms", ".1f"), ("decode_tok_s", "decode tok/s", ".1f"),
    ("task_scores", "tasks", None), ("version", "version", None), ("reason", "note", None),
]
_DECISION_COLUMNS = [
    ("target", "target", None), ("variant", "variant", None), ("runtime", "runtime", None), ("version", "version", None),
    ("ppl_delta_pct", "Δppl %", "+.2f"), ("reference", "vs reference in", None), ("size_mb", "size MB", ".1f"), ("decode_tok_s", "decode tok/s", ".1f"),
    ("decode_from", "decode measured by", None), ("min_task_recovery", "task recovery", ".3f"), ("gate", "gate", None), ("pareto", "Pareto", None),
    ("champion", "champion", None), ("slo", "serving SLO", None), ("reason", "why", None),
]
_SERVING_COLUMNS = [
    ("variant", "variant", None), ("runtime", "runtime", None), ("users", "users", None), ("ttft_ms_p50", "TTFT p50 ms", ".0f"),
    ("ttft_ms_p95", "TTFT p95 ms", ".0f"), ("itl_ms_p50", "ITL p50 ms", ".1f"), ("itl_ms_p95", "ITL p95 ms", ".1f"),
    ("tok_s", "tok/s", ".1f"), ("tok_s_per_user", "tok/s per user", ".1f"), ("requests_per_s", "req/s", ".2f"),
    ("cache_hit_share", "prompt cache hit", ".2f"), ("server_cpu_s", "server CPU s", ".1f"), ("client_cpu_s", "client CPU s", ".1f"),
]


def _decision_columns(decisions: list[dict[str, Any]]):
    """The selection table's columns; the serving SLO only where the recipe set one, where decode
    speeds come from only when they come from more than one place (llama-server and the protocol)."""
    slo = any(d.get("slo") for d in decisions)
    mixed = len({d.get("decode_from") for d in decisions if d.get("decode_from")}) > 1
    return [c for c in _DECISION_COLUMNS if (c[0] != "slo" or slo) and (c[0] != "decode_from" or mixed)]


def serving_rows(results: list[dict[str, Any]], target: str) -> list[dict[str, Any]]:
    """One row per served candidate x users level (from the rows' serving.u<N>.<metric>)."""
    rows = []
    for r in results:
        if r["target"] != target or not r.get("serving"):
            continue
        levels: dict[int, dict[str, Any]] = {}
        for key, value in r["serving"].items():
            _, level, metric = key.split(".", 2)
            levels.setdefault(int(level[1:]), {"variant": r["variant"], "runtime": r.get("runtime", ""), "users": int(level[1:])})[metric] = value
        rows += [levels[u] for u in sorted(levels)]
    return rows


def serving_plot(results: list[dict[str, Any]], target: str, path: Path) -> Path | None:
    """Throughput and p95 latencies against concurrent users, one line per served candidate."""
    rows = serving_rows(results, target)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == variant]
        users = [r["users"] for r in mine]
        left.plot(users, [r["tok_s"] for r in mine], "o-", label=variant)
        right.plot(users, [r["ttft_ms_p95"] for r in mine], "o-", label=f"{variant} TTFT")
        right.plot(users, [r["itl_ms_p95"] for r in mine], "s--", label=f"{variant} ITL")
    left.set(xlabel="concurrent users", ylabel="output tokens/s (all users)", title=f"{target}: throughput")
    right.set(xlabel="concurrent users", ylabel="p95 latency (ms)", yscale="log", title=f"{target}: p95 TTFT and inter-token latency")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _result_columns(results: list[dict[str, Any]]):
    """The variants table's columns; a technique's predicted loss only where one predicted it."""
    predicted = any(r.get("predicted_loss") is not None for r in results)
    return [c for c in _RESULT_COLUMNS if c[0] != "predicted_loss" or predicted]


def _cell(value: Any, spec: str | None) -> str:
    if value is None or value == "" or (isinstance(value, float) and value != value):
        return ""
    if isinstance(value, bool):
        return "★" if value else ""
    if isinstance(value, dict):
        return ", ".join(f"{k}={v:.3f}" for k, v in value.items())
    return format(value, spec) if spec and isinstance(value, int | float) else str(value)


def _markdown_table(rows: list[dict[str, Any]], columns) -> str:
    head = "| " + " | ".join(title for _, title, _ in columns) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "".join("| " + " | ".join(_cell(r.get(k), f) for k, _, f in columns) + " |\n" for r in rows)


def _html_table(rows: list[dict[str, Any]], columns) -> str:
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title, _ in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(r.get(k), f))}</td>" for k, _, f in columns) + "</tr>" for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _profile_order(key: str) -> tuple:
    """ttft by prompt length, then decode speed and time per token by batch, then memory."""
    family, _, size = key.partition(".")
    families = ["ttft_ms", "decode_tok_s", "tpot_ms", "peak_mem_mb", "weights_mb", "bandwidth_gb_s", "decode_bound_tok_s", "decode_efficiency"]
    return (families.index(family) if family in families else len(families), int(size[1:]) if size[1:].isdigit() else 0, key)


_PROFILE_TITLES = {
    "ttft_ms": "TTFT ms p{}", "decode_tok_s": "decode tok/s b{}", "tpot_ms": "TPOT ms b{}", "peak_mem_mb": "peak mem MB",
    "weights_mb": "weights MB", "bandwidth_gb_s": "bandwidth GB/s", "decode_bound_tok_s": "decode bound tok/s",
    "decode_efficiency": "of bound", "ppl_windows_reused": "ppl windows from a rung",
}


def profile_tables(results: list[dict[str, Any]]) -> list[tuple[str, str, list[dict[str, Any]], list]]:
    """Per target: (target, device, rows, columns) of the performance profile; medians with their
    [min-max] spread where the profile has one."""
    tables = []
    for target in dict.fromkeys(r["target"] for r in results if r.get("profile")):
        rows = [r for r in results if r["target"] == target and r.get("profile")]
        keys = sorted({k for r in rows for k in r["profile"] if not k.endswith((".min", ".max"))}, key=_profile_order)
        columns = [("variant", "variant", None), ("runtime", "runtime", None)]
        for key in keys:
            family, _, size = key.partition(".")
            columns.append((key, _PROFILE_TITLES.get(family, key).format(size[1:]), None))
        cells = []
        for r in rows:
            row = {"variant": r["variant"], "runtime": r.get("runtime", "")}
            for key in keys:
                value, low, high = (r["profile"].get(k) for k in (key, f"{key}.min", f"{key}.max"))
                spec = ".2f" if key == "decode_efficiency" else ".1f"
                row[key] = "" if value is None else format(value, spec) + (f" [{low:{spec}}–{high:{spec}}]" if low is not None and high is not None else "")
            cells.append(row)
        devices = "; ".join(dict.fromkeys(r.get("device", "") for r in rows))
        tables.append((target, devices, cells, columns))
    return tables


def _plot_title(file: str) -> str:
    return "serving: throughput and p95 latencies against users" if file.startswith("serving-") else "Pareto front"


def champions_line(decisions: list[dict[str, Any]]) -> str:
    """Per target: its champion and why, then whether it beats the recipe's input file (when that is a GGUF)."""
    chosen = {d["target"]: d for d in decisions if d.get("champion")}
    verdicts = {d["target"]: d["reason"] for d in decisions if d["variant"] == "input"}
    targets = sorted({d["target"] for d in decisions})
    return "; ".join(
        (f"champion-{t}: v{chosen[t]['version']} ({chosen[t]['variant']} in {chosen[t].get('runtime', 'transformers')}: {chosen[t]['reason']})" if t in chosen else f"champion-{t}: none")
        + (f"; {verdicts[t]}" if t in verdicts else "")
        for t in targets
    ) or "no target ran"


def render_markdown(name: str, results: list[dict[str, Any]], decisions: list[dict[str, Any]], plots: list[str] = ()) -> str:
    images = "".join(f"\n![{_plot_title(p)}]({p})\n" for p in plots)
    profiles = "".join(
        f"### {target}\n\n{device}\n\n{_markdown_table(rows, columns)}\n" for target, device, rows, columns in profile_tables(results)
    )
    serving = "".join(
        f"### {target}\n\n{_markdown_table(rows, _SERVING_COLUMNS)}\n"
        for target in dict.fromkeys(r["target"] for r in results) if (rows := serving_rows(results, target))
    )
    return (
        f"# byoai report: {name}\n\n## Variants x targets\n\n{_markdown_table(results, _result_columns(results))}\n"
        f"## Selection\n\n{_markdown_table(decisions, _decision_columns(decisions))}\n{champions_line(decisions)}\n{images}"
        + (f"\n## Performance profile (median [min–max])\n\n{profiles}" if profiles else "")
        + (f"\n## Served to concurrent streaming users (llama-server)\n\n{serving}" if serving else "")
    )


def render_html(name: str, results: list[dict[str, Any]], decisions: list[dict[str, Any]], plots: list[str] = ()) -> str:
    images = "".join(f'<img src="{html.escape(p)}" alt="{_plot_title(p)}" width="640">' for p in plots)
    style = "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#eee}"
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>byoai report: {html.escape(name)}</title><style>{style}</style></head>"
        f"<body><h1>byoai report: {html.escape(name)}</h1><h2>Variants x targets</h2>{_html_table(results, _result_columns(results))}"
        f"<h2>Selection</h2>{_html_table(decisions, _decision_columns(decisions))}<p>{html.escape(champions_line(decisions))}</p>{images}"
        + "".join(
            f"<h2>Performance profile: {html.escape(target)} (median [min–max])</h2><p>{html.escape(device)}</p>{_html_table(rows, columns)}"
            for target, device, rows, columns in profile_tables(results)
        )
        + "".join(
            f"<h2>Served to concurrent streaming users: {html.escape(target)}</h2>{_html_table(rows, _SERVING_COLUMNS)}"
            for target in dict.fromkeys(r["target"] for r in results) if (rows := serving_rows(results, target))
        )
        + "</body></html>"
    )


def pareto_plot(decisions: list[dict[str, Any]], target: str, path: Path, results: list[dict[str, Any]] = ()) -> Path:
    """Size vs perplexity increase for one target; the Pareto front joined, the champion starred,
    the recipe's input file as it is (when it is a GGUF, fully measured) as a grey cross."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [d for d in decisions if d["target"] == target and d.get("size_mb") is not None and d["variant"] != "input"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        color = "tab:green" if row["gate"] == "pass" else "tab:red"
        ax.scatter(row["size_mb"], row["ppl_delta_pct"], s=40 + 4 * (row.get("decode_tok_s") or 0), c=color, alpha=0.7, edgecolors="k")
        label = f"{row['variant']} [{row.get('runtime', 'transformers')}]"
        ax.annotate(("★ " if row.get("champion") else "") + label, (row["size_mb"], row["ppl_delta_pct"]), textcoords="offset points", xytext=(6, 4), fontsize=8)
    # an auto search measures the input on its rungs only, unless it could beat the champion: a
    # rung's few windows do not sit on the same axes as the full protocol
    for row in (r for r in results if r["target"] == target and r["variant"] == "input" and r.get("status") == "finished"):
        ax.scatter(row["size_mb"], row["ppl_delta_pct"], marker="x", s=80, c="gray")
        ax.annotate(f"input as shipped [{row.get('runtime', '')}]", (row["size_mb"], row["ppl_delta_pct"]), textcoords="offset points", xytext=(6, -10), fontsize=8, color="gray")
    front = sorted((r for r in rows if r.get("pareto")), key=lambda r: r["size_mb"])
    if front:
        ax.plot([r["size_mb"] for r in front], [r["ppl_delta_pct"] for r in front], "--", c="gray", label="Pareto front (ppl, size, speed)")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xlabel("size (MB, as the runtime loads it)")
    ax.set_ylabel("perplexity increase vs base model (%)")
    ax.set_title(f"{target}: green passes the gate, marker size = decode tok/s")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(name: str, results: list[dict[str, Any]], decisions: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """report.md, report.html, pareto-<target>.png and (when served) serving-<target>.png into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    targets = sorted({d["target"] for d in decisions})
    plots = [pareto_plot(decisions, t, out_dir / f"pareto-{t}.png", results).name for t in targets]
    plots += [plot.name for t in targets if (plot := serving_plot(results, t, out_dir / f"serving-{t}.png"))]
    (out_dir / "report.md").write_text(render_markdown(name, results, decisions, plots))
    (out_dir / "report.html").write_text(render_html(name, results, decisions, plots))
    return [out_dir / "report.md", out_dir / "report.html", *(out_dir / p for p in plots)]


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def log_report(parent: RunRef, name: str, results: list[dict[str, Any]], decisions: list[dict[str, Any]]) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        write_report(name, results, decisions, Path(tmp))
        client(parent.tracking_uri).log_artifacts(parent.run_id, tmp, artifact_path="report")


def _table(mlflow, run_id: str, name: str) -> list[dict[str, Any]]:
    from mlflow.exceptions import MlflowException

    try:
        data = json.loads(Path(mlflow.download_artifacts(run_id, name)).read_text())
    except (MlflowException, OSError):
        return []
    return [dict(zip(data["columns"], row, strict=True)) for row in data["data"]]


def report_from_mlflow(tracking_uri: str, run_id: str, out_dir: Path) -> list[Path]:
    """Rebuild a flow run's report from its MLflow parent run (byoai report RUN_ID)."""
    mlflow = client(tracking_uri)
    run = mlflow.get_run(run_id)
    name = mlflow.get_experiment(run.info.experiment_id).name
    return write_report(name, _table(mlflow, run_id, "results.json"), _table(mlflow, run_id, "promotion.json"), out_dir)
