"""glibc's default malloc against ``seq2seq_diff.malloc.tune_malloc`` (what ``cli.py`` applies).

The setting is process-wide and cannot be undone cleanly, so every measurement runs in a fresh
child process, the two settings alternating (their order flipped each round), and the medians
over ``--rounds`` are compared. Jobs:

- ``train``: training steps (forward, loss, backward, clipping, AdamW) of our model at the peers'
  dimensions (``benchmarks/peers.py``), ``--batch`` × 30 + 30 tokens, float32;
- ``cli-train``: ``cli.py train --config`` itself (the tiny preset by default) for ``--steps``
  steps, with ``SEQ2SEQ_DIFF_MALLOC=system`` as the untuned side; its median logged tokens/s,
  shown as seconds per 1,000 tokens;
- ``greedy`` / ``beam``: translating the first ``--lines`` lines of ``--input`` with ``--model``
  (a model directory, as ``translate`` does: packed float32, token batches), or, without a
  model, the peers' random batch at the same dimensions.

Each child reports the median seconds of its timed repeats, the minor page faults during them
and its peak RSS.

    python benchmarks/malloc.py --rounds 5
    python benchmarks/malloc.py --jobs greedy beam --model runs/small-enro/model --rounds 5
    python benchmarks/malloc.py --jobs cli-train --config configs/small-enro.yaml --rounds 3
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without `pip install -e .`
sys.path.insert(0, str(ROOT / "benchmarks"))

from seq2seq_diff.malloc import ENV, without_malloc_settings  # noqa: E402  (imports no torch)

SETTINGS = ("system", "tuned")


def workload(args):
    """The callable that the child times, built before any timing."""
    import peers
    import torch

    if args.job == "train":
        return peers.train_step_fn("ours", peers.ours(args.attention, args), args)
    beam = 1 if args.job == "greedy" else 5
    args = argparse.Namespace(**{**vars(args), "dtype": "float32"})  # decoding: as `translate`
    if args.model:
        from seq2seq_diff.translator import Translator

        lines = Path(args.input).read_text(encoding="utf-8").splitlines()[: args.lines]
        translator = Translator.from_pretrained(args.model, beam_size=beam)
        return lambda: translator.translate(lines)
    from seq2seq_diff.packed import pack_linears

    model = peers.ours(args.attention, args)
    model = pack_linears(model) if torch.device(args.device).type == "cpu" else model
    return peers.decode_fn("ours", model, args, beam)


def child(args) -> None:
    import torch

    from seq2seq_diff.malloc import tune_malloc

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.setting == "tuned" and not tune_malloc():
        sys.exit("tune_malloc() changed nothing: not glibc, or malloc set in the environment")
    fn = workload(args)
    for _ in range(args.warmup):
        fn()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"seconds": statistics.median(times), "faults": faults / args.repeats,
                      "peak_mib": peak}))


def cli_train(args, env: dict) -> dict:
    """``cli.py train`` itself for ``--steps`` steps: its median logged tokens/s (the first
    logged interval, with the warm-up, left out), page faults and peak RSS."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(ROOT / "cli.py"), "train", "--config", args.config,
               "--run_dir", tmp, "--trainer.max_steps", str(args.steps),
               "--trainer.max_time", "null", "--trainer.limit_val_batches", "0",
               "--trainer.num_sanity_val_steps", "0", "--trainer.log_every_n_steps", "20",
               "--trainer.enable_progress_bar", "false",
               "--trainer.enable_model_summary", "false"]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        stderr = proc.stderr.read()
        _, status, usage = os.wait4(proc.pid, 0)
        if status:
            sys.exit(f"{' '.join(cmd)} failed:\n{stderr[-2000:]}")
        with open(next(Path(tmp).glob("csv/*/metrics.csv")), newline="") as metrics:
            rows = list(csv.DictReader(metrics))
        rates = [float(r["tok_s"]) for r in rows if r.get("tok_s")][1:]
    if not rates:
        sys.exit(f"no tok_s logged in {args.steps} steps: raise --steps")
    # "seconds" per 1,000 tokens, so that the table's speed ratio reads like the other jobs'
    return {"seconds": 1000 / statistics.median(rates), "faults": usage.ru_minflt,
            "peak_mib": usage.ru_maxrss / 1024}


def run_child(args, job: str, setting: str) -> dict:
    env = without_malloc_settings(os.environ)
    if job == "cli-train":  # the command line tunes malloc itself unless told not to
        return cli_train(args, env if setting == "tuned" else {**env, ENV: "system"})
    cmd = [sys.executable, __file__, "--child", job, setting]
    for name in ("model", "input", "lines", "batch", "d_model", "layers", "heads", "ffn_dim",
                 "vocab", "attention", "dtype", "threads", "repeats", "warmup"):
        value = getattr(args, name)
        if value is not None:
            cmd += [f"--{name.replace('_', '-')}", str(value)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode:
        sys.exit(f"{job}/{setting} child failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", nargs="+", choices=["train", "greedy", "beam", "cli-train"],
                        default=["train", "greedy", "beam"])
    parser.add_argument("--rounds", type=int, default=5, help="child processes per setting")
    parser.add_argument("--model", help="model directory for greedy/beam (default: random)")
    parser.add_argument("--input", default=str(ROOT / "data/en-ro/book/gimp-manual-heldout.en"))
    parser.add_argument("--lines", type=int, default=300)
    parser.add_argument("--config", default="configs/tiny-enro.yaml", help="for cli-train")
    parser.add_argument("--steps", type=int, default=140, help="cli-train's training steps")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--ffn-dim", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--attention", default="diff", choices=["diff", "standard"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="train under autocast to this dtype (the CPU presets: bfloat16)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per child")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.src_len = args.out_len = 30
    args.device, args.compile = "cpu", "none"
    if args.child:
        args.job, args.setting = args.child
        child(args)
        return
    if args.jobs == ["cli-train"]:
        what = f"cli.py train --config {args.config}, {args.steps} steps"
    elif args.model:
        what = f"model {args.model}, {args.lines} lines"
    else:
        what = (f"random {args.attention} d_model {args.d_model}, {args.layers}+{args.layers} "
                f"layers, batch {args.batch}, training in {args.dtype}")
    print(f"{what}; {args.threads} threads; {args.rounds} rounds of fresh processes, "
          f"median of {args.repeats} runs each")
    print(f"{'job':>7} {'system s':>9} {'tuned s':>9} {'speed':>6} {'faults/run':>21} "
          f"{'peak RSS MiB':>14}")
    for job in args.jobs:
        results: dict[str, list[dict]] = {s: [] for s in SETTINGS}
        for round_ in range(args.rounds):
            for setting in SETTINGS if round_ % 2 == 0 else SETTINGS[::-1]:
                results[setting].append(run_child(args, job, setting))
        med = {s: {key: statistics.median(r[key] for r in results[s])
                   for key in ("seconds", "faults", "peak_mib")} for s in SETTINGS}
        sys_, tun = med["system"], med["tuned"]
        print(f"{job:>7} {sys_['seconds']:>9.3f} {tun['seconds']:>9.3f} "
              f"{sys_['seconds'] / tun['seconds']:>5.2f}x {sys_['faults']:>10,.0f} -> "
              f"{tun['faults']:>8,.0f} {sys_['peak_mib']:>6.0f} -> {tun['peak_mib']:>5.0f}",
              flush=True)


if __name__ == "__main__":
    main()
