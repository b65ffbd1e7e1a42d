"""Run reports a user can paste: ``report.md`` (tables), ``report.json`` (everything) and plots.

Every file is written to a temporary name and renamed, so a report on disk is always whole.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

from .atomic import write_text_atomic


def _fmt(v, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def blimp_interval(acc: float, n: int) -> list:
    """Wilson 95% interval of an accuracy over ``n`` pairs (BLiMP pairs are the trials)."""
    z = 1.959964
    d = 1 + z * z / n
    c = (acc + z * z / (2 * n)) / d
    h = z * math.sqrt(acc * (1 - acc) / n + z * z / (4 * n * n)) / d
    return [c - h, c + h]


def results_table(rows: list[dict]) -> str:
    """Markdown table: method, held-out perplexity (and ratio to FP), BLiMP overall with its 95%
    interval (chance is 50%), and two sizes: the row's exported file (``file_mb``) when it has
    one, and the parameter-count estimate (``size_mb``), labelled as such."""
    fp = next((r["perplexity"] for r in rows if r.get("method") == "FP"), None)
    lines = ["| method | recipe | perplexity | x FP | BLiMP overall (95% CI) | file (MB) | estimate (MB) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = r["perplexity"] / fp if fp and r.get("perplexity") else None
        blimp = "—"
        if r.get("blimp") is not None:
            blimp = f"{100 * r['blimp']:.1f}"
            if r.get("blimp_pairs"):
                lo, hi = blimp_interval(r["blimp"], r["blimp_pairs"])
                blimp += f" ({100 * lo:.1f}-{100 * hi:.1f})"
        lines.append(f"| {r['method']} | {r.get('recipe', 'fp32')} | {_fmt(r.get('perplexity'), '.3f')} | "
                     f"{_fmt(ratio, '.3f')} | {blimp} | {_fmt(r.get('file_mb'), '.2f')} | "
                     f"{_fmt(r.get('size_mb'), '.2f')} |")
    lines.append("")
    lines.append("BLiMP chance level: 50.0% (two sentences per pair). File: the size of the row's exported "
                 "`.tflite` (FP: `model_float.tflite`, QAT: `model.tflite`; — when the row is not exported). "
                 "Estimate: parameters at the row's weight bit width plus float32 scales, embeddings and norms "
                 "float32, KV cache not counted.")
    return "\n".join(lines)


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in r.items() if v not in ("", None)} for r in csv.DictReader(f)]


def plot_losses(curves: dict[str, list[dict]], path: Path) -> None:
    """Training loss per stage; when any stage logged ``val_loss`` (held-out batches at the log
    interval), validation loss on its own axes beside it (its scale differs: no dropout, fixed
    batches)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_val = any("val_loss" in r for rows in curves.values() for r in rows)
    fig, axes = plt.subplots(1, 2 if has_val else 1, figsize=(11 if has_val else 6.4, 4), squeeze=False)
    ax = axes[0][0]
    for label, rows in curves.items():
        if rows:
            ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=label)
    if not any(curves.values()):
        ax.text(0.5, 0.5, "no training in this run", ha="center", transform=ax.transAxes)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("Training loss")
    ax.grid(alpha=0.3)
    if any(curves.values()):
        ax.legend(fontsize=7)
    if has_val:
        vax = axes[0][1]
        for label, rows in curves.items():
            pts = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
            if pts:
                vax.plot(*zip(*pts), marker=".", label=label)
        vax.set_xlabel("step")
        vax.set_ylabel("validation loss")
        vax.set_title("Validation loss (held-out batches)")
        vax.grid(alpha=0.3)
        vax.legend(fontsize=7)
    _save_fig(fig, path)


def plot_perplexity(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get("perplexity")]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    labels = [f"{r['method']}\n{r.get('recipe', '')}".strip() for r in rows]
    bars = ax.bar(range(len(rows)), [r["perplexity"] for r in rows], color="#4c72b0")
    ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set_ylabel("held-out perplexity (lower is better)")
    ax.set_title("Perplexity per method")
    ax.grid(axis="y", alpha=0.3)
    _save_fig(fig, path)


def _save_fig(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.tight_layout()
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def write_report(run_dir: Path, title: str, rows: list[dict], sections: dict[str, str],
                 curves: dict[str, list[dict]], extra: dict, stem: str = "report",
                 table=None) -> dict:
    """Write ``<stem>.md`` / ``<stem>.json`` and the loss-curve and perplexity plots.

    ``stem="report"`` (the default run): report.md, report.json, loss_curves.png,
    perplexity.png. Another stem (``"ablation"``): ablation.md, ablation.json,
    ablation_loss_curves.png, ablation.png. ``table``: a custom ``rows -> markdown`` function.
    Returns the paths by file name.
    """
    names = (["report.md", "report.json", "loss_curves.png", "perplexity.png"] if stem == "report"
             else [f"{stem}.md", f"{stem}.json", f"{stem}_loss_curves.png", f"{stem}.png"])
    md_name, json_name, curves_name, ppl_name = names
    plot_losses(curves, run_dir / curves_name)
    plot_perplexity(rows, run_dir / ppl_name)
    md = [f"# {title}", "", (table or results_table)(rows), ""]
    for head, body in sections.items():
        md += [f"## {head}", "", body, ""]
    md += [f"![loss curves]({curves_name})", "", f"![perplexity]({ppl_name})", ""]
    write_text_atomic(run_dir / md_name, "\n".join(md))
    write_text_atomic(run_dir / json_name, json.dumps({"title": title, "rows": rows, **extra}, indent=1))
    return {k: str(run_dir / k) for k in names}
