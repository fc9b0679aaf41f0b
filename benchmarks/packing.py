"""oneDNN-packed linear weights (``translate``'s eager default on CPUs other than Intel's)
against the same model unpacked (``--no-pack``), float32 and ``--bf16``.

The same model (random weights, ``peers.py``'s dimensions and batch) decoded eagerly as
``translate`` runs it with ``--pack`` and with ``--no-pack`` (torch's GEMM on input-major
weights; bf16 under autocast), interleaved in one process (medians and minima, as
``layout.py``); prints whether they give the same tokens.

    python benchmarks/packing.py --precisions bf16 float32 --beams 1 5
    python benchmarks/packing.py --d-model 512 --layers 6 --heads 8 --ffn-dim 2048 --repeats 5
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

from seq2seq_diff.translator import inference_model  # noqa: E402


def variants(kind: str, precision: str, args) -> dict[str, torch.nn.Module]:
    quantize = "bf16" if precision == "bf16" else "none"
    model = ours(kind, args)
    return {"unpacked": inference_model(model, "cpu", quantize, pack=False),
            "packed": inference_model(model, "cpu", quantize, pack=True)}


def main() -> None:
    args = variant_parser(__doc__.splitlines()[0]).parse_args()
    race_variants(args, lambda kind, precision: variants(kind, precision, args), "unpacked", 8)


if __name__ == "__main__":
    main()
