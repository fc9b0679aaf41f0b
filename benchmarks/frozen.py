"""Compiled decoding with the weights as graph inputs against frozen into the graph.

``compile_decoding`` freezes bf16 weights on a CPU into greedy search's graph (inductor's
``freezing``, then ``max_autotune`` picks, per product, its own C++ GEMM kernel or oneDNN's by
timing both), leaves beam search's graph and float32 weights as graph inputs (MKL on
input-major weights). This measures those choices (the frozen variant freezes beam steps too,
``frozen_beams``) on the peers batch (random weights, ``peers.py``'s dimensions and batch),
each precision's two compiled variants interleaved in one process (medians and minima, as
``layout.py``), and checks that they give the same tokens.

    python benchmarks/frozen.py                                        # d_model 256, bf16
    python benchmarks/frozen.py --precisions bf16 float32 --beams 1 5
    python benchmarks/frozen.py --d-model 512 --layers 6 --heads 8 --ffn-dim 2048 --repeats 9
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without `pip install -e .`
sys.path.insert(0, str(ROOT / "benchmarks"))

from layout import race_searches, report  # noqa: E402
from peers import add_size_arguments, ours  # noqa: E402

from seq2seq_diff.compiled import CompiledDecode, compile_decoding  # noqa: E402
from seq2seq_diff.translator import inference_model  # noqa: E402


def variants(kind: str, precision: str, args) -> dict[str, torch.nn.Module]:
    """The precision's model compiled with its weights as graph inputs and frozen."""
    quantize = "bf16" if precision == "bf16" else "none"
    model = inference_model(ours(kind, args), "cpu", quantize=quantize)
    built = {}
    for frozen in (False, True):
        compiled = compile_decoding(model)
        compiled.decode = CompiledDecode(compiled, frozen=frozen, frozen_beams=frozen)
        built["frozen" if frozen else "graph inputs"] = compiled
    return built


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_size_arguments(parser)
    parser.add_argument("--kinds", nargs="+", choices=["diff", "standard"],
                        default=["standard", "diff"])
    parser.add_argument("--precisions", nargs="+", choices=["bf16", "float32"], default=["bf16"])
    parser.add_argument("--beams", type=int, nargs="+", default=[1])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.set_defaults(device="cpu", dtype="float32")  # what peers.decode_fn reads
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"d_model {args.d_model}, {args.layers}+{args.layers} layers, FFN {args.ffn_dim}, "
          f"vocab {args.vocab}; {args.threads} threads; torch {torch.__version__}")
    print(f"{args.batch} sentences x {args.src_len} tokens, {args.out_len} output tokens; "
          f"ms per search, median of {args.repeats} (min); speed against 'graph inputs' "
          "(median / min)")
    for precision in args.precisions:
        for kind in args.kinds:
            models = variants(kind, precision, args)
            for beam in args.beams:
                same, times = race_searches(models, args, beam, precision)
                label = "greedy" if beam == 1 else f"beam {beam}"
                report(f"  {precision}, {kind}, {label} (same tokens: {same})", times,
                       "graph inputs", 14)


if __name__ == "__main__":
    main()
