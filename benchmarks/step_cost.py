"""Where a decoding step's time goes on the CPU: the fixed cost of a step against its products.

Decodes the peers' batch (``benchmarks/peers.py``: 32 random sentences of 30 source tokens,
exactly 30 output tokens) with the packed float32 model that ``translate`` runs, at the peers'
size and at a d_model 16 model of the same depth and a vocabulary of 64. The d16 model does
almost no arithmetic, so its step time is the fixed cost of a step: Python, op dispatch and
per-call library overhead.
Printed per decoding step, encoder excluded, with the fixed share of the full-size step.

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

from peers import decode_fn, make_batch, ours  # noqa: E402

from seq2seq_diff.packed import PackedLinear, pack_linears  # noqa: E402


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def step_ms(kind: str, args, d_model: int, beam: int) -> float:
    """Median milliseconds per decoding step (encoder time subtracted) of a packed model."""
    size = argparse.Namespace(**vars(args))
    if d_model != args.d_model:  # the fixed-cost model: same depth, heads and vocabulary
        size.d_model, size.heads, size.ffn_dim = d_model, 2, 3 * d_model
        size.vocab = args.fixed_vocab  # nor per-step work over a large vocabulary
    torch.manual_seed(0)
    model = pack_linears(ours(kind, size))
    run = decode_fn(kind, model, size, beam)
    src = make_batch(size)[0]
    mask = torch.ones_like(src, dtype=torch.bool)
    with torch.inference_mode():
        encode = median_seconds(lambda: model.encode(src, mask), args.repeats, args.warmup)
    total = median_seconds(run, args.repeats, args.warmup)
    return (total - encode) / (args.out_len + 1) * 1e3  # out_len pieces and the forced eos


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
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--fixed-d-model", type=int, default=16)
    parser.add_argument("--fixed-vocab", type=int, default=64)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--ffn-dim", type=int, default=1024, help="HF width (ours: 2/3 of it)")
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--src-len", type=int, default=30)
    parser.add_argument("--out-len", type=int, default=30)
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
            fixed = step_ms(kind, args, args.fixed_d_model, beam)
            full = step_ms(kind, args, args.d_model, beam)
            search = "greedy" if beam == 1 else f"beam {beam}"
            print(f"{kind:9} {search:7} {fixed:8.2f} {full:8.2f} {fixed / full:12.0%}")

    print(f"\nmicroseconds per call, {args.batch} rows of one position")
    for d in (args.fixed_d_model, args.d_model):
        print(op_costs(args.batch, d))

if __name__ == "__main__":
    main()
