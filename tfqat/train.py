"""``python -m tfqat.train``: the default job, end to end.

FP teacher (trained, or reused when cached) -> QAT -> evaluation -> report, each stage resumable:
interrupt it at any point (even ``kill -9``) and rerun the same command to continue.
"""

from __future__ import annotations

import argparse
import sys
import time

from .cli import add_common_args, die, load_cli_config


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m tfqat.train",
        description="Train the FP teacher, quantization-aware train the student, evaluate and report. "
                    "With no arguments: the 'tiny' config on the shipped corpus, on the CPU.")
    add_common_args(ap)
    ap.add_argument("--stage", choices=["fp", "all"], default="all",
                    help="'fp': only the FP teacher and its evaluation; 'all' (default): the whole job")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    progress = not args.quiet
    with die():
        from . import pipeline
        from .evaluate import evaluate_model, keras_logprob_fn
        from .report import read_metrics, write_report

        cfg = load_cli_config(args)
        t0 = time.perf_counter()
        data = pipeline.load_data(cfg, progress)
        teacher, fp_result = pipeline.fp_stage(cfg, data, progress)
        print(f"FP teacher: {fp_result['steps']} steps, {fp_result['tokens_per_s']:,.0f} tokens/s, "
              f"{fp_result['wall_s']:.0f} s{' (reused)' if fp_result['reused'] else ''}")
        fp_eval = evaluate_model(keras_logprob_fn(teacher), data, cfg, progress)
        pipeline.write_json_atomic(cfg.run_dir / "eval_fp.json", fp_eval)
        rows = [{"method": "FP", "recipe": "fp32", "perplexity": fp_eval["perplexity"],
                 "blimp": fp_eval["blimp"]["overall"], "size_mb": fp_result["params"] * 4 / 1e6}]
        curves = {"FP teacher": read_metrics(cfg.run_dir / "fp" / "metrics.csv")}
        sections = {
            "Setup": (f"config `{cfg.name}`: {cfg.model.arch}, hidden {cfg.model.hidden}, {cfg.model.layers} layers, "
                      f"{cfg.model.heads} heads ({cfg.model.num_kv_heads} KV), vocab {cfg.model.vocab_size}; "
                      f"{fp_result['params']:,} parameters. Perplexity on the `{cfg.eval.split}` works "
                      f"({fp_eval['tokens']:,} tokens, windows of {fp_eval['seq_len']} at stride {fp_eval['stride']}); "
                      f"BLiMP over {fp_eval['blimp']['pairs']:,} pairs."),
            "BLiMP by phenomenon (FP)": "\n".join(
                ["| phenomenon | accuracy |", "|---|---:|"]
                + [f"| {k} | {100 * v:.1f} |" for k, v in fp_eval["blimp"]["phenomena"].items()]),
        }
        paths = write_report(cfg.run_dir, f"tfqat run `{cfg.name}`", rows, sections, curves,
                             {"fp": fp_result, "fp_eval": fp_eval, "wall_s": time.perf_counter() - t0})
        print(f"report: {paths['report.md']} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
