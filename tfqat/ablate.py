"""``python -m tfqat.ablate``: the EdgeQAT ablation grid, one report, resumable row by row.

Every row is a QAT stage of its own (``runs/<name>/qat-<row>/``) trained from the shared FP
teacher with the same token budget (``qat.train``); a finished row is reused, an interrupted
one resumes from its checkpoint, and each row's evaluation is cached. Rows:

- method x bits: KD only (the LLM-QAT baseline) and the full method at w8a8, w4a8, w4a4-8, w4a4;
- losses at w4a4-8: off (= KD only), entropy only, distribution only, both (= full), and the
  literal paper sign of the distribution loss;
- rho 0.25, 0.5, 0.75 at w4a4-8 (full method);
- uniform 6-bit activations (w4a6) against the 4:8 mix (w4a4-8), both with 4-bit weights;
- the entropy term at w4a4: a tenth of its weight, and the reference code's form of it.

Writes ``runs/<name>/ablation.md``, ``ablation.json``, ``ablation.png`` (perplexity per row) and
``ablation_loss_curves.png``.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

from .cli import add_common_args, die, load_cli_config

BITS = ("w8a8", "w4a8", "w4a4-8", "w4a4")


@dataclass(frozen=True)
class Row:
    """One ablation row: a recipe, loss switches and rho, named for its stage folder."""

    key: str
    group: str
    label: str
    recipe: str
    losses: dict = field(default_factory=dict)  # QATLossConfig overrides
    rho: Optional[float] = None


KD_ONLY = {"entropy": 0.0, "distribution": 0.0}


def grid() -> list[Row]:
    rows = []
    for r in BITS:
        rows.append(Row(f"kd-{r}", "method x bits", "KD only (LLM-QAT)", r, KD_ONLY))
        rows.append(Row(f"full-{r}", "method x bits", "full method", r))
    rows += [
        Row("entropy-w4a4-8", "losses (w4a4-8)", "KD + entropy", "w4a4-8", {"distribution": 0.0}),
        Row("distribution-w4a4-8", "losses (w4a4-8)", "KD + distribution", "w4a4-8", {"entropy": 0.0}),
        Row("paper-sign-w4a4-8", "losses (w4a4-8)", "full, distribution with the paper's +log(sum cos)",
            "w4a4-8", {"distribution_form": "paper"}),
        Row("rho0.25-w4a4-8", "rho (w4a4-8)", "full method, rho 0.25", "w4a4-8", rho=0.25),
        Row("rho0.75-w4a4-8", "rho (w4a4-8)", "full method, rho 0.75", "w4a4-8", rho=0.75),
        Row("full-w4a6", "6-bit vs 4:8", "full method, uniform 6-bit activations", "w4a6"),
        Row("entropy0.05-w4a4", "entropy loss (w4a4)", "full method, entropy weight 0.05", "w4a4",
            {"entropy": 0.05}),
        Row("entropy-ref-w4a4", "entropy loss (w4a4)", "full method, entropy in the reference code's form",
            "w4a4", {"entropy_form": "reference"}),
    ]
    return rows


def row_qat_config(cfg, row: Row):
    """The run's QATConfig with this row's recipe, loss switches and rho (same schedule)."""
    losses = cfg.qat.losses.model_copy(update=row.losses)
    return cfg.qat.model_copy(update={"recipe": row.recipe, "losses": losses, "rho": row.rho})


def ablation_table(rows: list[dict]) -> str:
    fp = next((r["perplexity"] for r in rows if r.get("method") == "FP"), None)
    lines = ["| group | row | recipe | perplexity | x FP | BLiMP overall | size (MB) |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        ratio = r["perplexity"] / fp if fp else float("nan")
        lines.append(f"| {r.get('group', '')} | {r['method']} | {r['recipe']} | {r['perplexity']:.3f} | "
                     f"{ratio:.3f} | {100 * r['blimp']:.1f} | {r['size_mb']:.2f} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m tfqat.ablate",
        description="The EdgeQAT ablation grid (methods x bits, losses, rho, 6-bit vs 4:8) in one report; "
                    "resumable row by row.")
    add_common_args(ap)
    ap.add_argument("--rows", nargs="*", metavar="KEY",
                    help="train only these row keys (default: all; see --list); finished rows are still reported")
    ap.add_argument("--list", action="store_true", help="print the row keys and exit")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rows_spec = grid()
    if args.list:
        for r in rows_spec:
            print(f"{r.key:22s} {r.group:16s} {r.label}")
        return 0
    progress = not args.quiet
    with die():
        from . import pipeline
        from .cli import UserError
        from .evaluate import evaluate_model, keras_logprob_fn
        from .report import read_metrics, write_report

        cfg = load_cli_config(args)
        if args.rows:
            unknown = sorted(set(args.rows) - {r.key for r in rows_spec})
            if unknown:
                raise UserError(f"--rows: unknown row {unknown[0]!r}; see python -m tfqat.ablate --list")
            # run the chosen rows; rows finished by earlier invocations stay in the one report
            done = {r.key for r in rows_spec if (cfg.run_dir / f"qat-abl-{r.key}" / "result.json").is_file()}
            rows_spec = [r for r in rows_spec if r.key in args.rows or r.key in done]
        t0 = time.perf_counter()
        data = pipeline.load_data(cfg, progress)
        teacher, fp_result = pipeline.fp_stage(cfg, data, progress)
        fp_eval = pipeline.cached_eval(cfg.run_dir / "eval_fp.json", pipeline.eval_fingerprint(cfg, data, "fp"),
                                       lambda: evaluate_model(keras_logprob_fn(teacher), data, cfg, progress))
        from .qat_stage import qat_eval_row, qat_stage, stage_dir

        table = [{"group": "reference", "method": "FP", "recipe": "fp32", "perplexity": fp_eval["perplexity"],
                  "blimp": fp_eval["blimp"]["overall"], "size_mb": fp_result["params"] * 4 / 1e6}]
        curves, results = {}, {}
        for row in rows_spec:
            qat = row_qat_config(cfg, row)
            student, res = qat_stage(cfg, data, teacher, qat=qat, tag=f"abl-{row.key}", progress=progress)
            folder = stage_dir(cfg, student.recipe, f"abl-{row.key}")
            out = qat_eval_row(cfg, data, student, res, row.label, folder, progress)
            table.append({**out, "group": row.group, "key": row.key, "losses": qat.losses.model_dump()})
            curves[row.key] = read_metrics(folder / "metrics.csv")
            results[row.key] = res
            print(f"{row.key}: perplexity {out['perplexity']:.3f}, BLiMP {100 * out['blimp']:.1f}"
                  f"{' (reused)' if res['reused'] else ''}")
        q = cfg.qat.train
        sections = {"Setup": (
            f"config `{cfg.name}`; every row: {q.steps} QAT steps of batch {q.batch_size} x {cfg.data.seq_len} "
            f"({q.steps * q.batch_size * cfg.data.seq_len:,} tokens), lr {q.lr:g}, from the same FP teacher, "
            f"scales calibrated on {cfg.qat.calib_batches} batches. Full method = KD + "
            f"{cfg.qat.losses.entropy:g} * entropy ({cfg.qat.losses.entropy_form}) + "
            f"{cfg.qat.losses.distribution:g} * distribution ({cfg.qat.losses.distribution_form}). "
            f"Evaluation caps as the default run (`eval` section).")}
        extra = {"rows_results": results, "fp": fp_result, "wall_s": time.perf_counter() - t0}
        paths = write_report(cfg.run_dir, f"tfqat ablation `{cfg.name}`", table, sections, curves, extra,
                             stem="ablation", table=ablation_table)
        print(f"ablation report: {paths['ablation.md']} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
