"""A/B experiment: differential attention vs its standard twin, trained alike, several seeds.

Each config (by default ``configs/small-enro.yaml`` and its ``-standard`` twin, which differ only
in ``model.config.attention``) is trained once per seed with the same data, steps, batches and
schedule (``--max-steps`` replaces the presets' time budget so both kinds see the same number
of updates), exported, and scored with sacreBLEU on the test sets (beam search). The parameter
counts are checked to agree within 1%. Written to ``--out``:

- ``results.json``: every run's scores, parameters, steps, wall time and learning curve;
- ``results.md``: mean ± sample std across seeds per attention kind and test set;
- ``curves.png``: validation loss and BLEU against the step, every run (needs matplotlib).

The data (SentencePiece model, Arrow caches) is prepared once before the runs start, so runs can
share a machine (``--parallel``; on one GPU several small runs fit side by side).

    python benchmarks/ab.py --seeds 1 2 3 --max-steps 1450 --out runs/ab
    python benchmarks/ab.py --seeds 1 2 3 --parallel 6 --device cuda \\
        --train-args "--trainer.precision bf16-mixed" --out runs/ab-gpu
    python benchmarks/ab.py --evaluate runs/small-enro/model --out runs/small-enro/eval

``--evaluate DIR`` only scores an existing model directory (greedy and beam) on the test sets.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without `pip install -e .`
TEST = ROOT / "data/en-ro"
# name -> (path prefix of .en/.ro, number of leading lines used; None = all)
TEST_SETS = {
    "newstest2016": ("test/newstest2016", None),
    "flores101-devtest": ("test/flores101-devtest", None),
    "tatoeba-2000": ("test/tatoeba-v2021-08-07", 2000),  # the first 2,000, as in ANCHORS.md
    "book": ("book/gimp-manual-heldout", None),
}


def read_test_set(name: str) -> tuple[list[str], list[str]]:
    """Source and reference lines of a test set (``TEST_SETS``)."""
    prefix, limit = TEST_SETS[name]
    sides = []
    for lang in ("en", "ro"):
        lines = (TEST / f"{prefix}.{lang}").read_text(encoding="utf-8").splitlines()
        sides.append(lines[:limit] if limit else lines)
    return sides[0], sides[1]


def evaluate_model(model_dir: str | Path, device: str, beams: list[int],
                   sets: list[str]) -> dict[str, dict[str, float]]:
    """BLEU/chrF of a model directory on each test set, for each beam size (1 = greedy)."""
    from seq2seq_diff.evaluate import score
    from seq2seq_diff.translator import Translator

    scores: dict[str, dict[str, float]] = {}
    for beam in beams:
        translator = Translator.from_pretrained(model_dir, device=device, beam_size=beam)
        for name in sets:
            sources, references = read_test_set(name)
            start = time.perf_counter()
            hypotheses = translator.translate(sources)
            result = score(hypotheses, references, metrics=("bleu", "chrf"))
            key = f"{name}/beam{beam}"
            scores[key] = {"bleu": round(result["bleu"].score, 2),
                           "chrf": round(result["chrf"].score, 2),
                           "seconds": round(time.perf_counter() - start, 1)}
            scores["signature"] = result["bleu"].signature  # type: ignore[assignment]
            print(f"{model_dir} {key}: BLEU {scores[key]['bleu']:.2f} "
                  f"chrF {scores[key]['chrf']:.2f}", flush=True)
    return scores


def _metric_rows(run_dir: Path) -> list[dict[str, str]]:
    """The rows of a run's CSV logs (every version, in order)."""
    import csv

    rows: list[dict[str, str]] = []
    for path in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        with path.open(newline="") as handle:
            rows += csv.DictReader(handle)
    return rows


def learning_curve(run_dir: Path) -> list[dict[str, float]]:
    """Validation rows (step, val_loss, val_bleu, val_chrf) of a run's CSV log."""
    return [{key: float(row[key]) for key in ("step", "val_loss", "val_bleu", "val_chrf")
             if row.get(key)} for row in _metric_rows(run_dir) if row.get("val_loss")]


def train_throughput(run_dir: Path) -> float | None:
    """Median logged training tokens/s of a run."""
    values = [float(row["tok_s"]) for row in _metric_rows(run_dir) if row.get("tok_s")]
    return statistics.median(values) if values else None


def parameter_count(model_dir: Path) -> int:
    from seq2seq_diff.model_dir import load_model_dir

    model, _ = load_model_dir(model_dir)
    return sum(p.numel() for p in model.parameters())


def prepare_data(config: str) -> None:
    """Train or reuse the tokenizer and build the Arrow caches once, before parallel runs."""
    from seq2seq_diff.cli import build_datamodule

    datamodule = build_datamodule(config)
    datamodule.prepare_data()
    datamodule.setup("fit")


def run_one(config: str, seed: int, args: argparse.Namespace) -> dict:
    """Train one (config, seed) and score its exported model in a fresh process each."""
    kind = Path(config).stem
    run_dir = Path(args.out) / f"{kind}-seed{seed}"
    log_path = run_dir.with_suffix(".log")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(ROOT / "cli.py"), "train", "--config", config,
               "--seed_everything", str(seed), "--run_dir", str(run_dir),
               "--trainer.max_steps", str(args.max_steps), "--trainer.max_time", "null",
               "--trainer.enable_progress_bar", "false", *shlex.split(args.train_args)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    start = time.perf_counter()
    with log_path.open("w") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    seconds = time.perf_counter() - start
    if done.returncode:
        return {"config": config, "seed": seed, "error": f"training failed, see {log_path}"}
    score_path = run_dir / "scores.json"
    evaluate = [sys.executable, __file__, "--evaluate", str(run_dir / "model"), "--device",
                args.device, "--beams", *map(str, args.beams), "--scores-out", str(score_path)]
    with log_path.open("a") as log:
        done = subprocess.run(evaluate, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if done.returncode:
        return {"config": config, "seed": seed, "error": f"evaluation failed, see {log_path}"}
    curve = learning_curve(run_dir)
    result = {"config": config, "kind": kind, "seed": seed, "train_seconds": round(seconds, 1),
              "steps": args.max_steps, "tok_s": train_throughput(run_dir),
              "parameters": parameter_count(run_dir / "model"),
              "exported_step": json.loads((run_dir / "model/metadata.json").read_text()).get(
                  "global_step"),
              "scores": json.loads(score_path.read_text()), "curve": curve}
    with (Path(args.out) / "runs.jsonl").open("a") as handle:  # kept if the sweep is cut short
        handle.write(json.dumps(result) + "\n")
    return result


def summarize(runs: list[dict], beams: list[int]) -> str:
    """Markdown: mean ± std per kind and test set, then the runs one by one."""
    kinds = sorted({run["kind"] for run in runs})
    keys = [f"{name}/beam{beam}" for beam in beams for name in TEST_SETS]
    lines = ["| test set (beam) | " + " | ".join(f"{k} BLEU" for k in kinds) + " | "
             + " | ".join(f"{k} chrF" for k in kinds) + " |",
             "|---|" + "---|" * (2 * len(kinds))]

    def cell(kind: str, key: str, metric: str) -> str:
        values = [r["scores"][key][metric] for r in runs if r["kind"] == kind]
        if len(values) < 2:
            return f"{values[0]:.2f}" if values else "–"
        return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"

    for key in keys:
        lines.append(f"| {key.replace('/beam', ' (beam ')}) | "
                     + " | ".join(cell(k, key, "bleu") for k in kinds) + " | "
                     + " | ".join(cell(k, key, "chrf") for k in kinds) + " |")
    lines += ["", "| run | seed | parameters | steps | exported step | train s | tok/s "
              "| final val BLEU |",
              "|---|---|---|---|---|---|---|---|"]
    for run in runs:
        last = run["curve"][-1] if run["curve"] else {}
        tok_s = f"{run['tok_s']:.0f}" if run["tok_s"] else "–"
        lines.append(f"| {run['kind']} | {run['seed']} | {run['parameters']:,} | {run['steps']} "
                     f"| {run.get('exported_step')} "
                     f"| {run['train_seconds']} | {tok_s} | {last.get('val_bleu', 0):.2f} |")
    return "\n".join(lines) + "\n"


def plot_curves(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    colours = {}
    for run in runs:
        colour = colours.setdefault(run["kind"], f"C{len(colours)}")
        steps = [row["step"] for row in run["curve"]]
        for axis, metric in zip(axes, ("val_loss", "val_bleu"), strict=True):
            axis.plot(steps, [row.get(metric) for row in run["curve"]], color=colour, alpha=0.8,
                      label=f"{run['kind']} seed {run['seed']}")
    for axis, title in zip(axes, ("validation loss (label-smoothed)", "validation BLEU (greedy)"),
                           strict=True):
        axis.set_xlabel("step")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["configs/small-enro.yaml",
                                                         "configs/small-enro-standard.yaml"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--max-steps", type=int, default=1450,
                        help="optimizer steps per run (the same for every run)")
    parser.add_argument("--train-args", default="", help="extra `cli.py train` arguments")
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads per run (default: cores / parallel)")
    parser.add_argument("--device", default="cpu", help="for scoring: cpu or cuda")
    parser.add_argument("--beams", nargs="+", type=int, default=[5])
    parser.add_argument("--sets", nargs="+", default=list(TEST_SETS), choices=list(TEST_SETS))
    parser.add_argument("--out", default="runs/ab")
    parser.add_argument("--evaluate", metavar="MODEL_DIR", help="only score this model")
    parser.add_argument("--scores-out", help="with --evaluate: write the scores here as JSON")
    args = parser.parse_args()
    if args.evaluate:
        scores = evaluate_model(args.evaluate, args.device, args.beams, args.sets)
        if args.scores_out:
            Path(args.scores_out).write_text(json.dumps(scores, indent=1) + "\n")
        return
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // args.parallel)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    prepare_data(args.configs[0])
    print(f"data ready in {time.perf_counter() - start:.0f} s", flush=True)
    jobs = [(config, seed) for seed in args.seeds for config in args.configs]
    with ThreadPoolExecutor(args.parallel) as pool:
        runs = list(pool.map(lambda job: run_one(*job, args), jobs))
    failed = [run for run in runs if "error" in run]
    runs = [run for run in runs if "error" not in run]
    counts = [run["parameters"] for run in runs]
    if counts and max(counts) > 1.01 * min(counts):
        print(f"WARNING: parameter counts differ by more than 1%: {sorted(set(counts))}")
    (out / "results.json").write_text(json.dumps(
        {"command": " ".join(sys.argv), "runs": runs, "failed": failed}, indent=1) + "\n")
    if runs:
        table = summarize(runs, args.beams)
        (out / "results.md").write_text(table)
        print(table)
        try:
            plot_curves(runs, out / "curves.png")
        except ImportError:
            print("matplotlib is not installed: no curves.png (pip install -e .[plot])")
    for run in failed:
        print(f"FAILED {run['config']} seed {run['seed']}: {run['error']}")
    print(f"done in {time.perf_counter() - start:.0f} s")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
