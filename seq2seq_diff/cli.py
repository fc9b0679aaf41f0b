"""The command line: ``python cli.py <command> ...`` (or the ``seq2seq-diff`` script).

``train`` goes through LightningCLI (every option of the model, the data module and the Trainer
can be set from YAML or the command line); every other command is a ``cli_main(argv) -> int``
function registered by name in ``COMMANDS`` and imported only when run.

Errors: a ``Seq2SeqDiffError`` or a bad config (unknown key, wrong type, unreadable file) prints
one line ``error: ...`` to stderr and exits with status 2; ``--debug`` anywhere on the command
line shows the traceback instead.

Every command first raises glibc's malloc thresholds (``seq2seq_diff.malloc``; the small-enro
preset trained 1.14× faster on the CPU); ``SEQ2SEQ_DIFF_MALLOC=system`` keeps glibc's defaults.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from seq2seq_diff import __version__
from seq2seq_diff.errors import ConfigError, Seq2SeqDiffError
from seq2seq_diff.malloc import tune_malloc

logger = logging.getLogger(__name__)

# name -> ("module:function", one-line help). Modules are imported only when their command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("seq2seq_diff.cli:train_main",
              "train a model from a YAML config (LightningCLI; `train --help` lists every option)"),
    "translate": ("seq2seq_diff.translate:cli_main",
                  "translate text or documents with a model directory"),
    "evaluate": ("seq2seq_diff.evaluate:cli_main",
                 "score translations against references with sacreBLEU (BLEU, chrF, TER)"),
    "export": ("seq2seq_diff.cli:export_main",
               "turn a training checkpoint into a model directory"),
    "average": ("seq2seq_diff.cli:average_main",
                "average the last N checkpoints of a run into a model directory"),
    "train-tokenizer": ("seq2seq_diff.cli:train_tokenizer_main",
                        "train only the SentencePiece model, from a data config or text files"),
    "analyze": ("seq2seq_diff.analyze:analyze_main",
                "attention focus, activation outliers and quantisation robustness of models"),
    "plot-attention": ("seq2seq_diff.analyze:plot_attention_main",
                       "attention heatmaps of one sentence, per layer and head"),
}


# ---------------------------------------------------------------------------------------------
# train (LightningCLI)


def expand_config_bases(argv: Sequence[str]) -> list[str]:
    """Let a config file extend another: a top-level ``base: other.yaml`` key.

    ``--config twin.yaml`` whose ``twin.yaml`` says ``base: tiny-enro.yaml`` becomes
    ``--config tiny-enro.yaml --config twin.yaml``, so the twin keeps only what differs. The
    ``base`` path is relative to the file that names it; bases may chain.
    """
    out: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("--config", "-c") and i + 1 < len(args):
            out += [x for path in _config_chain(Path(args[i + 1])) for x in ("--config", path)]
            i += 2
            continue
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
            out += [x for p in _config_chain(Path(path)) for x in ("--config", p)]
        else:
            out.append(arg)
        i += 1
    return out


def _config_chain(path: Path, seen: tuple[Path, ...] = ()) -> list[str]:
    if not path.is_file():
        return [str(path)]  # LightningCLI reports the missing file
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {_one_line(str(e))}") from e
    base = data.get("base") if isinstance(data, dict) else None
    if not base:
        return [str(path)]
    base_path = (path.parent / str(base)).resolve()
    if base_path in seen:
        raise ConfigError(f"{path}: 'base: {base}' makes a cycle of config files")
    return _config_chain(base_path, (*seen, path.resolve())) + [str(path)]


def _build_cli_classes():
    """Import Lightning lazily: ``--help`` of the other commands stays fast."""
    from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

    class SaveRunConfig(SaveConfigCallback):
        """Saves the resolved config as ``<run_dir>/config.yaml`` (replaced on resume)."""

        def save_config(self, trainer, pl_module, stage) -> None:
            run_dir = Path(trainer.default_root_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            self.parser.save(self.config, str(run_dir / "config.yaml"), skip_none=False,
                             overwrite=True, multifile=False)

    class Seq2SeqCLI(LightningCLI):
        """LightningCLI with the vocabulary link, a run directory and the export options."""

        def add_arguments_to_parser(self, parser) -> None:
            # The SentencePiece vocabulary is known only once the data module has its
            # tokenizer, so the model's vocab_size is set at instantiation.
            parser.link_arguments("data.vocab_size", "model.config.vocab_size",
                                  apply_on="instantiate")
            parser.add_argument("--base", type=str | None, default=None,
                                help="In a config file: the config it extends (path relative "
                                "to it); its keys come first, this file's override them.")
            parser.add_argument("--run_dir", type=str | None, default=None,
                                help="Run directory: replaces trainer.default_root_dir, the "
                                "loggers' save_dir and the checkpoint dirpath "
                                "(<run_dir>/checkpoints) when the run starts (--print_config "
                                "shows them before that).")
            parser.add_argument("--ckpt_path", type=str | None, default=None,
                                help="Resume from this checkpoint, or 'last' for the newest "
                                "last.ckpt of the run.")
            parser.add_argument("--export_dir", type=str | None, default=None,
                                help="Model directory written at the end (default "
                                "<run_dir>/model).")
            parser.add_argument("--export", type=bool, default=True,
                                help="Export the best (else last) checkpoint at the end.")

        def before_instantiate_classes(self) -> None:
            apply_run_dir(self.config)
            warn_slow_bf16(self.config)

    return Seq2SeqCLI, SaveRunConfig


def warn_slow_bf16(config: Any) -> None:
    """Warn when bf16 training will run on a CPU without bf16 matrix instructions."""
    import torch

    trainer = config.get("trainer", {})
    precision = str(trainer.get("precision") or "")
    accelerator = str(trainer.get("accelerator") or "auto")
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if not (on_cpu and precision.startswith("bf16")):
        return
    from seq2seq_diff.quantize import cpu_bf16_native

    if cpu_bf16_native() is False:  # None: a build without oneDNN's check; cannot tell
        logger.warning("trainer.precision %s on a CPU without AVX512-BF16/AMX: bf16 is emulated "
                       "and slower than float32 here; use --trainer.precision 32-true", precision)


def apply_run_dir(config: Any) -> None:
    """Point the Trainer, loggers and checkpoints at ``config.run_dir`` (if set)."""
    run_dir = config.get("run_dir")
    trainer = config.trainer
    if not run_dir:
        config.run_dir = trainer.default_root_dir or "."
        return
    trainer.default_root_dir = run_dir
    loggers = trainer.logger if isinstance(trainer.logger, list) else [trainer.logger]
    for spec in loggers:
        init_args = getattr(spec, "init_args", None)
        if init_args is not None and "save_dir" in init_args:
            init_args.save_dir = run_dir
    for spec in trainer.callbacks or []:
        init_args = getattr(spec, "init_args", None)
        if init_args is not None and "dirpath" in init_args:  # ModelCheckpoint and subclasses
            init_args.dirpath = os.path.join(run_dir, "checkpoints")


def _checkpoint_to_export(trainer) -> str | None:
    """The best monitored checkpoint; the final one (``last``) when the monitor is the step.

    With ``monitor: step`` the newest is meant to be the best, and ``last.ckpt`` also holds the
    steps after the last validation, which the monitored checkpoints do not.
    """
    callback = trainer.checkpoint_callback
    if callback is None:
        return None
    order = (callback.best_model_path, callback.last_model_path)
    if callback.monitor in (None, "step"):
        order = order[::-1]
    for path in order:
        if path and Path(path).is_file():
            return path
    return None


def train_main(argv: list[str]) -> int:
    """``train``: fit a ``TranslationModule`` with LightningCLI, then export a model directory."""
    from seq2seq_diff.data import TranslationDataModule
    from seq2seq_diff.lit_module import TranslationModule
    from seq2seq_diff.model_dir import export_checkpoint, save_model_dir

    cli_class, save_config = _build_cli_classes()
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
    warnings.filterwarnings("ignore", message=".*treespec, LeafSpec.*")  # Lightning on torch 2.13
    cli = cli_class(
        TranslationModule,
        TranslationDataModule,
        args=expand_config_bases(argv),
        run=False,
        save_config_callback=save_config,
        save_config_kwargs={"save_to_log_dir": False, "overwrite": True},
        parser_kwargs={"exit_on_error": False, "prog": "cli.py train",
                       "description": "Train a translation model."},
        seed_everything_default=1234,
    )
    config = cli.config
    cli.model.training_config = yaml.safe_load(cli.parser.dump(config, skip_none=False))
    trainer = cli.trainer
    trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=config.ckpt_path)
    if not config.export or not trainer.is_global_zero:
        return 0
    out_dir = config.export_dir or os.path.join(config.run_dir, "model")
    checkpoint = _checkpoint_to_export(trainer)
    if checkpoint is not None:
        export_checkpoint(checkpoint, out_dir)
        logger.info("exported %s", checkpoint)
    else:
        save_model_dir(out_dir, cli.model.model, cli.datamodule.tokenizer,
                       cli.model.training_config)
    print(f"model directory: {out_dir}")
    return 0


# ---------------------------------------------------------------------------------------------
# export / average


def export_main(argv: list[str]) -> int:
    """``export CKPT --out DIR``: a Lightning checkpoint -> a model directory."""
    from seq2seq_diff.model_dir import export_checkpoint

    parser = argparse.ArgumentParser(prog="cli.py export", description=export_main.__doc__)
    parser.add_argument("checkpoint", help="a .ckpt file written by `train`")
    parser.add_argument("--out", "-o", required=True, help="the model directory to write")
    parser.add_argument("--tokenizer", help="spm.model, for checkpoints without one")
    args = parser.parse_args(argv)
    out = export_checkpoint(args.checkpoint, args.out, tokenizer=args.tokenizer)
    print(f"model directory: {out}")
    return 0


def average_main(argv: list[str]) -> int:
    """``average (CKPT... | --run-dir DIR [--last N]) --out DIR``: parameter-wise mean."""
    from seq2seq_diff.model_dir import average_checkpoints

    parser = argparse.ArgumentParser(
        prog="cli.py average",
        description="Average checkpoints into a model directory: the given .ckpt files, or the "
        "last N (by global step) under a run directory.")
    parser.add_argument("checkpoints", nargs="*", help=".ckpt files")
    parser.add_argument("--run-dir", help="take the last N checkpoints found under this folder")
    parser.add_argument("--last", type=int, default=5, help="N (default 5)")
    parser.add_argument("--out", "-o", required=True, help="the model directory to write")
    parser.add_argument("--tokenizer", help="spm.model, for checkpoints without one")
    args = parser.parse_args(argv)
    if bool(args.checkpoints) == bool(args.run_dir):
        raise ConfigError("average: give either checkpoint files or --run-dir, not both")
    if args.last < 1:
        raise ConfigError(f"average: --last must be at least 1, got {args.last}")
    source = args.run_dir or args.checkpoints
    out = average_checkpoints(source, args.out, last=args.last, tokenizer=args.tokenizer)
    print(f"model directory: {out}")
    return 0


# ---------------------------------------------------------------------------------------------
# train-tokenizer


def _data_section(config_path: str) -> dict[str, Any]:
    """The merged ``data:`` section of a training config (``base:`` chains included)."""
    data: dict[str, Any] = {}
    for path in _config_chain(Path(config_path)):
        if not Path(path).is_file():
            raise ConfigError(f"{path}: no such config file")
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        data.update(loaded.get("data") or {})
    if not data:
        raise ConfigError(f"{config_path}: no 'data' section")
    return data


def build_datamodule(config_path: str):
    """The ``TranslationDataModule`` of a training config (its tokenizer trained or reused)."""
    from jsonargparse import ArgumentParser

    from seq2seq_diff.data import TranslationDataModule

    data_parser = ArgumentParser(exit_on_error=False)
    data_parser.add_class_arguments(TranslationDataModule, "data")
    parsed = data_parser.parse_object({"data": _data_section(config_path)})
    return data_parser.instantiate_classes(parsed).data


def train_tokenizer_main(argv: list[str]) -> int:
    """``train-tokenizer``: only the SentencePiece model, from a data config or text files."""
    parser = argparse.ArgumentParser(
        prog="cli.py train-tokenizer",
        description="Train the joint SentencePiece model alone: from the data section of a "
        "training config (exactly what `train` would train and reuse, written to its "
        "data.work_dir), or from text files.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="a training config (its data section is used)")
    source.add_argument("--files", nargs="+", help="UTF-8 text files, one sentence per line")
    parser.add_argument("--output", "-o", help="where to write the .model (required with "
                        "--files; with --config a copy besides data.work_dir/spm.model)")
    parser.add_argument("--vocab-size", type=int, default=8000, help="with --files")
    parser.add_argument("--model-type", default="unigram", help="with --files: unigram, bpe")
    parser.add_argument("--character-coverage", type=float, default=1.0, help="with --files")
    parser.add_argument("--no-normalize-romanian", action="store_true",
                        help="with --files: keep cedilla ş ţ as they are")
    parser.add_argument("--seed", type=int, default=0, help="with --files")
    args = parser.parse_args(argv)
    if args.files:
        from seq2seq_diff.tokenizer import train_tokenizer

        if not args.output:
            raise ConfigError("train-tokenizer --files needs --output PATH.model")
        tokenizer = train_tokenizer(
            None, args.output, args.vocab_size, files=args.files, model_type=args.model_type,
            character_coverage=args.character_coverage,
            normalize_romanian=not args.no_normalize_romanian, seed=args.seed)
        path = Path(args.output)
    else:
        datamodule = build_datamodule(args.config)  # trains or reuses the tokenizer
        tokenizer = datamodule.tokenizer
        path = datamodule.work_dir / "spm.model"
        if args.output:
            path = tokenizer.save(args.output)
    print(f"tokenizer: {path} ({tokenizer.vocab_size} pieces)")
    return 0


# ---------------------------------------------------------------------------------------------
# dispatch


def _one_line(message: str) -> str:
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [
        f"seq2seq-diff {__version__}: encoder-decoder translation with differential attention",
        "",
        "usage: python cli.py [--debug] <command> [options]",
        "",
        "commands:",
        *(f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()),
        "",
        "`python cli.py <command> --help` shows a command's options; --debug shows tracebacks.",
    ]
    return "\n".join(lines)


def resolve_command(name: str) -> Callable[[list[str]], int | None]:
    """The function registered for ``name``, importing its module now."""
    target, _ = COMMANDS[name]
    module_name, func_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            raise Seq2SeqDiffError(
                f"command '{name}' is not available: module {module_name} is missing"
            ) from e
        raise Seq2SeqDiffError(
            f"command '{name}' needs the Python package '{e.name}': pip install -e . "
            "(or `make install`)"
        ) from e
    return getattr(module, func_name)


def _setup_logging(debug: bool) -> None:
    """Our package logs INFO to stderr; Lightning keeps its own handler (no duplicates)."""
    package = logging.getLogger("seq2seq_diff")
    if not package.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        package.addHandler(handler)
    package.setLevel(logging.DEBUG if debug else logging.INFO)
    package.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status.

    Args:
        argv: the arguments after the program name (default ``sys.argv[1:]``).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if args else 2
    if args[0] in ("-V", "--version"):
        print(__version__)
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"error: unknown command '{name}'; commands: {', '.join(COMMANDS)}",
              file=sys.stderr)
        return 2
    _setup_logging(debug)
    if tune_malloc():  # glibc keeps freed tensors' memory for reuse (seq2seq_diff.malloc)
        logger.debug("malloc: mmap and trim thresholds raised")
    saved_env = os.environ.get("JSONARGPARSE_DEBUG")
    if debug:
        os.environ["JSONARGPARSE_DEBUG"] = "true"  # jsonargparse's own details on config errors
    try:
        return int(resolve_command(name)(rest) or 0)
    except (Seq2SeqDiffError, argparse.ArgumentError, yaml.YAMLError) as e:
        if debug:
            raise
        print(f"error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print("error: interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:  # a command's --help or --print_config, or its argparse usage error
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    finally:
        if debug:
            if saved_env is None:
                os.environ.pop("JSONARGPARSE_DEBUG", None)
            else:
                os.environ["JSONARGPARSE_DEBUG"] = saved_env
