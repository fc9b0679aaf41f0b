"""int8 compiled ahead of time (``translate --int8 --aot``) against float32, eager and AOT.

The same model (random weights, ``peers.py``'s dimensions and batch) decoded as ``translate``
runs it in float32 (``translate``, ``--aot``) and in int8 (``--int8``: PyTorch's dynamic
quantisation, eager; ``--int8 --aot``: int8 with activations quantised per row inside the AOT
graphs, ``quantize.int8_rows``), interleaved in one process (medians and minima, as
``layout.py``), each against float32 ``--aot``; prints whether they give the same tokens (int8
rounds: they need not). The AOT graphs are built in the untimed first searches, into a
temporary directory unless ``--cache-dir`` names one.

    python benchmarks/int8.py --beams 5 1 --repeats 9
    python benchmarks/int8.py --d-model 512 --layers 6 --heads 8 --ffn-dim 2048 --kinds standard
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without `pip install -e .`
sys.path.insert(0, str(ROOT / "benchmarks"))

from layout import race_variants, variant_parser  # noqa: E402
from peers import ours  # noqa: E402

from seq2seq_diff import exported  # noqa: E402
from seq2seq_diff.translator import inference_model  # noqa: E402


def variants(kind: str, args) -> dict[str, torch.nn.Module]:
    """The model as ``translate`` decodes it in float32 and int8, eagerly and with ``--aot``."""
    model = ours(kind, args)
    return {"float32": inference_model(model, "cpu"),
            "int8": inference_model(model, "cpu", "int8"),
            "float32 aot": inference_model(model, "cpu", aot=True),
            "int8 aot": inference_model(model, "cpu", "int8", aot=True)}


def main() -> None:
    parser = variant_parser(__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", help="keep the AOT graphs here (default: a temporary "
                                            "directory)")
    parser.set_defaults(precisions=["float32"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="int8-") as scratch:
        os.environ[exported.CACHE_ENV] = args.cache_dir or scratch
        race_variants(args, lambda kind, precision: variants(kind, args), "float32 aot", 11)


if __name__ == "__main__":
    main()
