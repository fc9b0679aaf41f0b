"""Translate files and stdin with a model directory, streaming and resumable; the command line.

The in-memory translator (batching, search, layout) is ``translator.py``; this module feeds it.

Files stream through in windows of lines (bounded by a line count and a byte budget; document
mode cuts windows at paragraph boundaries), so memory stays flat as the input grows. After each
window the output is flushed and fsynced, then a sidecar ``OUTPUT.progress`` (JSON: input lines
done, output byte offset) replaces the previous one atomically. ``resume=True`` truncates the
output to the recorded offset and carries on, so interrupted + resumed runs write exactly the
bytes of an uninterrupted one. The sidecar is removed once the whole input is done.

Line mode writes exactly one line per input line (blank in, blank out), each ended by ``\\n``.
Document mode keeps paragraphs, blank lines and the presence or absence of a final newline.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from seq2seq_diff.errors import ConfigError, DataError
from seq2seq_diff.segment import DEFAULT_MAX_TOKENS, segment_document
from seq2seq_diff.translator import ProgressHook, TranslationStats, Translator

logger = logging.getLogger(__name__)

MODES = ("line", "document")
PROGRESS_SUFFIX = ".progress"
PROGRESS_VERSION = 1
_BOM = b"\xef\xbb\xbf"


# ---------------------------------------------------------------------------------------------
# Reading input: lines with their numbers, strict or replaced UTF-8, BOM and CRLF accepted


class _LineReader:
    """Decoded lines of a binary stream, without their line ends."""

    def __init__(self, stream: IO[bytes], name: str, errors: str, stats: TranslationStats):
        self.stream = stream
        self.name = name
        self.errors = errors
        self.stats = stats
        self.line_no = 0  # lines read so far
        self.bytes_read = 0
        self.ended_with_newline = True

    def skip(self, count: int) -> None:
        """Skip ``count`` lines (already translated in an earlier run)."""
        while self.line_no < count:
            raw = self.stream.readline()
            self.bytes_read += len(raw)
            if not raw:
                raise DataError(f"the progress file says {count} lines were done but the "
                                f"input has only {self.line_no}; it changed since: start over "
                                "without --resume", self.name)
            self.line_no += 1

    def read(self) -> tuple[str, int] | None:
        """The next line and its raw size in bytes, or None at the end."""
        raw = self.stream.readline()
        if not raw:
            return None
        self.line_no += 1
        size = len(raw)
        self.bytes_read += size
        if self.line_no == 1 and raw.startswith(_BOM):
            raw = raw[len(_BOM):]
            self.stats.bom = True
        self.ended_with_newline = raw.endswith(b"\n")
        if self.ended_with_newline:
            raw = raw[:-1]
            if raw.endswith(b"\r"):
                raw = raw[:-1]
                self.stats.crlf_normalised += 1
        try:
            return raw.decode("utf-8"), size
        except UnicodeDecodeError as error:
            if self.errors != "replace":
                raise DataError(
                    f"invalid UTF-8 at byte {error.start} of the line ({error.reason}); convert "
                    "the file to UTF-8 (e.g. iconv -f LATIN1 -t UTF-8) or pass --errors replace",
                    self.name, self.line_no) from None
            self.stats.invalid_utf8_lines += 1
            return raw.decode("utf-8", errors="replace"), size


def _windows(reader: _LineReader, mode: str, window_lines: int,
             window_bytes: int) -> Iterator[list[str]]:
    """Windows of lines: at most ``window_lines`` lines / ``window_bytes`` bytes (at least one
    line). In document mode a window is extended to the next blank line, so paragraphs stay
    whole, up to 4 times the budget; a longer paragraph is cut at a line boundary."""
    while True:
        lines: list[str] = []
        size = 0
        while True:
            item = reader.read()
            if item is None:
                break
            line, n = item
            lines.append(line)
            size += n
            full = len(lines) >= window_lines or size >= window_bytes
            if not full:
                continue
            if mode == "line" or not line.strip():
                break
            if len(lines) >= 4 * window_lines or size >= 4 * window_bytes:
                logger.warning("a paragraph of over %d lines / %d bytes was cut into two "
                               "windows at line %d", 4 * window_lines, 4 * window_bytes,
                               reader.line_no)
                break
        if not lines:
            return
        yield lines


# ---------------------------------------------------------------------------------------------
# Progress sidecar and interruption


class TranslationInterrupted(KeyboardInterrupt):
    """Ctrl-C during ``translate_file``; the output and its progress file are consistent.

    Attributes:
        lines_done: Input lines whose translations are on disk.
        stats: Counts so far.
        resumable: Whether ``resume=True`` can continue (False for stdout output).
    """

    def __init__(self, lines_done: int, stats: TranslationStats, resumable: bool):
        super().__init__(f"interrupted after {lines_done} input lines")
        self.lines_done = lines_done
        self.stats = stats
        self.resumable = resumable


def progress_path(output: str | Path) -> Path:
    """The sidecar of ``output``: ``OUTPUT.progress``."""
    output = Path(output)
    return output.with_name(output.name + PROGRESS_SUFFIX)


def _write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def _deferred_interrupt() -> Iterator[None]:
    """Hold Ctrl-C until the block ends, so a window's output and progress land together."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[Any] = []
    previous = signal.signal(signal.SIGINT, lambda *args: received.append(args))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def _settings(translator: Translator, mode: str) -> dict[str, Any]:
    """What must match between an interrupted run and its resumption for identical output."""
    return {"mode": mode, "beam_size": translator.beam_size,
            "length_penalty": translator.length_penalty, "max_tokens": translator.max_tokens,
            "max_sentence_tokens": translator.max_sentence_tokens,
            "max_len_a": translator.max_len_a, "max_len_b": translator.max_len_b,
            "n_best": translator.n_best, "lang": translator.lang,
            "context": translator.context, "quantize": translator.quantize,
            "tokenizer": translator.tokenizer.fingerprint}


def _read_progress(path: Path, output: Path, settings: dict[str, Any]) -> dict[str, Any]:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        lines_done, offset = int(state["lines_done"]), int(state["output_bytes"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DataError(f"unreadable progress file ({error}); start over without --resume",
                        path) from None
    if state.get("settings") != settings:
        raise ConfigError(f"{path} was written with other options ({state.get('settings')}); "
                          "rerun with the same options, or without --resume to start over")
    if output.stat().st_size < offset:
        raise DataError(f"the output is shorter ({output.stat().st_size} bytes) than the "
                        f"{offset} bytes recorded in {path.name}; start over without --resume",
                        output)
    state["lines_done"], state["output_bytes"] = lines_done, offset
    return state


# ---------------------------------------------------------------------------------------------
# Files


def _open_progress_bar(enabled: bool, total_bytes: int | None, initial: int):
    """tqdm over input bytes (so the ETA holds for lines of any length), or None."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # optional nicety
        return None
    return tqdm(total=total_bytes, initial=initial, unit="B", unit_scale=True,
                dynamic_ncols=True, desc="translating", file=sys.stderr)


def translate_file(
    translator: Translator,
    input: str | Path,
    output: str | Path,
    mode: str = "line",
    resume: bool = False,
    errors: str = "strict",
    window_lines: int = 2000,
    window_bytes: int = 1 << 20,
    progress_bar: bool | None = None,
) -> TranslationStats:
    """Translate a file (or stdin, "-") into a file (or stdout, "-"), window by window.

    Args:
        translator: The translator.
        input: Source path, or "-" for stdin.
        output: Target path, or "-" for stdout (not resumable).
        mode: "line" (one output line per input line) or "document" (paragraphs and sentences).
        resume: Continue an interrupted run from ``OUTPUT.progress``.
        errors: "strict" (invalid UTF-8 raises ``DataError`` naming file and line) or "replace".
        window_lines: Most lines read at a time.
        window_bytes: Most input bytes read at a time (a longer line is still read whole).
        progress_bar: Show tqdm on stderr; None = only when stderr is a terminal.

    Returns:
        The counts for the summary line (over the whole file, resumed runs included).

    Raises:
        DataError: Unreadable input, invalid UTF-8, or an unusable progress file.
        ConfigError: Bad options, or a resume with options other than the interrupted run's.
        TranslationInterrupted: Ctrl-C; what is on disk is consistent and resumable.
    """
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
    if errors not in ("strict", "replace"):
        raise ConfigError(f"errors must be 'strict' or 'replace', got {errors!r}")
    if window_lines < 1 or window_bytes < 1:
        raise ConfigError(f"window_lines and window_bytes must be >= 1, got {window_lines} "
                          f"and {window_bytes}")
    if translator.n_best > 1:
        raise ConfigError("n-best lists are for translate_nbest (or the CLI's --n-best in line "
                          "mode); set n_best=1 for translate_file")
    to_stdout = str(output) == "-"
    from_stdin = str(input) == "-"
    if resume and to_stdout:
        raise ConfigError("--resume needs --output FILE: stdout cannot be resumed")
    if not from_stdin:
        input = Path(input)
        if not input.is_file():
            raise DataError("input file not found", input)
        if not to_stdout and Path(output).resolve() == input.resolve():
            raise ConfigError(f"--output must differ from --input ({input})")

    settings = _settings(translator, mode)
    stats = TranslationStats()
    lines_done = offset = 0
    sidecar = None if to_stdout else progress_path(output)
    if sidecar is not None:
        output = Path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        if resume and sidecar.exists():
            state = _read_progress(sidecar, output, settings)
            lines_done, offset = state["lines_done"], state["output_bytes"]
            stats = TranslationStats.from_dict(state.get("stats", {}))
            logger.info("resuming %s after %d input lines (%d bytes written)", output,
                        lines_done, offset)
        elif resume and output.exists():
            raise DataError(f"nothing to resume: no {sidecar.name} (the run finished, or the "
                            "file was not written by translate); drop --resume to start over",
                            output)
    stats_seconds = stats.seconds
    start = time.perf_counter()

    with contextlib.ExitStack() as stack:
        in_stream = sys.stdin.buffer if from_stdin else stack.enter_context(open(input, "rb"))
        if to_stdout:
            out_stream = sys.stdout.buffer
        else:
            resuming = resume and sidecar.exists()
            out_stream = stack.enter_context(open(output, "r+b" if resuming else "wb"))
            out_stream.truncate(offset)
            out_stream.seek(offset)
            _save_progress(sidecar, out_stream, lines_done, settings, stats, input)
        reader = _LineReader(in_stream, "<stdin>" if from_stdin else str(input), errors, stats)
        reader.skip(lines_done)
        total = None if from_stdin else input.stat().st_size
        bar = _open_progress_bar(sys.stderr.isatty() if progress_bar is None else progress_bar,
                                 total, reader.bytes_read)
        if bar is not None:
            stack.callback(bar.close)
        tokens_before = stats.output_tokens

        def on_batch(units: int, tokens: int) -> None:
            if bar is not None:
                rate = (stats.output_tokens - tokens_before) / (time.perf_counter() - start)
                bar.set_postfix_str(f"{stats.sentences} sent, {rate:.0f} tok/s", refresh=False)

        try:
            for lines in _windows(reader, mode, window_lines, window_bytes):
                text = _translate_window(translator, lines, mode, reader, stats, on_batch)
                with _deferred_interrupt():
                    out_stream.write(text.encode("utf-8"))
                    lines_done = reader.line_no
                    stats.seconds = stats_seconds + time.perf_counter() - start
                    if sidecar is not None:
                        _save_progress(sidecar, out_stream, lines_done, settings, stats, input)
                    else:
                        out_stream.flush()
                if bar is not None:
                    bar.update(reader.bytes_read - bar.n)
        except KeyboardInterrupt:
            stats.seconds = stats_seconds + time.perf_counter() - start
            raise TranslationInterrupted(lines_done, stats, sidecar is not None) from None
    stats.seconds = stats_seconds + time.perf_counter() - start
    if sidecar is not None:
        sidecar.unlink(missing_ok=True)
    return stats


def _save_progress(sidecar: Path, out_stream: IO[bytes], lines_done: int,
                   settings: dict[str, Any], stats: TranslationStats, input: Any) -> None:
    """Output on disk first (flush + fsync), then the sidecar that points at its end."""
    out_stream.flush()
    os.fsync(out_stream.fileno())
    _write_json_atomic(sidecar, {
        "version": PROGRESS_VERSION, "input": str(input), "lines_done": lines_done,
        "output_bytes": out_stream.tell(), "settings": settings, "stats": stats.to_dict(),
    })


def _translate_window(translator: Translator, lines: list[str], mode: str, reader: _LineReader,
                      stats: TranslationStats, on_batch: ProgressHook) -> str:
    if mode == "line":
        doc = translator._segment_lines(lines, stats)
        out = doc.reassemble_lines(translator._translate_units(doc, stats, on_batch))
        return "".join(line + "\n" for line in out)
    text = "\n".join(lines) + ("\n" if reader.ended_with_newline else "")
    doc = segment_document(text, translator.lang, translator.max_sentence_tokens,
                           translator.count_tokens)
    stats.add_segments(doc.summary)
    return doc.reassemble(translator._translate_units(doc, stats, on_batch))


# ---------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python cli.py translate",
        description="Translate a file, or stdin, with a model directory. Line mode writes one "
                    "line per input line; document mode keeps paragraphs and splits sentences.",
    )
    parser.add_argument("--model", required=True, metavar="DIR", help="model directory")
    parser.add_argument("--input", default="-", metavar="FILE", help="source text (- = stdin)")
    parser.add_argument("--output", default="-", metavar="FILE",
                        help="translation (- = stdout)")
    parser.add_argument("--mode", choices=MODES, default="line")
    parser.add_argument("--beam-size", type=int, default=5, metavar="N",
                        help="beam width; 1 = greedy (default 5)")
    parser.add_argument("--length-penalty", type=float, default=1.0, metavar="A",
                        help="GNMT length penalty alpha (default 1.0; 0 = none)")
    parser.add_argument("--n-best", type=int, default=1, metavar="N",
                        help="write N hypotheses per line as 'LINE ||| TEXT ||| SCORE' "
                             "(line mode, not resumable)")
    parser.add_argument("--max-tokens", type=int, default=4096, metavar="N",
                        help="source tokens per batch, padding included (default 4096)")
    parser.add_argument("--max-sentence-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                        metavar="N", help="longer sentences are translated in chunks "
                                          f"(default {DEFAULT_MAX_TOKENS})")
    parser.add_argument("--max-len-a", type=float, default=1.2, metavar="A",
                        help="output length cap: A * source tokens + B (default 1.2)")
    parser.add_argument("--max-len-b", type=int, default=10, metavar="B", help="(default 10)")
    parser.add_argument("--lang", default=None,
                        help="source language for sentence splitting (default: the model's "
                             "src_lang, else en)")
    parser.add_argument("--context", type=int, default=None, metavar="K",
                        help="document mode: give a document-context model the previous K "
                             "sentences of the paragraph (default: the model's data.context, "
                             "else 0; in line mode each line is its own paragraph)")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run into the same --output")
    parser.add_argument("--errors", choices=("strict", "replace"), default="strict",
                        help="invalid UTF-8: stop with an error (default) or replace it")
    parser.add_argument("--window-lines", type=int, default=2000, metavar="N",
                        help="input lines read, translated and saved at a time (default 2000)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    precision = parser.add_mutually_exclusive_group()
    parser.set_defaults(pack=None)  # None: where packing pays on this CPU (packed.packing_pays)
    precision.add_argument("--int8", action="store_true",
                           help="int8 dynamic quantisation of the linear layers (CPU)")
    precision.add_argument("--bf16", action="store_true",
                           help="bf16 weights and matrix products, float32 norms and scores "
                                "(GPUs; CPUs with AVX512-BF16 or AMX)")
    packing = parser.add_mutually_exclusive_group()
    packing.add_argument("--pack", dest="pack", action="store_true",
                         help="float32 or --bf16 on a CPU: pack the linear weights for oneDNN "
                              "(the same function; by default only where it pays: not on Intel "
                              "CPUs, whose MKL is faster unpacked)")
    packing.add_argument("--no-pack", dest="pack", action="store_false",
                         help="float32 or --bf16 on a CPU: keep torch's default GEMM, unpacked")
    compiling = parser.add_mutually_exclusive_group()
    compiling.add_argument("--compile", action="store_true",
                           help="compile the decoding step with torch.compile (float32 or "
                                "--bf16): tens of seconds in every run, then faster decoding; "
                                "for long inputs")
    compiling.add_argument("--aot", action="store_true",
                           help="CPU, float32 or --bf16: decode with graphs compiled ahead of "
                                "time, built once per model (a minute or two, kept in "
                                "$SEQ2SEQ_DIFF_AOT_CACHE, default ~/.cache/seq2seq_diff/aot) "
                                "and loaded in seconds by every later run; the fastest decoding")
    parser.add_argument("--quiet", action="store_true", help="no progress bar, no summary")
    return parser


def cli_main(argv: list[str]) -> int:
    """``python cli.py translate``: translate a file or stdin; the summary goes to stderr.

    Returns:
        0 on success, 130 after Ctrl-C (with a line saying how to resume).
    """
    args = build_parser().parse_args(argv)
    options = dict(beam_size=args.beam_size, length_penalty=args.length_penalty,
                   max_tokens=args.max_tokens, max_sentence_tokens=args.max_sentence_tokens,
                   max_len_a=args.max_len_a, max_len_b=args.max_len_b, n_best=args.n_best,
                   lang=args.lang, context=args.context,  # None: the model's training setting
                   quantize="int8" if args.int8 else "bf16" if args.bf16 else "none",
                   pack=args.pack, compile=args.compile, aot=args.aot)
    if args.bf16 and args.device.split(":")[0] == "cpu":
        from seq2seq_diff.quantize import cpu_bf16_native

        if cpu_bf16_native() is False:
            print("warning: --bf16 on a CPU without AVX512-BF16/AMX is emulated and slower than "
                  "float32", file=sys.stderr)
    translator = Translator.from_pretrained(args.model, device=args.device, **options)
    if args.n_best > 1:
        stats = _write_nbest(translator, args)
    else:
        try:
            stats = translate_file(translator, args.input, args.output, args.mode, args.resume,
                                   args.errors, window_lines=args.window_lines,
                                   progress_bar=None if not args.quiet else False)
        except TranslationInterrupted as stop:
            if stop.resumable:
                print(f"interrupted after {stop.lines_done} input lines; {args.output} and its "
                      f"{PROGRESS_SUFFIX} file are consistent: rerun the same command with "
                      "--resume to continue", file=sys.stderr)
            else:
                print(f"interrupted after {stop.lines_done} input lines", file=sys.stderr)
            return 130
    if not args.quiet:
        print(stats, file=sys.stderr)
    return 0


def _write_nbest(translator: Translator, args: argparse.Namespace) -> TranslationStats:
    """n-best lists, ``LINE ||| TEXT ||| SCORE`` (0-based line numbers, Moses/Marian style)."""
    if args.mode != "line" or args.resume:
        raise ConfigError("--n-best works in --mode line without --resume")
    stats = TranslationStats()
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        source = (sys.stdin.buffer if args.input == "-"
                  else stack.enter_context(_open_input(args.input)))
        sink = (sys.stdout.buffer if args.output == "-"
                else stack.enter_context(open(args.output, "wb")))
        reader = _LineReader(source, "<stdin>" if args.input == "-" else args.input,
                             args.errors, stats)
        first = 0
        for lines in _windows(reader, "line", args.window_lines, 1 << 20):
            for i, entries in enumerate(translator.translate_nbest(lines, stats)):
                for text, score in entries:
                    sink.write(f"{first + i} ||| {text} ||| {score:.6f}\n".encode())
            first += len(lines)
    stats.seconds = time.perf_counter() - start
    return stats


def _open_input(path: str) -> IO[bytes]:
    if not Path(path).is_file():
        raise DataError("input file not found", path)
    return open(path, "rb")
