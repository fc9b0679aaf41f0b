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

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without `pip install -e .`
sys.path.insert(0, str(ROOT / "benchmarks"))

from layout import race_variants, variant_parser  # noqa: E402
from peers import ours  # noqa: E402

from seq2seq_diff.compiled import CompiledDecode, compile_decoding  # noqa: E402
from seq2seq_diff.translator import inference_model  # noqa: E402


def variants(kind: str, precision: str, args) -> dict[str, torch.nn.Module]:
    """The precision's model compiled with its weights as graph inputs and frozen."""
    quantize = "bf16" if precision == "bf16" else "none"
    model = inference_model(ours(kind, args), "cpu", quantize=quantize, pack=False)
    built = {}
    for frozen in (False, True):
        compiled = compile_decoding(model)
        compiled.decode = CompiledDecode(compiled, frozen=frozen, frozen_beams=frozen)
        built["frozen" if frozen else "graph inputs"] = compiled
    return built


def main() -> None:
    args = variant_parser(__doc__.splitlines()[0]).parse_args()
    race_variants(args, lambda kind, precision: variants(kind, precision, args), "graph inputs",
                  14)


if __name__ == "__main__":
    main()
