"""Self-attention KV cache: appends in place into buffers with room against a copy each step.

``KVCache`` keeps its positions in buffers with room to grow and writes each step's position in
place; before the thirteenth session every step made a new tensor of all cached positions
(``torch.cat``), O(L) a step. This runs the same model's searches both ways, interleaved in one
process (medians and minima, as ``layout.py``): "in place" is the library as it is; "copy each
step" forces every append through the concatenating path that autograd still uses
(``attention._functional``), and compiled greedy steps to take their rows by index, as they
did. Both must give the same tokens. The peers batch by default (``peers.py``: 32 random
sentences, 30 tokens in and out); a translation batch of a book is wider and its sentences
longer (``--batch 150 --out-len 60``).

The command line raises glibc's malloc thresholds (``seq2seq_diff.malloc``), which makes the
fresh tensor of each copy cheaper to allocate; so does this script unless ``--system-malloc``.

    python benchmarks/kv_cache.py                                        # eager float32
    python benchmarks/kv_cache.py --precision bf16 --compiled --beams 1 5
    python benchmarks/kv_cache.py --batch 150 --out-len 60 --repeats 5 --compiled --precision bf16
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without `pip install -e .`
sys.path.insert(0, str(ROOT / "benchmarks"))

from layout import race, report  # noqa: E402
from peers import add_size_arguments, decode_fn, ours  # noqa: E402

import seq2seq_diff.attention as attention  # noqa: E402
from seq2seq_diff.compiled import compile_decoding  # noqa: E402
from seq2seq_diff.malloc import tune_malloc  # noqa: E402
from seq2seq_diff.model import DecoderCache  # noqa: E402
from seq2seq_diff.translator import inference_model  # noqa: E402


@contextlib.contextmanager
def copy_each_step() -> Iterator[None]:
    """Every self-attention append makes a new tensor of all positions, and compiled greedy
    steps take their rows by index as beam steps do (the old behaviour)."""
    saved = attention._functional, DecoderCache.reserve
    attention._functional = lambda new, cached, rows: True
    DecoderCache.reserve = lambda cache, positions: cache.index_rows()
    try:
        yield
    finally:
        attention._functional, DecoderCache.reserve = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_size_arguments(parser)
    parser.add_argument("--kind", choices=["diff", "standard"], default="standard")
    parser.add_argument("--precision", choices=["none", "bf16"], default="none")
    parser.add_argument("--compiled", action="store_true", help="translate --compile's steps")
    parser.add_argument("--beams", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--system-malloc", action="store_true")
    parser.set_defaults(device="cpu", dtype="float32")  # what peers.decode_fn reads
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tuned = not args.system_malloc and tune_malloc()
    print(f"d_model {args.d_model}, {args.layers}+{args.layers} layers, {args.kind}, "
          f"{args.precision}{', compiled' if args.compiled else ''}; {args.threads} threads; "
          f"malloc {'tuned' if tuned else 'system'}; torch {torch.__version__}")
    print(f"{args.batch} sentences x {args.src_len} tokens, {args.out_len} output tokens; ms per "
          f"search, median of {args.repeats} (min); speed against 'copy each step'")
    model = inference_model(ours(args.kind, args), "cpu", quantize=args.precision,
                            pack=False if args.compiled else None)  # graphs take plain weights
    if args.compiled:  # one model: the two ways are graphs of their own (they differ in a global)
        model = compile_decoding(model)
    for beam in args.beams:
        run = decode_fn("ours", model, args, beam, args.precision)

        def copying(run=run) -> list:
            with copy_each_step():
                return run()
        same, times = race({"copy each step": copying, "in place": run}, args.repeats)
        label = "greedy" if beam == 1 else f"beam {beam}"
        report(f"  {label} (same tokens: {same})", times, "copy each step", 16)


if __name__ == "__main__":
    main()
