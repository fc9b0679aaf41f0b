"""Searches compiled ahead of time (``translate --aot``) against ``torch.compile`` (``--compile``).

The same model (random weights, ``peers.py``'s dimensions and batch) decoded as ``translate``
runs it eagerly (weights oneDNN-packed where that pays), with compiled steps and with AOTInductor
graphs (``seq2seq_diff.exported``; where their weights are frozen into them, packed for
oneDNN, also unfrozen: "aot, unfrozen"), interleaved in one process (medians and minima, as
``layout.py``); prints whether they give the same tokens, and what each costs before its first
search: compiling (torch.compile, in every process), building the graphs (AOT, once per model)
and loading them (AOT, every later process).
The AOT graphs are kept in a temporary directory unless ``--cache-dir`` names one.

    python benchmarks/aot.py                                      # d_model 256, bf16, greedy
    python benchmarks/aot.py --precisions bf16 float32 --beams 1 5
    python benchmarks/aot.py --d-model 512 --layers 6 --heads 8 --ffn-dim 2048 --repeats 9
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without `pip install -e .`
sys.path.insert(0, str(ROOT / "benchmarks"))

from layout import race_variants, variant_parser  # noqa: E402
from peers import decode_fn, ours  # noqa: E402

from seq2seq_diff.exported import aot_decoding  # noqa: E402
from seq2seq_diff.translator import inference_model  # noqa: E402


def first_search(model, args, beam: int, precision: str) -> float:
    """Seconds of a model's first search (its compiling or building included)."""
    began = time.perf_counter()
    decode_fn("ours", model, args, beam, precision)()
    return time.perf_counter() - began


def variants(kind: str, precision: str, args, cache_dir: Path) -> dict[str, torch.nn.Module]:
    """The model as ``translate`` decodes it eagerly, with ``--compile`` and with ``--aot``,
    each timed through its first searches; the AOT graphs loaded again as a new run would."""
    quantize = "bf16" if precision == "bf16" else "none"
    model = ours(kind, args)
    plain = inference_model(model, "cpu", quantize, pack=False)
    built = {"eager": inference_model(model, "cpu", quantize),  # packed where packing pays
             "compiled": inference_model(model, "cpu", quantize, compile=True)}
    aot = aot_decoding(plain, quantize, cache_dir)
    building = [("compiled", built["compiled"]), ("aot, building", aot)]
    if aot.decode.__self__.frozen:  # frozen graphs (weights packed): against unfrozen ones
        built["aot, unfrozen"] = aot_decoding(plain, quantize, cache_dir, frozen=False)
        building.append(("aot, unfrozen, building", built["aot, unfrozen"]))
    for name, variant in building:
        spent = [first_search(variant, args, beam, precision) for beam in args.beams]
        print(f"    {kind} {precision}, {name}: first searches "
              + ", ".join(f"{s:.1f} s" for s in spent), flush=True)
    began = time.perf_counter()
    built["aot"] = aot_decoding(plain, quantize, cache_dir)  # as a later run does
    loading = [first_search(built["aot"], args, beam, precision) for beam in args.beams]
    print(f"    {kind} {precision}, aot, loading: {time.perf_counter() - began:.1f} s to the "
          f"end of the first searches ({', '.join(f'{s:.2f} s' for s in loading)})", flush=True)
    return built


def main() -> None:
    parser = variant_parser(__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", help="keep the AOT graphs here (default: a temporary "
                                            "directory)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="aot-") as scratch:
        cache_dir = Path(args.cache_dir or scratch)
        race_variants(args, lambda kind, precision: variants(kind, precision, args, cache_dir),
                      "compiled", 10)


if __name__ == "__main__":
    main()
