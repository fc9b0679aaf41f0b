"""Training-step speed of our CPU training path against the plain torch one, side by side.

One training step (forward, loss, backward, clipping, AdamW) of the small-enro model on one
padded token batch, timed interleaved in one process (medians after a warm-up) for:

- ``torch ops``: ``nn.Dropout``, ``nn.RMSNorm`` and ``F.cross_entropy`` with label smoothing
  over every target position (padding ignored by ``ignore_index``): the textbook step;
- ``ours``: what ``cli.py train`` runs (seq2seq_diff.norm_dropout's Dropout and RMSNorm, the
  loss on real target positions only with seq2seq_diff.loss's one-pass backward);

each in float32 and under bf16 autocast (``--trainer.precision bf16-mixed``), for the DIFF
model and its standard twin.

    python benchmarks/train_step.py                 # d_model 256, 3+3, batch 64 x 30
    python benchmarks/train_step.py --kinds diff --repeats 10
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without `pip install -e .`

from seq2seq_diff import norm_dropout  # noqa: E402
from seq2seq_diff.lit_module import TranslationModule, adamw  # noqa: E402
from seq2seq_diff.model import ModelConfig  # noqa: E402

PAD = 0


def make_batch(args) -> dict[str, torch.Tensor]:
    """Random pieces with random target lengths in [len/2, len], right-padded."""
    generator = torch.Generator().manual_seed(0)
    src = torch.randint(4, args.vocab, (args.batch, args.src_len), generator=generator)
    tgt = torch.randint(4, args.vocab, (args.batch, args.tgt_len + 1), generator=generator)
    lengths = torch.randint(args.tgt_len // 2, args.tgt_len + 1, (args.batch,),
                            generator=generator)
    for row, length in enumerate(lengths.tolist()):
        tgt[row, length + 1:] = PAD
    return {"src": src, "tgt_in": tgt[:, :-1], "tgt_out": tgt[:, 1:]}


@contextlib.contextmanager
def torch_ops() -> None:
    """Swap our Dropout and RMSNorm for torch's forward methods while inside."""
    saved = norm_dropout.Dropout.forward, norm_dropout.RMSNorm.forward
    norm_dropout.Dropout.forward, norm_dropout.RMSNorm.forward = (nn.Dropout.forward,
                                                                  nn.RMSNorm.forward)
    try:
        yield
    finally:
        norm_dropout.Dropout.forward, norm_dropout.RMSNorm.forward = saved


def step_fn(module: TranslationModule, batch, plain: bool, bf16: bool) -> Callable[[], None]:
    optimizer = (torch.optim.AdamW(module.parameters(), lr=1e-4) if plain
                 else adamw(module.parameters(), lr=1e-4))  # cli.py train's: fused
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if bf16
                else contextlib.nullcontext())
    ntokens = int((batch["tgt_out"] != PAD).sum())

    def loss() -> torch.Tensor:
        if not plain:
            return module._loss(batch)[0]
        logits = module.model(batch["src"], batch["tgt_in"]).float().flatten(0, 1)
        return F.cross_entropy(logits, batch["tgt_out"].flatten(), ignore_index=PAD,
                               label_smoothing=module.hparams.label_smoothing, reduction="sum")

    def step() -> None:
        with torch_ops() if plain else contextlib.nullcontext(), autocast:
            value = loss()
        (value / ntokens).backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", nargs="+", default=["diff", "standard"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--src-len", type=int, default=30)
    parser.add_argument("--tgt-len", type=int, default=31)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batch = make_batch(args)
    tokens = int((batch["src"] != PAD).sum() + (batch["tgt_out"] != PAD).sum())
    print(f"batch {args.batch} x {args.src_len} source / {args.tgt_len} target positions, "
          f"{tokens} real tokens; {args.threads} threads; torch {torch.__version__}")
    fns: dict[str, Callable[[], None]] = {}
    for kind in args.kinds:
        config = ModelConfig(vocab_size=args.vocab, attention=kind)  # the small-enro model
        for plain in (True, False):
            for bf16 in (False, True):
                torch.manual_seed(0)
                module = TranslationModule(config, label_smoothing=0.1).train()
                name = f"{kind} {'torch ops' if plain else 'ours'} {'bf16' if bf16 else 'fp32'}"
                fns[name] = step_fn(module, batch, plain, bf16)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(args.warmup + args.repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if round_ >= args.warmup:
                times[name].append(time.perf_counter() - start)
    print(f"\ntraining step (median of {args.repeats}); ratio to the same model's torch ops fp32")
    for name, values in times.items():
        base = statistics.median(times[" ".join(name.split()[:1] + ["torch", "ops", "fp32"])])
        median = statistics.median(values)
        print(f"  {name:<26} {median * 1e3:7.0f} ms  {tokens / median:7,.0f} tokens/s  "
              f"{base / median:5.2f}x", flush=True)


if __name__ == "__main__":
    main()
