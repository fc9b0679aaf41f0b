"""Translation speed (greedy, beam 5; float32, int8, bf16) and peak memory (a book vs the book ×10).

Speed: ``Translator.translate`` on the lines of a real file, greedy and beam search interleaved in
one process, median over --repeats runs after one warm-up; sentences/s and output tokens/s.
Memory: ``python cli.py translate`` in a fresh child process on the book and on the book repeated
--times times; the peak RSS of each, and their ratio (target: flat, ≈ 1.0).

    python benchmarks/translate.py --model runs/demo/model
    python benchmarks/translate.py --model runs/demo/model --random-config configs/small-enro.yaml
    python benchmarks/translate.py --model runs/small-enro/model --precisions none bf16 int8 \
        --no-memory
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without `pip install -e .`

from seq2seq_diff.model import ModelConfig, Seq2SeqTransformer  # noqa: E402
from seq2seq_diff.model_dir import load_model_dir  # noqa: E402
from seq2seq_diff.translator import Translator  # noqa: E402

BOOK = ROOT / "data/en-ro/book/gimp-manual-heldout.en"


PRECISIONS = ("none", "packed", "unpacked", "as-trained", "int8", "bf16", "compiled",
              "bf16-compiled", "aot", "bf16-aot", "int8-aot")


def build_translator(args, beam_size: int, precision: str = "none") -> Translator:
    """``precision``: none (float32 as translate runs it by default on this CPU), packed
    (``--pack``), unpacked (``--no-pack``: input-major weights on torch's GEMM), as-trained (the
    training model itself: unfused, row-major), int8, bf16, compiled (``--compile``),
    bf16-compiled (``--bf16 --compile``), aot (``--aot``), bf16-aot (``--bf16 --aot``) or
    int8-aot (``--int8 --aot``; the graphs built, or loaded from ``$SEQ2SEQ_DIFF_AOT_CACHE``,
    in the warm-up)."""
    quantize = precision.removesuffix("compiled").removesuffix("aot").strip("-")
    options = {"quantize": quantize if quantize in ("int8", "bf16") else "none",
               "pack": {"packed": True, "unpacked": False, "as-trained": False}.get(precision),
               "compile": precision.endswith("compiled"), "aot": precision.endswith("aot")}
    translator = Translator.from_pretrained(args.model, beam_size=beam_size, **options)
    model = None
    if args.random_config:  # same tokenizer, the preset's dimensions, random weights
        with open(args.random_config) as f:
            values = yaml.safe_load(f)["model"]["config"]
        values["vocab_size"] = translator.tokenizer.vocab_size
        torch.manual_seed(0)
        model = Seq2SeqTransformer(ModelConfig(**values)).eval()
        translator = Translator(model, translator.tokenizer, beam_size=beam_size, **options)
    if precision == "as-trained":
        translator.model = model if model is not None else load_model_dir(args.model)[0]
    return translator


def speed(args, lines: list[str]) -> None:
    translators = {(f"beam {k}" if k > 1 else "greedy", precision):
                   build_translator(args, k, precision)
                   for k in args.beams for precision in args.precisions}
    runs: dict[tuple[str, str], list[tuple[float, int]]] = {key: [] for key in translators}
    first: dict[tuple[str, str], tuple[float, list[str]]] = {}  # each one's warm-up run
    for i in range(args.repeats + 1):
        for key, translator in translators.items():  # interleaved
            start = time.perf_counter()
            outputs = translator.translate(lines)
            seconds = time.perf_counter() - start
            tokens = sum(len(ids) for ids in translator.tokenizer.encode(outputs))
            if i > 0:
                runs[key].append((seconds, tokens))
            else:
                first[key] = seconds, outputs
    model = Seq2SeqTransformer(next(iter(translators.values())).model.config)  # its size:
    # packed and int8 weights are not torch parameters, and their output projection is untied
    print(f"model {args.random_config or args.model} ({model.config.attention}, "
          f"{model.num_parameters() / 1e6:.1f}M parameters), {len(lines)} lines of {args.input}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}; warm-up: the first "
          f"(untimed) run, compiling included; differ: lines unlike {args.precisions[0]}'s")
    print(f"{'search':>7} {'precision':>14} {'sent/s':>8} {'out tok/s':>10} {'warm-up s':>10} "
          f"{'differ':>7}")
    for (search, precision), results in runs.items():
        seconds = statistics.median(s for s, _ in results)
        tokens = statistics.median(t for _, t in results)
        reference = first[search, args.precisions[0]][1]
        differ = sum(a != b for a, b in zip(first[search, precision][1], reference, strict=True))
        print(f"{search:>7} {precision:>14} {len(lines) / seconds:>8.1f} "
              f"{tokens / seconds:>10.0f} {first[search, precision][0]:>10.1f} {differ:>7}",
              flush=True)


def peak_rss_mib(args, input_path: Path, output_path: Path) -> float:
    code = ("import resource, sys; from seq2seq_diff.cli import main; "
            "rc = main(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); "
            "sys.exit(rc)")
    cmd = [sys.executable, "-c", code, "translate", "--model", str(args.model),
           "--input", str(input_path), "--output", str(output_path), "--quiet",
           "--beam-size", str(args.memory_beam)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    return int(result.stderr.strip().splitlines()[-1]) / 1024  # ru_maxrss is in KiB on Linux


def memory(args) -> None:
    text = Path(args.input).read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        big = tmp / "book_x.en"
        big.write_text(text * args.times, encoding="utf-8")
        one = peak_rss_mib(args, Path(args.input), tmp / "one.ro")
        many = peak_rss_mib(args, big, tmp / "many.ro")
        lines_out = sum(1 for _ in open(tmp / "many.ro", encoding="utf-8"))
    lines_in = text.count("\n") * args.times
    print(f"peak RSS, beam {args.memory_beam}: book {one:.0f} MiB, book x{args.times} "
          f"{many:.0f} MiB, ratio {many / one:.2f} ({lines_out}/{lines_in} lines out/in)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="an exported model directory")
    parser.add_argument("--random-config", help="a preset YAML: its dimensions, random weights")
    parser.add_argument("--input", default=str(BOOK))
    parser.add_argument("--lines", type=int, default=0, help="use only the first N lines")
    parser.add_argument("--beams", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--precisions", nargs="+", default=["none"], choices=PRECISIONS,
                        help="float32 (none: translate's default here, packed: --pack, unpacked: "
                             "--no-pack, as-trained: the training model unchanged), --int8, "
                             "--bf16, --compile (float32), --compile --bf16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--times", type=int, default=10, help="book repetitions for memory")
    parser.add_argument("--memory-beam", type=int, default=5)
    parser.add_argument("--no-speed", dest="speed", action="store_false")
    parser.add_argument("--no-memory", dest="memory", action="store_false")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lines = Path(args.input).read_text(encoding="utf-8").splitlines()
    if args.lines:
        lines = lines[: args.lines]
    if args.speed:
        speed(args, lines)
    if args.memory:
        memory(args)


if __name__ == "__main__":
    main()
