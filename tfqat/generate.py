"""``python -m tfqat.generate --model model.tflite --prompt "..."``: stream tokens from an export.

Greedy by default; ``--temperature T`` samples (with ``--top-k K`` and ``--seed S``). The tokenizer
is ``tokenizer.json`` next to the model (written by ``python -m tfqat.export``) or ``--tokenizer``.
``--chat`` wraps the prompt in the ChatML template that instruct models such as SmolLM2-Instruct were
tuned on (``<|im_start|>role\n...<|im_end|>``) and stops at ``<|im_end|>``. Imports no TensorFlow: LiteRT, our delegate library and the ``tokenizers`` package only.

Exit status: 0 done; 2 a bad argument, model, library or tokenizer (one ``error:`` line naming the
fix); 130 Ctrl-C (what was streamed stays printed, its line ended).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Optional

EOS = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"


def chat_prompt(user: str, system: Optional[str]) -> str:
    """The ChatML conversation an instruct model continues with its answer."""
    turns = ([("system", system)] if system else []) + [("user", user)]
    return "".join(f"{IM_START}{role}\n{text}{IM_END}\n" for role, text in turns) + f"{IM_START}assistant\n"


def load_tokenizer(model_path: Path, tokenizer: Optional[str] = None):
    from tokenizers import Tokenizer

    from tfqat.runtime import TfqatRuntimeError

    path = Path(tokenizer) if tokenizer else model_path.parent / "tokenizer.json"
    if not path.is_file():
        raise TfqatRuntimeError(f"no tokenizer at {path}; pass --tokenizer tokenizer.json (the export "
                                "folder has one)")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception for any bad file
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise TfqatRuntimeError(f"{path}: not a readable tokenizer ({reason}); use the export's "
                                "tokenizer.json (python -m tfqat.export writes it) or pass --tokenizer") from None


def check_args(args: argparse.Namespace) -> Optional[str]:
    """The first invalid argument as a one-line message naming the fix, or None."""
    import math

    if args.max_new_tokens < 1:
        return f"--max-new-tokens {args.max_new_tokens}: must be at least 1"
    if not math.isfinite(args.temperature) or args.temperature < 0:
        return f"--temperature {args.temperature:g}: must be 0 (greedy) or a positive number such as 0.8"
    if args.top_k < 0:
        return f"--top-k {args.top_k}: must be 0 (all tokens) or a positive count such as 40"
    if args.top_k and args.temperature == 0:
        return f"--top-k {args.top_k} samples, but --temperature is 0 (greedy); add --temperature 0.8 or drop --top-k"
    if args.threads < 1:
        return f"--threads {args.threads}: must be at least 1"
    if args.seed is not None and args.seed < 0:
        return f"--seed {args.seed}: must be 0 or more"
    if args.system is not None and not args.chat:
        return "--system is the chat's system message; add --chat or drop --system"
    return None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m tfqat.generate", description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="model.tflite (or model_float.tflite) of an export")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    ap.add_argument("--top-k", type=int, default=0, help="sample from the k most likely (0 = all)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--tokenizer", help="tokenizer.json (default: next to the model)")
    ap.add_argument("--lib", help="delegate library (default: $TFQAT_OPS_LIB or tfqat/_lib)")
    ap.add_argument("--threads", type=int, default=1,
                    help="threads for LiteRT (XNNPACK) and our delegate (default 1; results are the same for any count)")
    ap.add_argument("--allow-float", action="store_true", help="accept a model without TFQAT ops")
    ap.add_argument("--stats", action="store_true", help="print ms/token to stderr")
    ap.add_argument("--chat", action="store_true",
                    help="wrap the prompt in the ChatML template of instruct models (SmolLM2-Instruct)")
    ap.add_argument("--system", help="with --chat: a system message")
    return ap


def main(argv: Optional[list] = None) -> int:
    from tfqat.runtime import LiteModel, TfqatRuntimeError

    args = build_parser().parse_args(argv)
    problem = check_args(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    streaming = False
    out: list = []
    try:
        model_path = Path(args.model)
        tok = load_tokenizer(model_path, args.tokenizer)
        model = LiteModel(model_path, lib=args.lib, threads=args.threads,
                          allow_float=args.allow_float or model_path.name == "model_float.tflite")
        text_in = args.prompt
        stops = []
        if args.chat:
            if tok.token_to_id(IM_START) is None or tok.token_to_id(IM_END) is None:
                raise TfqatRuntimeError(f"--chat needs a tokenizer with {IM_START} and {IM_END} tokens (an "
                                        "instruct model's); drop --chat for plain continuation")
            text_in = chat_prompt(args.prompt, args.system)
            stops.append(tok.token_to_id(IM_END))
        ids = tok.encode(text_in).ids
        if not ids:
            raise TfqatRuntimeError("the prompt encodes to no tokens; give some text")
        if len(ids) > model.capacity:
            raise TfqatRuntimeError(f"prompt is {len(ids)} tokens but the model's context is "
                                    f"{model.capacity}; shorten it")
        eos = tok.token_to_id(EOS)
        stops += [] if eos is None else [eos]
        sys.stdout.write(args.prompt + ("\n" if args.chat else ""))
        sys.stdout.flush()
        streaming = True
        t0, t_first = time.perf_counter(), None
        text_so_far = ""
        for t in model.generate(ids, args.max_new_tokens, args.temperature, args.top_k, args.seed,
                                stop=tuple(stops)):
            if t_first is None:
                t_first = time.perf_counter()
            if t in stops:
                break
            out.append(t)
            text = tok.decode(out)
            sys.stdout.write(text[len(text_so_far):])  # stream; BPE pieces can merge
            sys.stdout.flush()
            text_so_far = text
        sys.stdout.write("\n")
        if model.position >= model.capacity:
            print(f"(stopped: context of {model.capacity} tokens is full)", file=sys.stderr)
        if args.stats and t_first is not None:
            n = max(len(out) - 1, 1)
            print(f"prefill {len(ids)} tokens {1e3 * (t_first - t0):.1f} ms; decode "
                  f"{1e3 * (time.perf_counter() - t_first) / n:.2f} ms/token", file=sys.stderr)
    except TfqatRuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: keep what was streamed, end its line, no traceback
        if streaming:
            sys.stdout.write("\n")
            sys.stdout.flush()
        print(f"interrupted{f' after {len(out)} new tokens' if streaming else ''}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (| head): stop quietly, as text tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no flush error at exit
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
