"""Differential vs standard attention: forward+backward time and peak memory, side by side.

Both modules run interleaved in one process at equal d_model (DIFF: H heads; standard: 2H heads of
the same head_dim), medians over --repeats runs after warm-up; the ratio DIFF/standard is what to
read (this machine is noisy, absolute times are not). Peak memory is measured per configuration in
a fresh child process (peak RSS growth over the inputs) so one run cannot inflate another's.

    python benchmarks/attention.py                       # d_model 512, batch 8, T=S in 128 512 2048
    python benchmarks/attention.py --lengths 128 --repeats 3 --no-memory
    python benchmarks/attention.py --device cuda --dtype bfloat16 --batch 32 --lengths 128 512 2048

On a GPU, times are taken between ``torch.cuda.synchronize()`` calls and the memory column is the
CUDA allocator's peak over one step (in process), instead of the peak RSS of a child.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from seq2seq_diff.attention import MultiheadAttention, MultiheadDiffAttention, RotaryEmbedding

KINDS = {"diff": MultiheadDiffAttention, "standard": MultiheadAttention}


def build(kind: str, d_model: int, num_heads: int, batch: int, length: int, causal: bool,
          device: str = "cpu", dtype: str = "float32"):
    torch.manual_seed(0)
    dtype_ = getattr(torch, dtype)
    module = KINDS[kind](d_model, num_heads, layer_index=1).to(device, dtype_)
    x = torch.randn(batch, length, d_model, device=device, dtype=dtype_, requires_grad=True)
    rotary = RotaryEmbedding(d_model // num_heads // 2).to(device)
    # Bidirectional self-attention with ~10% key padding, or causal self-attention.
    mask = None
    if not causal:
        lengths = torch.linspace(length, int(0.8 * length), batch).long()
        mask = (torch.arange(length)[None, :] < lengths[:, None])[:, None, None, :].to(device)
    return module, x, rotary, mask


def step(module, x, rotary, mask, causal: bool) -> None:
    out = module(x, mask=mask, causal=causal, rotary=rotary)
    out.float().pow(2).mean().backward()
    module.zero_grad(set_to_none=True)
    x.grad = None


def time_pair(args, length: int) -> dict[str, float]:
    setups = {k: build(k, args.d_model, args.num_heads, args.batch, length, args.causal,
                       args.device, args.dtype) for k in KINDS}
    cuda = args.device.startswith("cuda")
    times: dict[str, list[float]] = {k: [] for k in KINDS}
    for i in range(args.warmup + args.repeats):
        for kind, (module, x, rotary, mask) in setups.items():  # interleaved
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.inner):
                step(module, x, rotary, mask, args.causal)
            if cuda:
                torch.cuda.synchronize()
            if i >= args.warmup:
                times[kind].append((time.perf_counter() - start) / args.inner)
    return {k: statistics.median(v) for k, v in times.items()}


def cuda_peak_mib(args, kind: str, length: int) -> float:
    """CUDA allocator peak over one step, above what the inputs and module hold."""
    module, x, rotary, mask = build(kind, args.d_model, args.num_heads, args.batch, length,
                                    args.causal, args.device, args.dtype)
    step(module, x, rotary, mask, args.causal)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step(module, x, rotary, mask, args.causal)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def child(args) -> None:
    module, x, rotary, mask = build(args.kind, args.d_model, args.num_heads, args.batch,
                                    args.length, args.causal)
    step(module, x, rotary, mask, args.causal)  # first call allocates workspaces
    before = rss_kib("VmRSS:")
    step(module, x, rotary, mask, args.causal)
    print(json.dumps({"peak_mib": (rss_kib("VmHWM:") - before) / 1024}))


def peak_memory(args, kind: str, length: int) -> float:
    if args.device.startswith("cuda"):
        return cuda_peak_mib(args, kind, length)
    cmd = [sys.executable, __file__, "--child", kind, "--length", str(length),
           "--d-model", str(args.d_model), "--num-heads", str(args.num_heads),
           "--batch", str(args.batch), "--threads", str(args.threads)]
    if args.max_explicit_scores is not None:
        cmd += ["--max-explicit-scores", str(args.max_explicit_scores)]
    if args.causal:
        cmd.append("--causal")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--num-heads", type=int, default=8, help="differential heads")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--inner", type=int, default=1, help="steps per timed run (GPU: 10+)")
    parser.add_argument("--causal", action="store_true", help="causal instead of padded self-attn")
    parser.add_argument("--no-memory", dest="memory", action="store_false")
    parser.add_argument("--max-explicit-scores", type=int, default=None,
                        help="DIFF kernel switch: 0 = always fused SDPA, a large number = always "
                        "explicit maps (default: the module's own threshold)")
    parser.add_argument("--child", choices=list(KINDS), dest="kind", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.max_explicit_scores is not None:
        MultiheadDiffAttention.max_explicit_scores = args.max_explicit_scores
    if args.kind:
        child(args)
        return
    print(f"torch {torch.__version__}, {args.device} {args.dtype}, {args.threads} threads, "
          f"d_model {args.d_model}, "
          f"{args.num_heads} diff heads vs {2 * args.num_heads} standard, batch {args.batch}, "
          f"{'causal' if args.causal else 'padded bidirectional'} self-attention, fwd+bwd, "
          f"median of {args.repeats}, DIFF kernel switch at "
          f"{MultiheadDiffAttention.max_explicit_scores} query×key pairs")
    print(f"{'T=S':>6} {'diff ms':>9} {'std ms':>9} {'ratio':>6} "
          f"{'diff MiB':>9} {'std MiB':>9} {'ratio':>6}")
    for length in args.lengths:
        t = time_pair(args, length)
        row = f"{length:>6} {1e3 * t['diff']:>9.1f} {1e3 * t['standard']:>9.1f} " \
              f"{t['diff'] / t['standard']:>6.2f}"
        if args.memory:
            m = {k: peak_memory(args, k, length) for k in KINDS}
            row += f" {m['diff']:>9.1f} {m['standard']:>9.1f} {m['diff'] / m['standard']:>6.2f}"
        print(row, flush=True)


if __name__ == "__main__":
    main()
