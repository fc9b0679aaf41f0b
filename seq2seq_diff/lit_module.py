"""The LightningModule: loss, optimiser, schedule, validation BLEU, checkpoint extras.

The network itself (``Seq2SeqTransformer``) is plain PyTorch and knows nothing of Lightning;
``TranslationModule`` owns everything about training it:

- label-smoothed cross-entropy over non-pad target tokens (logged per token, with NLL and
  perplexity);
- AdamW with no weight decay on biases, norms, embeddings and λ vectors;
- inverse-square-root schedule with linear warmup, stepped per optimiser step;
- validation loss, plus sacreBLEU BLEU and chrF of greedily decoded dev sentences
  (``search.greedy_search``);
- training throughput (source + target tokens per second) in the progress bar;
- checkpoints that carry the model config and the SentencePiece model (so a ``.ckpt`` alone can
  be exported to a model directory) and the RNG state (so a resumed run draws the same dropout
  masks as an uninterrupted one).
"""

from __future__ import annotations

import logging
import math
import os
import random
import tempfile
import time
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities.enums import GradClipAlgorithmType
from sacrebleu.metrics import BLEU, CHRF
from torch import Tensor, nn

from seq2seq_diff import onednn
from seq2seq_diff.compiled import CompiledOrEager
from seq2seq_diff.errors import ConfigError, TrainingError
from seq2seq_diff.loss import smoothed_cross_entropy
from seq2seq_diff.model import ModelConfig, Seq2SeqTransformer
from seq2seq_diff.model_dir import CHECKPOINT_KEY
from seq2seq_diff.search import greedy_search

logger = logging.getLogger(__name__)


def inverse_sqrt_factor(step: int, warmup_steps: int) -> float:
    """LR multiplier after ``step`` optimiser steps: linear warmup, then 1/√step decay.

    Reaches 1.0 at ``warmup_steps`` (Vaswani et al. 2017 §5.3, with the peak LR given directly).
    """
    step = step + 1  # LambdaLR asks for step 0 before the first update
    return min(step / warmup_steps, math.sqrt(warmup_steps / step))


def adamw(params: Any, fused: bool = True, **options: Any) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` with its fused kernel wherever the parameters' device has one (CPUs
    and GPUs; HF's Trainer default since torch 2.8): one pass over each tensor instead of a
    dozen ops per parameter, 8 ms against 26 ms a step for the small-enro model on 2 CPU cores
    (BENCHMARKS.md). Elsewhere, or with ``fused=False``, the default implementation."""
    if fused:
        try:
            return torch.optim.AdamW(params, fused=True, **options)
        except RuntimeError:  # no fused kernel for these parameters' device or dtype
            pass
    return torch.optim.AdamW(params, **options)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on weight matrices only.

    Biases, norm weights, λ vectors (all 1-D) and embeddings (tied with the output projection)
    get no weight decay, as is usual for Transformers.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for param in model.parameters():  # tied parameters appear once
        if not param.requires_grad:
            continue
        if param.ndim < 2 or id(param) in embeddings:
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _rng_state() -> dict[str, Any]:
    """Global RNG states as tensors and builtins (Lightning loads with ``weights_only=True``)."""
    version, mt_state, gauss = random.getstate()
    state: dict[str, Any] = {"torch": torch.get_rng_state(),
                             "python": (version, torch.tensor(mt_state, dtype=torch.int64), gauss)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:
        return state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                      float(cached))
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state.tolist()), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


class TranslationModule(L.LightningModule):
    """Trains a ``Seq2SeqTransformer`` on translation batches (see docs/CONTRACTS.md).

    Args:
        config: the model architecture (``vocab_size`` is linked from the data module by the
            command line).
        lr: peak learning rate, reached after ``warmup_steps``.
        betas: AdamW betas.
        weight_decay: AdamW weight decay on weight matrices.
        warmup_steps: linear warmup length in optimiser steps; then the LR decays as 1/√step.
        label_smoothing: label smoothing of the training loss (0 disables it).
        valid_bleu_size: how many dev sentences to decode greedily at each validation for BLEU
            and chrF (0: loss only).
        max_decode_len_a: validation decoding stops after a·len(src) + b target pieces...
        max_decode_len_b: ...with this b.
        nonfinite_loss: what a NaN/Inf training loss does: ``skip`` the step (no backward, no
            update; logged) or ``stop`` training with a one-line error.
        max_nonfinite_steps: with ``skip``, stop anyway after this many such steps in a row.
        compile: run the encoder and decoder of the training and validation loss through
            ``torch.compile`` (eager with one warning if compiling fails). On an H100 the
            small-enro preset then trains at 1.46x the tokens/s, on 2 CPU cores (bf16 on AMX)
            at 1.4-1.7x, after 2-6 minutes of compiling (the first steps, the first change of
            batch shape, the first batch of long sentences, the first validation): worth it
            for runs of more than 15-20 minutes (BENCHMARKS.md). The same seed draws the same
            dropout masks as eager. Decoding and exported models are unaffected.
        cpu_gemm: who computes the float32 CPU products of the linear layers: ``mkl`` (torch's
            default), ``onednn`` (``seq2seq_diff.onednn``: on a 2-core AMD EPYC, Zen 5, the
            benchmark's float32 training step at 1.15-1.56x the tokens/s eagerly, 1.21-1.45x
            compiled; whole command-line tiny-enro runs 1.11-1.22x, BENCHMARKS.md) or
            ``auto``: oneDNN except on Intel CPUs, where MKL takes its AVX-512 path. bf16,
            autocast and GPU products are torch's own either way.
    """

    def __init__(
        self,
        config: ModelConfig,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.98),
        weight_decay: float = 0.01,
        warmup_steps: int = 4000,
        label_smoothing: float = 0.1,
        valid_bleu_size: int = 200,
        max_decode_len_a: float = 1.5,
        max_decode_len_b: int = 10,
        nonfinite_loss: str = "skip",
        max_nonfinite_steps: int = 5,
        compile: bool = False,
        cpu_gemm: Literal["auto", "mkl", "onednn"] = "auto",
    ):
        super().__init__()
        if isinstance(config, Mapping):  # from load_from_checkpoint's hyperparameters
            config = ModelConfig.from_dict(dict(config))
        if lr <= 0:
            raise ConfigError(f"lr must be positive, got {lr}")
        if warmup_steps < 1:
            raise ConfigError(f"warmup_steps must be at least 1, got {warmup_steps}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if valid_bleu_size < 0:
            raise ConfigError(f"valid_bleu_size must be >= 0, got {valid_bleu_size}")
        if nonfinite_loss not in ("skip", "stop"):
            raise ConfigError(f"nonfinite_loss must be 'skip' or 'stop', got {nonfinite_loss!r}")
        if max_nonfinite_steps < 1:
            raise ConfigError(f"max_nonfinite_steps must be >= 1, got {max_nonfinite_steps}")
        if cpu_gemm not in ("auto", "mkl", "onednn"):
            raise ConfigError(f"cpu_gemm must be 'auto', 'mkl' or 'onednn', got {cpu_gemm!r}")
        if cpu_gemm == "onednn" and not onednn.available():
            raise ConfigError("cpu_gemm 'onednn': this PyTorch build cannot run oneDNN's float32 "
                              "products; use 'auto' or 'mkl'")
        self.save_hyperparameters(ignore=["config"])
        self.hparams["config"] = config.to_dict()
        self.config = config
        self.model = Seq2SeqTransformer(config)
        onednn.use_onednn(self.model,
                          cpu_gemm == "onednn" or (cpu_gemm == "auto" and onednn.pays()))
        self._states = (CompiledOrEager(self._decoder_states, "the training loss")
                        if compile else self._decoder_states)
        # Set by the command line: the resolved config, stored in checkpoints and model dirs.
        self.training_config: dict[str, Any] | None = None
        # A tokenizer set directly wins over the data module's (for use without a Trainer).
        self.tokenizer = None
        self._spm_bytes: bytes | None = None
        self._pending_rng: Mapping[str, Any] | None = None
        self._signature_logged = False
        self._nonfinite_in_a_row = 0
        self.nonfinite_skipped = 0
        self._reset_throughput()
        self._reset_validation()

    # -- helpers ------------------------------------------------------------------------------

    def get_tokenizer(self):
        """The tokenizer: set directly, or the data module's ``tokenizer``."""
        if self.tokenizer is not None:
            return self.tokenizer
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer else None
        return getattr(datamodule, "tokenizer", None)

    def _decoder_states(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        """Teacher-forced decoder states (B, T, E) of ``src`` (B, S) and ``tgt_in`` (B, T)."""
        src_mask = src != self.config.pad_id
        return self.model.decode_states(tgt_in, self.model.encode(src, src_mask), src_mask)

    def _loss(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Summed label-smoothed loss, summed NLL and the number of target tokens."""
        states = self._states(batch["src"], batch["tgt_in"])  # (B, T, E)
        keep = batch["tgt_out"] != self.config.pad_id  # (B, T)
        target = batch["tgt_out"][keep]  # (N,)
        # Only real target positions are projected onto the vocabulary: the projection and the
        # log-softmax over V are the largest costs of a small model's step, padding included.
        logits = self.model.project(states[keep]).float()  # (N, V); loss in float32 under bf16
        loss, nll = smoothed_cross_entropy(logits, target, self.hparams.label_smoothing)
        return loss.sum(), nll.sum(), keep.sum()

    # -- training -----------------------------------------------------------------------------

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        return self.model(src, tgt_in)

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        loss_sum, nll_sum, ntokens = self._loss(batch)
        denom = ntokens.clamp(min=1)
        loss = loss_sum / denom
        nll = nll_sum / denom
        if not torch.isfinite(loss):  # one sync per step: cheap next to the step itself
            return self._nonfinite(loss)
        self._nonfinite_in_a_row = 0
        size = batch["tgt_out"].shape[0]
        self.log("train_loss", loss, prog_bar=True, batch_size=size)
        self.log("train_nll", nll, batch_size=size)
        self.log("train_ppl", torch.exp(nll.clamp(max=50)), batch_size=size)
        self._tokens = self._tokens + ntokens.detach() + (batch["src"] != self.config.pad_id).sum()
        return loss

    def _nonfinite(self, loss: Tensor) -> None:
        """A NaN/Inf loss: skip the step (no backward, no update) or stop, as configured."""
        step = self.global_step
        self._nonfinite_in_a_row += 1
        self.nonfinite_skipped += 1
        hint = ("lower model.lr, raise model.warmup_steps, keep trainer.gradient_clip_val, or "
                "train in 32-bit precision")
        if self.hparams.nonfinite_loss == "stop":
            raise TrainingError(f"the training loss is {loss.item()} at step {step} "
                                f"(model.nonfinite_loss: stop): {hint}")
        if self._nonfinite_in_a_row > self.hparams.max_nonfinite_steps:
            raise TrainingError(
                f"the training loss was NaN/Inf for {self._nonfinite_in_a_row} steps in a row "
                f"(up to step {step}; model.max_nonfinite_steps: "
                f"{self.hparams.max_nonfinite_steps}): {hint}")
        logger.warning("training loss is %s at step %d: step skipped (%d so far)", loss.item(),
                       step, self.nonfinite_skipped)
        return None

    def _reset_throughput(self) -> None:
        self._tokens: Tensor | int = 0
        self._tokens_since = time.perf_counter()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._pending_rng is not None:
            # Restored here rather than at load time: between loading and the first batch,
            # Lightning builds dataloader iterators, which draw from the global RNG.
            _set_rng_state(self._pending_rng)
            self._pending_rng = None

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        every = max(1, self.trainer.log_every_n_steps)
        if (batch_idx + 1) % every:
            return
        elapsed = time.perf_counter() - self._tokens_since
        tokens = int(self._tokens)  # one device sync per logging interval
        if elapsed > 0:
            self.log("tok_s", tokens / elapsed, prog_bar=True, on_step=True, on_epoch=False,
                     batch_size=1)
        self._reset_throughput()

    def on_train_epoch_start(self) -> None:
        self._reset_throughput()

    def _grad_scaler(self) -> Any:
        """The trainer's gradient scaler (16-mixed), or None (32-true, bf16-mixed, no trainer)."""
        trainer = self._trainer
        return getattr(trainer.precision_plugin, "scaler", None) if trainer else None

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        # With a gradient scaler a fused AdamW unscales inside its step, after clipping would
        # have seen scaled gradients (Lightning refuses the pair): the default AdamW then.
        optimizer = adamw(parameter_groups(self.model, hp.weight_decay), lr=hp.lr,
                          betas=tuple(hp.betas), fused=self._grad_scaler() is None)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, partial(inverse_sqrt_factor, warmup_steps=hp.warmup_steps))
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": schedule, "interval": "step", "frequency": 1}}

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer,
                                    gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Lightning's clipping, which under bf16-mixed refuses a fused optimizer: its check is
        for fp16's gradient scaler, and bf16-mixed scales nothing, so clip directly then."""
        if (gradient_clip_val and isinstance(self.trainer.precision_plugin, MixedPrecision)
                and self._grad_scaler() is None):
            Precision.clip_gradients(self.trainer.precision_plugin, optimizer, gradient_clip_val,
                                     GradClipAlgorithmType(gradient_clip_algorithm or "norm"))
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # -- validation ---------------------------------------------------------------------------

    def _reset_validation(self) -> None:
        self._val_sums = torch.zeros(3, dtype=torch.float64)  # loss, nll, tokens
        self._hyps: list[str] = []
        self._refs: list[str] = []

    def on_validation_epoch_start(self) -> None:
        self._reset_validation()

    def _bleu_quota(self) -> int:
        """Sentences this process decodes: its share of ``valid_bleu_size``."""
        size = self.hparams.valid_bleu_size
        if self.trainer.sanity_checking:
            size = min(size, 8)  # the sanity check only proves the code path
        return math.ceil(size / max(1, self.trainer.world_size))

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        loss_sum, nll_sum, ntokens = self._loss(batch)
        self._val_sums += torch.stack([loss_sum, nll_sum, ntokens.float()]).detach().double().cpu()
        wanted = self._bleu_quota() - len(self._hyps)
        if wanted <= 0 or "ref_text" not in batch:
            return
        tokenizer = self.get_tokenizer()
        if tokenizer is None:
            raise ConfigError("validation BLEU needs a tokenizer: the data module has none")
        src = batch["src"][:wanted]
        ids = greedy_search(self.model, src, src != self.config.pad_id,
                            max_len_a=self.hparams.max_decode_len_a,
                            max_len_b=self.hparams.max_decode_len_b)
        self._hyps.extend(tokenizer.decode(ids))
        self._refs.extend(batch["ref_text"][: len(ids)])

    def _gather(self) -> tuple[Tensor, list[str], list[str]]:
        sums, hyps, refs = self._val_sums, self._hyps, self._refs
        if dist.is_available() and dist.is_initialized() and self.trainer.world_size > 1:
            sums = self.trainer.strategy.reduce(sums.to(self.device), reduce_op="sum").cpu()
            pairs: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(pairs, (hyps, refs))
            hyps = [h for part, _ in pairs for h in part]
            refs = [r for _, part in pairs for r in part]
        return sums, hyps, refs

    def on_validation_epoch_end(self) -> None:
        sums, hyps, refs = self._gather()
        loss_sum, nll_sum, ntokens = sums.tolist()
        metrics: dict[str, float] = {}
        if ntokens > 0:
            nll = nll_sum / ntokens
            metrics.update(val_loss=loss_sum / ntokens, val_nll=nll,
                           val_ppl=math.exp(min(nll, 50.0)))
        if hyps:
            bleu, chrf = BLEU(), CHRF()
            metrics["val_bleu"] = bleu.corpus_score(hyps, [refs]).score
            metrics["val_chrf"] = chrf.corpus_score(hyps, [refs]).score
            if not self._signature_logged and not self.trainer.sanity_checking:
                self._log_signature(bleu, chrf, len(hyps))
        for name, value in metrics.items():
            self.log(name, value, prog_bar=name in ("val_loss", "val_bleu"), sync_dist=True)
        if metrics and not self.trainer.sanity_checking and self.trainer.is_global_zero:
            logger.info("step %d: %s", self.global_step,
                        " ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
        self._reset_validation()

    def _log_signature(self, bleu: BLEU, chrf: CHRF, count: int) -> None:
        self.bleu_signature = str(bleu.get_signature())
        self.chrf_signature = str(chrf.get_signature())
        text = (f"val_bleu: {self.bleu_signature}; val_chrf: {self.chrf_signature}; "
                f"{count} dev sentences, greedy")
        logger.info("sacreBLEU signatures: %s", text)
        if self.trainer.is_global_zero:
            for lg in self.trainer.loggers:
                add_text = getattr(getattr(lg, "experiment", None), "add_text", None)
                if callable(add_text):
                    add_text("sacrebleu_signature", text, self.global_step)
        self._signature_logged = True

    # -- checkpoints --------------------------------------------------------------------------

    def _tokenizer_bytes(self) -> bytes | None:
        if self._spm_bytes is None:
            tokenizer = self.get_tokenizer()
            if tokenizer is None:
                return None
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "spm.model"
                tokenizer.save(path)
                self._spm_bytes = path.read_bytes()
        return self._spm_bytes

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {
            "model_config": self.config.to_dict(),
            "spm_model": self._tokenizer_bytes(),
            "training_config": self.training_config,
            "rng_state": _rng_state(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        extra = checkpoint.get(CHECKPOINT_KEY) or {}
        if self._trainer is not None and "rng_state" in extra:  # resuming a fit
            self._pending_rng = extra["rng_state"]


class ResumableCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that also writes ``last.ckpt`` at the very last training step.

    Lightning's own saves ``last.ckpt`` only along with the monitored checkpoints (after a
    validation), so a run stopped by ``max_steps`` or ``max_time`` between validations would
    lose its final steps. Saving at ``on_train_end`` is too late for an exact resume: by then
    Lightning has counted the interrupted epoch as complete, and on resume it would start the
    next epoch (``set_epoch``) instead of the rest of this one. So the final state is saved at
    the end of the last training batch, when the loop state is mid-epoch as for any step
    checkpoint.
    """

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        """Write to a hidden temporary file beside ``filepath``, then rename it over the target:
        a kill during the save leaves the previous checkpoint intact, never a truncated one."""
        directory, name = os.path.split(filepath)
        tmp = os.path.join(directory, f".{name}.tmp-{os.getpid()}")
        super()._save_checkpoint(trainer, tmp)
        if trainer.is_global_zero:
            os.replace(tmp, filepath)
        self._last_checkpoint_saved = filepath

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        max_steps_reached = 0 <= trainer.max_steps <= trainer.global_step
        if (self.save_last and (max_steps_reached or trainer.should_stop)
                and not self._should_skip_saving_checkpoint(trainer)):
            saved_step = self._last_global_step_saved
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            # A validation may still run at this step: let its monitored checkpoint be saved.
            self._last_global_step_saved = saved_step
            self._final_step_saved = trainer.global_step

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Stopped some other way (e.g. early stopping between validations): better late.
        step = trainer.global_step
        if (self.save_last and not self._should_skip_saving_checkpoint(trainer)
                and getattr(self, "_final_step_saved", None) != step):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_train_end(trainer, pl_module)
