"""What differential attention does inside a trained model: attention maps, focus, outliers.

- ``record_attention``: every attention's maps during a forward pass (via the modules'
  ``recorder`` hook): the softmax maps and, for DIFF, the differential map A1 − λ·A2.
- ``copy_focus``: the translation analogue of the DIFF paper's Table 3. For target tokens that
  copy a source piece verbatim (numbers, names: a piece with a digit or a capital that occurs once
  in the source), the share of cross-attention on that source position vs the rest, per decoder
  layer, averaged over heads, with the gold translation teacher-forced.
- ``activation_outliers``: the paper's Table 5: top-1/10/100 and median magnitudes of the
  attention logits and of the layers' hidden states.
- ``quantization_robustness`` (in :mod:`seq2seq_diff.quantize`): BLEU under int8 and 4-bit weights.

For DIFF the effective map A = A1 − λ·A2 has rows summing to 1 − λ and may be negative; its
focus is measured on the row normalised by that sum.
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from seq2seq_diff.attention import MultiheadDiffAttention, causal_mask
from seq2seq_diff.batching import collate
from seq2seq_diff.model import Seq2SeqTransformer
from seq2seq_diff.tokenizer import Tokenizer


@dataclass
class AttentionRecord:
    """One attention call: its scaled logits and maps, on the CPU.

    ``logits`` and ``probs`` are (B, 2H, T, S) (masked logits are -inf, masked probs 0);
    ``diff`` is (B, H, T, S) for DIFF attention (A1 − λ·A2), else None; ``lam`` is λ.
    """

    name: str
    logits: Tensor
    probs: Tensor
    diff: Tensor | None
    lam: float | None
    mask: Tensor  # (B, 1 or 2H, T, S) bool, True = attended

    @property
    def effective(self) -> Tensor:
        """The map that weights the values: A1 − λ·A2 for DIFF, the softmax map otherwise."""
        return self.diff if self.diff is not None else self.probs


def attention_maps(module, q: Tensor, k: Tensor, mask: Tensor | None,
                   causal: bool) -> tuple[Tensor, Tensor, Tensor | None, float | None, Tensor]:
    """The maps an attention module computes from its queries (B, 2H, T, D) and keys."""
    t, s, d = q.shape[2], k.shape[2], q.shape[3]
    logits = (q.float() * d**-0.5) @ k.float().transpose(-1, -2)  # (B, 2H, T, S)
    allowed = torch.ones(1, 1, t, s, dtype=torch.bool, device=q.device)
    if causal:
        allowed = allowed & causal_mask(t, s, q.device)
    if mask is not None:
        allowed = allowed & mask
    allowed = allowed.expand_as(logits)
    logits = logits.masked_fill(~allowed, float("-inf"))
    probs = torch.nan_to_num(logits.softmax(-1), nan=0.0)  # fully masked rows -> 0
    diff = lam = None
    if isinstance(module, MultiheadDiffAttention):
        lam = float(module.lambda_full().detach())
        diff = probs[:, 0::2] - lam * probs[:, 1::2]
    return logits, probs, diff, lam, allowed


@contextlib.contextmanager
def record_attention(model: Seq2SeqTransformer) -> Iterator[list[AttentionRecord]]:
    """Record every attention call of ``model`` while the context is open."""
    records: list[AttentionRecord] = []
    modules = [(name, m) for name, m in model.named_modules() if hasattr(m, "recorder")]

    def recorder_for(name: str):
        def record(module, q, k, mask, causal) -> None:
            logits, probs, diff, lam, allowed = attention_maps(module, q, k, mask, causal)
            records.append(AttentionRecord(name, logits.cpu(), probs.cpu(),
                                           None if diff is None else diff.cpu(), lam,
                                           allowed.cpu()))
        return record

    for name, module in modules:
        module.recorder = recorder_for(name)
    try:
        yield records
    finally:
        for _, module in modules:
            module.recorder = None


@dataclass
class Batch:
    src: Tensor  # (B, S) pieces + eos
    tgt_in: Tensor  # (B, T) bos + pieces
    src_ids: list[list[int]]  # pieces + eos
    tgt_ids: list[list[int]]  # pieces


def teacher_forced_batch(model: Seq2SeqTransformer, tokenizer: Tokenizer, sources: Sequence[str],
                         targets: Sequence[str]) -> Batch:
    c = model.config
    src_ids, tgt_ids = tokenizer.encode(sources), tokenizer.encode(targets)
    examples = [{"src_ids": s, "tgt_ids": t} for s, t in zip(src_ids, tgt_ids, strict=True)]
    batch = collate(examples, c.pad_id, c.bos_id, c.eos_id)
    return Batch(batch["src"], batch["tgt_in"], [ids + [c.eos_id] for ids in src_ids], tgt_ids)


def _batches(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def _copy_pairs(tokenizer: Tokenizer, src_ids: list[int], tgt_ids: list[int]) -> list[tuple]:
    """(target position, source position) of pieces copied verbatim and unambiguous."""
    pieces = [tokenizer.id_to_piece(i) for i in src_ids]
    position = {}
    for s, piece in enumerate(pieces):
        position[piece] = None if piece in position else s  # None: occurs twice
    pairs = []
    for t, tid in enumerate(tgt_ids):
        piece = tokenizer.id_to_piece(tid)
        word = piece.lstrip("▁")
        if (position.get(piece) is not None and len(word) >= 1
                and (any(ch.isdigit() for ch in word) or word[:1].isupper())):
            pairs.append((t, position[piece]))
    return pairs


@torch.inference_mode()
def copy_focus(model: Seq2SeqTransformer, tokenizer: Tokenizer, sources: Sequence[str],
               references: Sequence[str], batch_size: int = 32) -> dict:
    """Cross-attention focus on verbatim-copied source pieces, per decoder layer.

    Returns ``{"pairs": n, "layers": [{"focus": f, "negative": m}, ...], "mean_focus": f}``
    where focus is the mean share of the (normalised, for DIFF) attention row on the aligned
    source piece, and ``negative`` the mean total negative weight in the row (DIFF only).
    """
    model.eval()
    layers = len(model.decoder_layers)
    focus: list[list[float]] = [[] for _ in range(layers)]
    negative: list[list[float]] = [[] for _ in range(layers)]
    pairs_total = 0
    device = next(model.parameters()).device
    for part in _batches(len(sources), batch_size):
        batch = teacher_forced_batch(model, tokenizer, sources[part], references[part])
        with record_attention(model) as records:
            model(batch.src.to(device), batch.tgt_in.to(device))
        cross = [r for r in records if r.name.endswith("cross_attn")]
        for row, (src_ids, tgt_ids) in enumerate(zip(batch.src_ids, batch.tgt_ids, strict=True)):
            pairs = _copy_pairs(tokenizer, src_ids, tgt_ids)
            pairs_total += len(pairs)
            for layer, record in enumerate(cross):
                amap = record.effective[row]  # (heads, T, S)
                for t, s in pairs:
                    # target piece t is predicted at decoder position t (input bos + pieces[:t])
                    weights = amap[:, t]  # (heads, S)
                    total = weights.sum(-1, keepdim=True)
                    share = (weights[:, s:s + 1] / total).mean().item()
                    focus[layer].append(share)
                    negative[layer].append(weights.clamp(max=0).sum(-1).mean().item())
    layer_stats = [{"focus": statistics.fmean(f) if f else float("nan"),
                    "negative": statistics.fmean(n) if n else float("nan")}
                   for f, n in zip(focus, negative, strict=True)]
    every = [x for f in focus for x in f]
    return {"pairs": pairs_total, "layers": layer_stats,
            "mean_focus": statistics.fmean(every) if every else float("nan")}


def _magnitudes(values: Tensor, tops: Sequence[int]) -> dict[str, float]:
    values = values.abs().flatten().float()
    ranked = values.topk(min(max(tops), values.numel())).values
    out = {f"top{k}": float(ranked[min(k, ranked.numel()) - 1]) for k in tops}
    out["median"] = float(values.median())
    return out


@torch.inference_mode()
def activation_outliers(model: Seq2SeqTransformer, tokenizer: Tokenizer,
                        sources: Sequence[str], references: Sequence[str],
                        batch_size: int = 32, tops: Sequence[int] = (1, 10, 100)) -> dict:
    """Top-k and median magnitudes of attention logits and hidden states (real positions only).

    Attention logits are the scaled QKᵀ of every attention (both maps of a DIFF head); hidden
    states are the outputs of every encoder and decoder layer (the residual stream).
    """
    model.eval()
    device = next(model.parameters()).device
    logits: list[Tensor] = []
    hidden: list[Tensor] = []
    for part in _batches(len(sources), batch_size):
        batch = teacher_forced_batch(model, tokenizer, sources[part], references[part])
        src, tgt_in = batch.src.to(device), batch.tgt_in.to(device)
        src_real, tgt_real = src != model.config.pad_id, tgt_in != model.config.pad_id
        outputs: list[tuple[str, Tensor]] = []
        hooks = [layer.register_forward_hook(
            lambda _m, _i, out, kind=kind, seen=outputs: seen.append((kind, out)))
            for kind, layers in (("enc", model.encoder_layers), ("dec", model.decoder_layers))
            for layer in layers]
        try:
            with record_attention(model) as records:
                model(src, tgt_in)
        finally:
            for hook in hooks:
                hook.remove()
        for record in records:
            logits.append(record.logits[record.mask & record.logits.isfinite()])
        for kind, out in outputs:
            real = src_real if kind == "enc" else tgt_real
            hidden.append(out[real].cpu())
    return {"attention_logits": _magnitudes(torch.cat(logits), tops),
            "hidden_states": _magnitudes(torch.cat(hidden), tops)}
