"""CPU weight layout for decoding: row-major (as trained) against input-major (``translate``).

Two measurements, each interleaved in one process (medians and minima: this machine's noise
shifts whole runs by ±20%, so the minimum is the steadier figure):

* ``products``: ``F.linear`` on each decoding product's shape, the weight row-major (its
  transpose handed to MKL) against the same weight stored input-major
  (``packed.store_input_major``), at several row counts;
* ``searches``: greedy and beam search on the peers batch (random weights, ``peers.py``'s
  dimensions and batch), the training model as it is ("as trained"), an inference copy with its
  projections fused ("fused") and that copy stored input-major ("input-major", what
  ``translate`` decodes on a CPU where packing does not pay), eager and, with ``--compiled``,
  compiled (``translate --compile``). Every variant must give the same tokens.

    python benchmarks/layout.py                                   # d_model 256, both parts
    python benchmarks/layout.py --parts searches --compiled --d-model 512 --layers 6 --heads 8 \\
        --ffn-dim 2048 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without `pip install -e .`
sys.path.insert(0, str(ROOT / "benchmarks"))

from peers import add_size_arguments, decode_fn, ours  # noqa: E402

from seq2seq_diff.compiled import compile_decoding  # noqa: E402
from seq2seq_diff.packed import store_input_major  # noqa: E402


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each function, the functions taking turns ``repeats`` times."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def race(fns: dict[str, Callable[[], object]],
         repeats: int) -> tuple[bool, dict[str, list[float]]]:
    """Two untimed rounds of each search (compiling), then ``repeats`` interleaved: (all gave
    the same tokens, seconds per search of each)."""
    outputs = {name: fn() for name, fn in fns.items()}
    interleaved(fns, 1)
    return len({str(out) for out in outputs.values()}) == 1, interleaved(fns, repeats)


def race_searches(models: dict[str, torch.nn.Module], args, beam: int,
                  precision: str = "none") -> tuple[bool, dict[str, list[float]]]:
    """``race`` of each model's search of the peers batch (``peers.decode_fn``)."""
    fns = {name: decode_fn("ours", model, args, beam, precision) for name, model in models.items()}
    return race(fns, args.repeats)


def report(heading: str, times: dict[str, list[float]], reference: str, width: int) -> None:
    """``heading``, then each variant's milliseconds and its speed against ``reference``."""
    print(heading, flush=True)
    for name, spent in times.items():
        print(f"    {name:<{width}}" + summary(spent, times[reference], 1e3, ""), flush=True)


def variant_parser(description: str) -> argparse.ArgumentParser:
    """Options of a script racing variants of our model on the peers batch (``race_variants``):
    sizes, kinds, precisions, beams, repeats, threads."""
    parser = argparse.ArgumentParser(description=description)
    add_size_arguments(parser)
    parser.add_argument("--kinds", nargs="+", choices=["diff", "standard"],
                        default=["standard", "diff"])
    parser.add_argument("--precisions", nargs="+", choices=["bf16", "float32"], default=["bf16"])
    parser.add_argument("--beams", type=int, nargs="+", default=[1])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.set_defaults(device="cpu", dtype="float32")  # what peers.decode_fn reads
    return parser


def race_variants(args, variants: Callable[[str, str], dict[str, torch.nn.Module]],
                  reference: str, width: int) -> None:
    """For each precision and kind, ``variants(kind, precision)``'s searches raced at each beam
    size and reported against variant ``reference``, with whether they gave the same tokens."""
    torch.set_num_threads(args.threads)
    print(f"d_model {args.d_model}, {args.layers}+{args.layers} layers, FFN {args.ffn_dim}, "
          f"vocab {args.vocab}; {args.threads} threads; torch {torch.__version__}")
    print(f"{args.batch} sentences x {args.src_len} tokens, {args.out_len} output tokens; "
          f"ms per search, median of {args.repeats} (min); speed against '{reference}' "
          "(median / min)")
    for precision in args.precisions:
        for kind in args.kinds:
            models = variants(kind, precision)
            for beam in args.beams:
                same, times = race_searches(models, args, beam, precision)
                label = "greedy" if beam == 1 else f"beam {beam}"
                report(f"  {precision}, {kind}, {label} (same tokens: {same})", times,
                       reference, width)


def summary(times: list[float], reference: list[float], unit: float, label: str) -> str:
    med, low = statistics.median(times), min(times)
    return (f"{med * unit:9.1f} (min {low * unit:8.1f}) {label}  "
            f"{statistics.median(reference) / med:5.2f}× / {min(reference) / low:4.2f}× min")


def products(args) -> None:
    d, ffn = args.d_model, -(-2 * args.ffn_dim // 3 // 8) * 8
    shapes = [(d, d), (d, 3 * d), (d, 2 * ffn), (ffn, d), (d, args.vocab)]
    print(f"\nproducts: F.linear, µs per call; input-major against row-major (median / min), "
          f"{args.repeats * 3} turns of 20 calls (4 for the widest)")
    with torch.inference_mode():
        for rows in args.rows:
            for k, n in shapes:
                weight = torch.randn(n, k) * 0.05
                stored = weight.t().contiguous().t()  # the same matrix, input-major
                x = torch.randn(rows, k)
                calls = 20 if n < 4 * d else 4

                def repeat(w: torch.Tensor, x: torch.Tensor = x, calls: int = calls) -> None:
                    for _ in range(calls):
                        F.linear(x, w)

                fns = {"row-major": lambda w=weight: repeat(w),
                       "input-major": lambda w=stored: repeat(w)}
                interleaved(fns, 1)  # warm-up
                times = interleaved(fns, args.repeats * 3)
                print(f"  {rows:4d} rows, {k:5d} -> {n:5d}: "
                      + summary(times["input-major"], times["row-major"], 1e6 / calls,
                                "input-major"))


def searches(args) -> None:
    print(f"\nsearches: {args.batch} sentences x {args.src_len} tokens, {args.out_len} output "
          f"tokens; ms per search, median of {args.repeats} (min); speed against 'as trained' "
          "(median / min)")
    for kind in ("diff", "standard"):
        model = ours(kind, args).eval()
        variants = {"as trained": model, "fused": model.inference_copy(),
                    "input-major": store_input_major(model.inference_copy())}
        if args.compiled:  # compiled during the untimed first call
            variants["compiled row-major"] = compile_decoding(model)
            variants["compiled input-major"] = compile_decoding(variants["input-major"])
        for beam in args.beams:
            same, times = race_searches(variants, args, beam)
            label = "greedy" if beam == 1 else f"beam {beam}"
            report(f"  {kind}, {label} (same tokens: {same})", times, "as trained", 22)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_size_arguments(parser)
    parser.add_argument("--parts", nargs="+", choices=["products", "searches"],
                        default=["products", "searches"])
    parser.add_argument("--rows", type=int, nargs="+", default=[8, 32, 160, 960],
                        help="rows per product: a few sentences, the peers batch, its beam 5, "
                             "an encoder batch")
    parser.add_argument("--beams", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.set_defaults(device="cpu", dtype="float32")  # what peers.decode_fn reads
    parser.add_argument("--compiled", action="store_true",
                        help="also compiled searches (tens of seconds of compiling each)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"d_model {args.d_model}, {args.layers}+{args.layers} layers, FFN {args.ffn_dim}, "
          f"vocab {args.vocab}; {args.threads} threads; torch {torch.__version__}")
    if "products" in args.parts:
        products(args)
    if "searches" in args.parts:
        searches(args)


if __name__ == "__main__":
    main()
