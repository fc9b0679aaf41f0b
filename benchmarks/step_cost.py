"""Where a decoding step's time goes on the CPU: the fixed cost of a step against its products.

Decodes the peers' batch (``benchmarks/peers.py``: 32 random sentences of 30 source tokens,
exactly 30 output tokens) with the packed float32 model that ``translate`` runs, at the peers'
size and at a d_model 16 model of the same depth and a vocabulary of 64. The d16 model does
almost no arithmetic, so its step time is the fixed cost of a step: Python, op dispatch and
per-call library overhead. The two models run interleaved, each decode followed by an encode
whose time is subtracted; printed: medians per decoding step and the fixed share of the
full-size step.

Then times single ops at decoding shapes (32 rows, one position each), in the same process:
``F.rms_norm``, a oneDNN-packed linear and torch's plain one (MKL), and one element-wise add,
showing how much of each call is overhead rather than arithmetic.

    python benchmarks/step_cost.py
    python benchmarks/step_cost.py --kinds diff --beams 1 --repeats 9
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

from peers import add_size_arguments, decode_fn, make_batch, ours, timed  # noqa: E402

from seq2seq_diff.packed import PackedLinear, pack_linears  # noqa: E402


def step_runs(kind: str, args, d_model: int, beam: int) -> tuple[Callable, Callable]:
    """(decode the batch, encode it) with a packed model of width ``d_model``."""
    size = argparse.Namespace(**vars(args))
    if d_model != args.d_model:  # the fixed-cost model: same depth, little vocabulary
        size.d_model, size.heads, size.ffn_dim = d_model, 2, 3 * d_model
        size.vocab = args.fixed_vocab  # nor per-step work over a large vocabulary
    torch.manual_seed(0)
    model = pack_linears(ours(kind, size))
    src = make_batch(size)[0]
    mask = torch.ones_like(src, dtype=torch.bool)

    def encode() -> None:
        with torch.inference_mode():
            model.encode(src, mask)
    return decode_fn(kind, model, size, beam), encode


def step_ms(kind: str, args, beam: int) -> tuple[float, float]:
    """Median milliseconds per decoding step (encoder time subtracted) of the fixed-cost model
    and the full-size one, timed interleaved: a warm-up, then ``args.repeats`` rounds."""
    runs = [step_runs(kind, args, d, beam) for d in (args.fixed_d_model, args.d_model)]
    times: list[list[float]] = [[] for _ in runs]
    for round_ in range(args.warmup + args.repeats):
        for (decode, encode), measured in zip(runs, times, strict=True):
            seconds = timed(decode, sync=False) - timed(encode, sync=False)
            if round_ >= args.warmup:
                measured.append(seconds)
    steps = args.out_len + 1  # out_len pieces and the forced eos
    fixed, full = (statistics.median(t) / steps * 1e3 for t in times)
    return fixed, full


def op_us(fn: Callable[[], object], calls: int = 3000) -> float:
    with torch.inference_mode():
        for _ in range(200):
            fn()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - start) / calls * 1e6


def op_costs(rows: int, d: int) -> str:
    """One line: microseconds per call of rms_norm, packed and plain linear, add at width d."""
    x = torch.randn(rows, 1, d)
    weight = torch.randn(d)
    plain = torch.nn.Linear(d, 3 * d, bias=False)
    packed = PackedLinear(plain)
    return (f"d {d:4}: rms_norm {op_us(lambda: F.rms_norm(x, (d,), weight, 1e-5)):6.1f}   "
            f"linear {d}->{3 * d} packed {op_us(lambda: packed(x)):6.1f}, "
            f"plain {op_us(lambda: plain(x)):6.1f}   add {op_us(lambda: x + x):5.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kinds", nargs="+", default=["diff", "standard"])
    parser.add_argument("--beams", type=int, nargs="+", default=[1, 5])
    add_size_arguments(parser)
    parser.add_argument("--fixed-d-model", type=int, default=16)
    parser.add_argument("--fixed-vocab", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads; ms per decoding step, encoder "
          f"excluded; batch {args.batch} x {args.src_len}, {args.out_len} output tokens")
    print(f"{'kind':9} {'search':7} {f'd{args.fixed_d_model}':>8} {f'd{args.d_model}':>8} "
          f"{'fixed share':>12}")
    for kind in args.kinds:
        for beam in args.beams:
            fixed, full = step_ms(kind, args, beam)
            search = "greedy" if beam == 1 else f"beam {beam}"
            print(f"{kind:9} {search:7} {fixed:8.2f} {full:8.2f} {fixed / full:12.0%}")

    print(f"\nmicroseconds per call, {args.batch} rows of one position")
    for d in (args.fixed_d_model, args.d_model):
        print(op_costs(args.batch, d))


if __name__ == "__main__":
    main()
