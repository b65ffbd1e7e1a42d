"""A ``benchmark_model`` of our own on the LiteRT Python runtime, for hosts with no stock binary.

It takes LiteRT ``benchmark_model``'s flags (``--name=value``) and prints its lines, so
android_bench drives it exactly as it drives the stock tool (and parses the same
``Inference timings in us:`` line)::

    python -m android_bench.litert_benchmark --graph=model.tflite --num_runs=50 --warmup_runs=5 \\
        --num_threads=1 --signature_to_run_for=prefill \\
        --external_delegate_path=libtfqat_ops.so --external_delegate_options='isa:ref'

As in the stock tool: a model with several signatures needs ``--signature_to_run_for``; inputs are
random (float32 uniform in [-0.5, 0.5), int32 in [0, 99], other integers over their range), a
dynamic dimension is 1 unless ``--input_layer`` / ``--input_layer_shape`` set it; Init is the time
to load the delegate and the model and allocate tensors, First inference the first warm-up run.
Unlike it: exactly ``--warmup_runs`` and ``--num_runs`` iterations (no ``--min_secs``), and the
interpreter is LiteRT's Python wrapper (a few us of Python per run, included in the timings).
Exit status: 0 done, 1 a bad flag or model (one ``ERROR:`` line), as ``benchmark_model``.
"""
from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

FLAGS = {  # flag: (default, type, help)
    "graph": ("", str, "the .tflite to run"),
    "num_runs": (50, int, "timed runs"),
    "warmup_runs": (1, int, "warm-up runs before the timed ones"),
    "num_threads": (-1, int, "interpreter threads (-1: LiteRT's default)"),
    "signature_to_run_for": ("", str, "the signature to run (needed when the model has several)"),
    "external_delegate_path": ("", str, "a delegate library (libtfqat_ops.so)"),
    "external_delegate_options": ("", str, "its options, 'key1:value1;key2:value2'"),
    "input_layer": ("", str, "inputs to give a shape, comma separated"),
    "input_layer_shape": ("", str, "their shapes, ':' between inputs, e.g. 1,128:1"),
    "help": (False, bool, "print this"),
}


class FlagError(ValueError):
    pass


def parse_flags(argv: list[str]) -> dict:
    """``--name=value`` flags (``--name`` alone for a bool) -> values, typed as :data:`FLAGS`."""
    out = {k: d for k, (d, _, _) in FLAGS.items()}
    unknown = []
    for arg in argv:
        name, eq, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if name not in FLAGS:
            unknown.append(arg)
            continue
        _, kind, _ = FLAGS[name]
        if kind is bool:
            out[name] = value.lower() not in ("0", "false") if eq else True
            continue
        if not eq:
            raise FlagError(f"--{name} needs a value: --{name}=VALUE")
        try:
            out[name] = kind(value)
        except ValueError:
            raise FlagError(f"--{name}={value}: not {'an integer' if kind is int else 'valid'}") from None
    if unknown:
        raise FlagError(f"unknown flags {' '.join(unknown)} (this runner takes {', '.join('--' + f for f in FLAGS)})")
    if out["num_runs"] < 1 or out["warmup_runs"] < 0:
        raise FlagError("--num_runs must be at least 1 and --warmup_runs at least 0")
    return out


def delegate_options(text: str) -> dict:
    """``'key1:value1;key2:value2'`` (benchmark_model's format) -> dict."""
    opts = {}
    for item in filter(None, (p.strip() for p in text.split(";"))):
        key, sep, value = item.partition(":")
        if not sep or not key:
            raise FlagError(f"--external_delegate_options: {item!r} is not key:value")
        opts[key.strip()] = value.strip()
    return opts


def input_shapes(layers: str, shapes: str) -> dict:
    names = [n for n in layers.split(",") if n]
    dims = [s for s in shapes.split(":") if s] if shapes else []
    if len(names) != len(dims):
        raise FlagError("--input_layer and --input_layer_shape must name the same number of inputs")
    try:
        return {n: [int(d) for d in s.split(",")] for n, s in zip(names, dims)}
    except ValueError:
        raise FlagError(f"--input_layer_shape={shapes}: expected integers like 1,128:1") from None


def random_input(shape, dtype, rng):
    """What benchmark_model feeds: float32 in [-0.5, 0.5), int32 in [0, 99], other ints over their range."""
    import numpy as np

    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return (rng.random(shape, dtype=np.float32) - 0.5).astype(dtype)
    if dtype == np.int32 or dtype == np.int64:
        return rng.integers(0, 100, shape).astype(dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, int(info.max) + 1, shape).astype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(dtype)
    raise FlagError(f"input of type {dtype} is not supported by this runner")


def _stats(us: list[float]) -> str:
    import numpy as np

    a = np.asarray(us)
    return (f"count={a.size} first={a[0]:.0f} curr={a[-1]:.0f} min={a.min():.0f} max={a.max():.0f} "
            f"avg={a.mean():.6g} std={a.std():.0f}")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run(f: dict, log=print) -> dict:
    """Load, run warm-up and timed iterations, print benchmark_model's lines; returns the timings."""
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter, load_delegate

    from tfqat.runtime import TfqatRuntimeError, model_signatures

    rss0 = _rss_mb()
    path = Path(f["graph"])
    if not f["graph"]:
        raise FlagError("no model: pass --graph=model.tflite")
    if not path.is_file():
        raise FlagError(f"--graph={path}: no such file")
    log("INFO: STARTING!")
    log(f"INFO: Num runs: [{f['num_runs']}]")
    log(f"INFO: Num warmup runs: [{f['warmup_runs']}]")
    log(f"INFO: Graph: [{path}]")
    if f["signature_to_run_for"]:
        log(f"INFO: Signature to run: [{f['signature_to_run_for']}]")
    log(f"INFO: #threads used for CPU inference: [{f['num_threads']}]")
    if f["external_delegate_path"]:
        log(f"INFO: External delegate path: [{f['external_delegate_path']}]")
    data = path.read_bytes()
    try:
        sigs = model_signatures(data)
    except TfqatRuntimeError as e:
        raise FlagError(f"{path}: {e}") from None
    sig = f["signature_to_run_for"]
    if sig and sig not in sigs:
        raise FlagError(f"signature {sig!r} is not in the model (it has {', '.join(sigs) or 'none'})")
    if not sig and len(sigs) > 1:
        raise FlagError(f"the model has several signatures ({', '.join(sigs)}); pick one with "
                        "--signature_to_run_for")
    sig = sig or (sigs[0] if sigs else None)
    log(f"INFO: Loaded model {path}")
    log(f"INFO: The input model file size (MB): {len(data) / 1e6:.6g}")
    t0 = time.perf_counter()
    delegates = []
    if f["external_delegate_path"]:
        try:
            delegates.append(load_delegate(f["external_delegate_path"],
                                           delegate_options(f["external_delegate_options"])))
        except (ValueError, OSError) as e:
            raise FlagError(f"cannot load the external delegate {f['external_delegate_path']}: "
                            f"{(str(e).strip().splitlines() or ['?'])[-1]}") from None
        log("INFO: EXTERNAL delegate created.")
    try:
        interp = Interpreter(model_content=data, experimental_delegates=delegates,
                             num_threads=None if f["num_threads"] < 0 else f["num_threads"])
    except (ValueError, RuntimeError) as e:
        raise FlagError(f"the interpreter rejects {path}: {(str(e).strip().splitlines() or ['?'])[0]}") from None
    shapes = input_shapes(f["input_layer"], f["input_layer_shape"])
    rng = np.random.default_rng(0)
    if sig is not None:
        runner = interp.get_signature_runner(sig)
        details = runner.get_input_details()
        unknown = sorted(set(shapes) - set(details))
        if unknown:
            raise FlagError(f"--input_layer {', '.join(unknown)}: not an input of {sig} ({', '.join(details)})")
        inputs = {n: random_input(shapes.get(n, [max(int(x), 1) for x in d["shape"]]), d["dtype"], rng)
                  for n, d in details.items()}

        def invoke():
            runner(**inputs)
    else:
        details = {d["name"]: d for d in interp.get_input_details()}
        for n, shape in shapes.items():
            if n not in details:
                raise FlagError(f"--input_layer {n}: not an input of the model ({', '.join(details)})")
            interp.resize_tensor_input(details[n]["index"], shape)
        interp.allocate_tensors()
        for n, d in details.items():
            interp.set_tensor(d["index"], random_input(shapes.get(n, list(d["shape"])), d["dtype"], rng))

        def invoke():
            interp.invoke()
    init_us = (time.perf_counter() - t0) * 1e6
    log(f"INFO: Initialized session in {init_us / 1e3:.3f}ms.")
    rss_init = _rss_mb()

    def timed(n: int) -> list[float]:
        out = []
        for _ in range(n):
            s = time.perf_counter()
            try:
                invoke()
            except (ValueError, RuntimeError) as e:
                raise FlagError(f"inference failed: {(str(e).strip().splitlines() or ['?'])[0]}") from None
            out.append((time.perf_counter() - s) * 1e6)
        return out

    log(f"INFO: Running benchmark for exactly {f['warmup_runs']} iterations (warm-up).")
    warm = timed(f["warmup_runs"])
    if warm:
        log(f"INFO: {_stats(warm)}")
    log(f"INFO: Running benchmark for exactly {f['num_runs']} iterations.")
    runs = timed(f["num_runs"])
    log(f"INFO: {_stats(runs)}")
    first = warm[0] if warm else runs[0]
    warm_avg = sum(warm) / len(warm) if warm else float("nan")
    avg = sum(runs) / len(runs)
    log(f"INFO: Inference timings in us: Init: {init_us:.0f}, First inference: {first:.0f}, "
        f"Warmup (avg): {warm_avg:.6g}, Inference (avg): {avg:.6g}")
    log("INFO: Note: as the benchmark tool itself affects memory footprint, the following is only APPROXIMATE "
        "to the actual memory footprint of the model at runtime. Take the information at your discretion.")
    log(f"INFO: Memory footprint delta from the start of the tool (MB): init={rss_init - rss0:.4g} "
        f"overall={_rss_mb() - rss0:.4g}")
    return {"signature": sig, "init_us": init_us, "first_us": first, "warmup_avg_us": warm_avg, "avg_us": avg}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        f = parse_flags(argv)
        if f["help"]:
            print(__doc__.split("\n\n")[0])
            for name, (default, _, text) in FLAGS.items():
                print(f"  --{name}={default!s:<8} {text}")
            return 0
        run(f)
    except FlagError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
