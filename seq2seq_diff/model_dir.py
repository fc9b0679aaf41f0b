"""Self-contained model directories: save, load, export a checkpoint, average checkpoints.

A model directory holds everything ``translate`` and ``evaluate`` need, without Lightning state::

    MODEL_DIR/model.pt             state_dict, float32
              model_config.json    ModelConfig.to_dict()
              spm.model            the SentencePiece model
              training_config.yaml the resolved training config (optional)
              metadata.json        package version, attention kind, parameter count, date

Lightning checkpoints written by ``TranslationModule`` carry the model config and the
SentencePiece model bytes under ``checkpoint["seq2seq_diff"]``, so a checkpoint alone can be
exported (see ``export_checkpoint``) or averaged with its neighbours (``average_checkpoints``).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from seq2seq_diff import __version__
from seq2seq_diff.errors import ConfigError, ModelDirError
from seq2seq_diff.model import ModelConfig, Seq2SeqTransformer
from seq2seq_diff.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.pt"
CONFIG_FILE = "model_config.json"
SPM_FILE = "spm.model"
TRAINING_CONFIG_FILE = "training_config.yaml"
METADATA_FILE = "metadata.json"
REQUIRED_FILES = (WEIGHTS_FILE, CONFIG_FILE, SPM_FILE)

# Our extra state in a Lightning checkpoint (written by TranslationModule.on_save_checkpoint).
CHECKPOINT_KEY = "seq2seq_diff"
# TranslationModule keeps the Seq2SeqTransformer as ``self.model``.
MODEL_PREFIX = "model."


# ---------------------------------------------------------------------------------------------
# Saving


def _plain(value: Any) -> Any:
    """``value`` as YAML-safe builtins (paths and unknown objects become strings)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "as_dict"):  # jsonargparse Namespace
        return _plain(value.as_dict())
    return str(value)


def _replace_dir(new: Path, target: Path) -> None:
    """Move the finished directory ``new`` to ``target``, replacing an existing one safely.

    POSIX cannot rename a directory over a non-empty one, so an existing target is first moved
    aside and removed only once ``new`` is in place (and moved back if that fails).
    """
    if not target.exists():
        os.replace(new, target)
        return
    if not target.is_dir():
        raise ModelDirError(f"{target} exists and is not a directory; choose another output path")
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    old.rmdir()
    os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _float32_state(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {
        k: (v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.detach().cpu())
        for k, v in state_dict.items()
    }


def _write_dir(
    path: str | Path,
    state_dict: Mapping[str, Tensor],
    config: ModelConfig,
    write_tokenizer: Any,
    training_config: Mapping[str, Any] | None,
    extra_metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write a model directory atomically; ``write_tokenizer(path)`` writes ``spm.model``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        state = _float32_state(state_dict)
        bad = [k for k, v in state.items() if v.is_floating_point() and not v.isfinite().all()]
        if bad:  # never write a model that can only produce garbage
            raise ModelDirError(f"{target}: not written: {len(bad)} weight tensor(s) hold NaN/Inf "
                                f"(first: {bad[0]}); export an earlier checkpoint")
        torch.save(state, tmp / WEIGHTS_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        write_tokenizer(tmp / SPM_FILE)
        if training_config is not None:
            text = yaml.safe_dump(_plain(training_config), sort_keys=False, allow_unicode=True)
            (tmp / TRAINING_CONFIG_FILE).write_text(text)
        metadata = {
            "package": "seq2seq-diff",
            "version": __version__,
            "attention": config.attention,
            "parameters": sum(v.numel() for k, v in state.items() if v.is_floating_point()),
            "vocab_size": config.vocab_size,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__,
            **(extra_metadata or {}),
        }
        (tmp / METADATA_FILE).write_text(json.dumps(_plain(metadata), indent=2) + "\n")
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        _replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote model directory %s", target)
    return target


def save_model_dir(
    path: str | Path,
    model: Seq2SeqTransformer,
    tokenizer: Tokenizer,
    training_config: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` and ``tokenizer`` as a model directory (temp dir + rename).

    Args:
        path: the directory to create; an existing one is replaced only once the new one is
            complete.
        model: the network; its weights are stored as float32 whatever its dtype/device.
        tokenizer: the SentencePiece tokenizer it was trained with.
        training_config: the resolved training config, stored as ``training_config.yaml``.

    Returns:
        The directory path.
    """
    return _write_dir(path, model.state_dict(), model.config, tokenizer.save, training_config)


# ---------------------------------------------------------------------------------------------
# Loading


def _read_config(path: Path) -> ModelConfig:
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelDirError(f"{path}: cannot read the model config: {e}") from e
    if not isinstance(values, dict):
        raise ModelDirError(f"{path}: expected a JSON object of model config keys")
    try:
        return ModelConfig.from_dict(values)
    except (ConfigError, TypeError) as e:
        raise ModelDirError(f"{path}: {e}") from e


def _attention_kind(state_dict: Mapping[str, Tensor]) -> str:
    """'diff' if the weights hold differential-attention λ vectors, else 'standard'."""
    return "diff" if any(k.endswith("lambda_q1") for k in state_dict) else "standard"


def check_state_dict(
    state_dict: Mapping[str, Tensor], config: ModelConfig, where: str, vocab_size: int | None = None
) -> None:
    """Raise ``ModelDirError`` if ``state_dict`` cannot be the weights of ``config``.

    Args:
        state_dict: the weights.
        config: the model config they claim to match.
        where: a path or name for the message.
        vocab_size: the tokenizer's vocabulary size, checked against the embedding.
    """
    kind = _attention_kind(state_dict)
    if kind != config.attention:
        names = {"diff": "differential-attention", "standard": "standard-attention"}
        raise ModelDirError(
            f"{where} holds a {names[kind]} model but its config says attention: "
            f"{config.attention}; fix 'attention' in the model config (or export again)"
        )
    embed = state_dict.get("embed.weight")
    if embed is None:
        raise ModelDirError(f"{where}: no 'embed.weight' in the weights; not a seq2seq-diff model")
    if vocab_size is not None and embed.shape[0] != vocab_size:
        raise ModelDirError(
            f"{where}: the SentencePiece model has {vocab_size} pieces but the weights' "
            f"embedding has {embed.shape[0]} rows; the tokenizer does not belong to this model"
        )
    if embed.shape[0] != config.vocab_size or embed.shape[1] != config.d_model:
        raise ModelDirError(
            f"{where}: the weights' embedding is {tuple(embed.shape)} but the config says "
            f"vocab_size={config.vocab_size}, d_model={config.d_model}"
        )


def _build_model(state_dict: Mapping[str, Tensor], config: ModelConfig, where: str):
    model = Seq2SeqTransformer(config)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])
        raise ModelDirError(f"{where}: weights do not match the model config: {detail}") from e
    return model


def load_model_dir(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[Seq2SeqTransformer, Tokenizer]:
    """Load a model directory written by ``save_model_dir``.

    Args:
        path: the model directory.
        device: where to put the model; it is returned in eval mode.

    Returns:
        ``(model, tokenizer)``.

    Raises:
        ModelDirError: a missing directory or file, unreadable or unknown config keys, weights of
            the other attention kind, or a tokenizer whose size does not match the embedding.
    """
    root = Path(path)
    if not root.is_dir():
        raise ModelDirError(
            f"{root}: no such model directory (make one with `python cli.py export` or "
            "`python cli.py train`)"
        )
    missing = [name for name in REQUIRED_FILES if not (root / name).is_file()]
    if missing:
        raise ModelDirError(f"{root}: not a complete model directory, missing {', '.join(missing)}")
    config = _read_config(root / CONFIG_FILE)
    try:
        state_dict = torch.load(root / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # any unpickling failure means a bad file
        raise ModelDirError(f"{root / WEIGHTS_FILE}: cannot load the weights: {e}") from e
    if not isinstance(state_dict, Mapping):
        raise ModelDirError(f"{root / WEIGHTS_FILE}: expected a state_dict")
    try:
        tokenizer = Tokenizer.load(root / SPM_FILE)
    except Exception as e:  # SentencePiece raises plain RuntimeError/OSError
        if isinstance(e, ModelDirError):
            raise
        raise ModelDirError(f"{root / SPM_FILE}: cannot load the SentencePiece model: {e}") from e
    check_state_dict(state_dict, config, str(root), vocab_size=tokenizer.vocab_size)
    model = _build_model(state_dict, config, str(root))
    return model.to(device).eval(), tokenizer


# ---------------------------------------------------------------------------------------------
# Lightning checkpoints


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a Lightning checkpoint on the CPU (trusted files only: it unpickles).

    Raises:
        ModelDirError: a missing or unreadable file.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelDirError(f"{path}: no such checkpoint file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:
        raise ModelDirError(f"{path}: cannot load the checkpoint: {e}") from e
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ModelDirError(f"{path}: not a Lightning checkpoint (no 'state_dict')")
    return checkpoint


def checkpoint_model_state(checkpoint: Mapping[str, Any]) -> dict[str, Tensor]:
    """The ``Seq2SeqTransformer`` weights of a ``TranslationModule`` checkpoint."""
    state = {}
    for key, value in checkpoint["state_dict"].items():
        if key.startswith(MODEL_PREFIX):
            key = key[len(MODEL_PREFIX):]
            state[key.removeprefix("_orig_mod.")] = value  # torch.compile wrapper
    return state


def checkpoint_model_config(checkpoint: Mapping[str, Any], where: str) -> ModelConfig:
    """The ``ModelConfig`` stored in a ``TranslationModule`` checkpoint."""
    extra = checkpoint.get(CHECKPOINT_KEY) or {}
    values = extra.get("model_config")
    if values is None:  # fall back on the module's hyperparameters
        values = (checkpoint.get("hyper_parameters") or {}).get("config")
    if values is None:
        raise ModelDirError(f"{where}: the checkpoint holds no model config")
    if isinstance(values, ModelConfig):
        return values
    try:
        return ModelConfig.from_dict(dict(values))
    except (ConfigError, TypeError) as e:
        raise ModelDirError(f"{where}: {e}") from e


def _checkpoint_tokenizer_writer(checkpoint: Mapping[str, Any], where: str, tokenizer=None):
    """A function writing ``spm.model`` from ``tokenizer`` or from the checkpoint's bytes."""
    if tokenizer is not None:
        if isinstance(tokenizer, (str, Path)):
            source = Path(tokenizer)
            if not source.is_file():
                raise ModelDirError(f"{source}: no such SentencePiece model")
            return lambda dest: shutil.copyfile(source, dest)
        return tokenizer.save
    blob = (checkpoint.get(CHECKPOINT_KEY) or {}).get("spm_model")
    if not blob:
        raise ModelDirError(
            f"{where}: the checkpoint holds no SentencePiece model; pass the tokenizer "
            "(--tokenizer PATH/spm.model)"
        )
    return lambda dest: Path(dest).write_bytes(bytes(blob))


def _tokenizer_size(write_tokenizer) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(Path(tmp) / SPM_FILE)
        try:
            return Tokenizer.load(Path(tmp) / SPM_FILE).vocab_size
        except Exception as e:
            raise ModelDirError(f"cannot load the SentencePiece model: {e}") from e


def export_checkpoint(
    ckpt_path: str | Path, out_dir: str | Path, tokenizer: Tokenizer | str | Path | None = None
) -> Path:
    """Turn a ``TranslationModule`` Lightning checkpoint into a model directory.

    Args:
        ckpt_path: the ``.ckpt`` file.
        out_dir: the model directory to write.
        tokenizer: a tokenizer or ``spm.model`` path, for checkpoints that do not embed one.

    Returns:
        ``out_dir``.
    """
    checkpoint = load_checkpoint(ckpt_path)
    where = str(ckpt_path)
    config = checkpoint_model_config(checkpoint, where)
    state = checkpoint_model_state(checkpoint)
    write_tokenizer = _checkpoint_tokenizer_writer(checkpoint, where, tokenizer)
    check_state_dict(state, config, where, vocab_size=_tokenizer_size(write_tokenizer))
    _build_model(state, config, where)  # shapes and key names checked before writing
    extra = checkpoint.get(CHECKPOINT_KEY) or {}
    metadata = {"checkpoint": str(ckpt_path), "global_step": checkpoint.get("global_step"),
                "epoch": checkpoint.get("epoch")}
    return _write_dir(out_dir, state, config, write_tokenizer, extra.get("training_config"),
                      metadata)


def find_checkpoints(run_dir: str | Path, last: int) -> list[Path]:
    """The checkpoints of the ``last`` most recent distinct global steps under ``run_dir``.

    ``last.ckpt`` usually repeats the newest step; one file per step is kept.

    Raises:
        ModelDirError: no checkpoints, or fewer distinct steps than asked for.
    """
    root = Path(run_dir)
    if not root.is_dir():
        raise ModelDirError(f"{root}: no such run directory")
    by_step: dict[int, Path] = {}
    for path in sorted(root.rglob("*.ckpt")):
        step = int(load_checkpoint(path).get("global_step", -1))
        # Prefer a named checkpoint over last.ckpt for the same step.
        if step not in by_step or by_step[step].name.startswith("last"):
            by_step[step] = path
    if not by_step:
        raise ModelDirError(f"{root}: no *.ckpt files found")
    if len(by_step) < last:
        steps = ", ".join(str(s) for s in sorted(by_step))
        raise ModelDirError(
            f"{root}: asked for the last {last} checkpoints but found only {len(by_step)} "
            f"distinct steps ({steps}); ask for fewer (--last {len(by_step)})"
        )
    return [by_step[s] for s in sorted(by_step)[-last:]]


def _as_sum(value: Tensor) -> Tensor:
    # float64 accumulation: the mean of N float32 tensors is then exact to float32 rounding.
    return value.double() if value.is_floating_point() else value.clone()


def average_checkpoints(
    checkpoints: Sequence[str | Path] | str | Path,
    out_dir: str | Path,
    last: int = 5,
    tokenizer: Tokenizer | str | Path | None = None,
) -> Path:
    """Average the parameters of several checkpoints into one model directory.

    Standard NMT practice (Vaswani et al. 2017 average the last 5-20 checkpoints): a parameter-wise
    mean of checkpoints late in training is usually better than any one of them.

    Args:
        checkpoints: ``.ckpt`` paths, or a run directory whose ``last`` most recent (by global
            step) checkpoints are taken.
        out_dir: the model directory to write.
        last: how many checkpoints to take from a run directory.
        tokenizer: as in ``export_checkpoint``; by default the newest checkpoint's.

    Returns:
        ``out_dir``.
    """
    if isinstance(checkpoints, (str, Path)) and Path(checkpoints).is_dir():
        paths = find_checkpoints(checkpoints, last)
    elif isinstance(checkpoints, (str, Path)):
        paths = [Path(checkpoints)]
    else:
        paths = [Path(p) for p in checkpoints]
    if not paths:
        raise ModelDirError("no checkpoints to average")
    total: dict[str, Tensor] = {}
    config = None
    newest = None
    for path in paths:
        checkpoint = load_checkpoint(path)
        this_config = checkpoint_model_config(checkpoint, str(path))
        state = checkpoint_model_state(checkpoint)
        if config is None:
            config, total = this_config, {k: _as_sum(v) for k, v in state.items()}
        else:
            if this_config != config or state.keys() != total.keys():
                raise ModelDirError(
                    f"{path}: a different model from {paths[0]}; only checkpoints of one run "
                    "can be averaged"
                )
            for key, value in state.items():
                # Integer buffers (none today) are not averaged: the last one is kept.
                total[key] = total[key] + value.double() if value.is_floating_point() else value
        if newest is None or checkpoint.get("global_step", -1) >= newest[0].get("global_step", -1):
            newest = (checkpoint, path)
    assert config is not None and newest is not None
    average = {k: (v / len(paths)).float() if v.is_floating_point() else v
               for k, v in total.items()}
    checkpoint, path = newest
    write_tokenizer = _checkpoint_tokenizer_writer(checkpoint, str(path), tokenizer)
    check_state_dict(average, config, str(path), vocab_size=_tokenizer_size(write_tokenizer))
    extra = checkpoint.get(CHECKPOINT_KEY) or {}
    metadata = {"averaged_checkpoints": [str(p) for p in paths]}
    logger.info("averaging %d checkpoints: %s", len(paths), ", ".join(map(str, paths)))
    return _write_dir(out_dir, average, config, write_tokenizer, extra.get("training_config"),
                      metadata)
