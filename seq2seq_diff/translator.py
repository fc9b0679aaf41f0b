"""Translate sentences and documents in memory with a model and its tokenizer.

Pipeline: text -> units (``segment.py``: lines, paragraphs, sentences, chunks of long sentences)
-> SentencePiece ids -> length-sorted batches of at most ``max_tokens`` source tokens (padding
included) -> beam or greedy search (``search.py``) -> pieces decoded -> back in input order ->
reassembled with the original layout. Nothing is dropped and nothing is truncated: a sentence
longer than ``max_sentence_tokens`` pieces is cut into chunks and every chunk is translated.

``translate`` gives exactly one output per input segment (blank in, blank out);
``translate_document`` keeps paragraphs, blank lines and the presence or absence of a final
newline. Files and the command line are ``translate.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from seq2seq_diff.errors import ConfigError
from seq2seq_diff.model import Seq2SeqTransformer
from seq2seq_diff.packed import pack_linears, packing_available, packing_pays, store_input_major
from seq2seq_diff.search import beam_search, greedy_search, max_lengths
from seq2seq_diff.segment import (
    DEFAULT_MAX_TOKENS,
    UNUSUAL_NOTES,
    SegmentedDocument,
    SegmentSummary,
    segment_document,
    segment_lines,
    unusual_notes,
)
from seq2seq_diff.tokenizer import Tokenizer

# ---------------------------------------------------------------------------------------------
# Statistics


_TRANSLATION_NOTES = (
    ("length_capped", "{} translations hit the length cap"),
    ("bom", "BOM dropped"),
    ("invalid_utf8_lines", "{} lines with invalid UTF-8 replaced"),
)


@dataclass
class TranslationStats:
    """Counts for the one-line summary; ``str()`` gives that line.

    Attributes:
        lines: Input lines (blank ones included).
        blank_lines: Empty or whitespace-only input lines (never sent to the model).
        paragraphs: Runs of non-blank lines (document mode only).
        sentences: Sentences found.
        units: Strings translated (sentences, long sentences' chunks).
        chunked_sentences: Sentences over ``max_sentence_tokens`` cut into chunks.
        char_window_sentences: Of those, how many were cut inside a word.
        over_limit_units: Units still over the limit (a single character exceeded it).
        whitespace_lines: Whitespace-only lines written back empty.
        crlf_normalised: Carriage returns read as line ends.
        split_failures: Lines the sentence splitter could not split (kept whole).
        invalid_utf8_lines: Lines with undecodable bytes replaced (``errors="replace"``).
        bom: A UTF-8 byte-order mark was dropped from the start of the input.
        length_capped: Translations that reached the search's length cap (possible run-ons).
        source_tokens: Source pieces sent to the model (eos included).
        output_tokens: Target pieces produced (eos excluded).
        seconds: Time spent.
    """

    lines: int = 0
    blank_lines: int = 0
    paragraphs: int = 0
    sentences: int = 0
    units: int = 0
    chunked_sentences: int = 0
    char_window_sentences: int = 0
    over_limit_units: int = 0
    whitespace_lines: int = 0
    crlf_normalised: int = 0
    split_failures: int = 0
    invalid_utf8_lines: int = 0
    bom: bool = False
    length_capped: int = 0
    source_tokens: int = 0
    output_tokens: int = 0
    seconds: float = 0.0

    def add_segments(self, summary: SegmentSummary, paragraphs: bool = True) -> None:
        """Add the counts of one segmented window (``paragraphs=False`` in line mode)."""
        if paragraphs:
            self.paragraphs += summary.paragraphs
        for field in fields(SegmentSummary):
            if field.name != "paragraphs":
                setattr(self, field.name, getattr(self, field.name) + getattr(summary, field.name))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TranslationStats:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def __str__(self) -> str:
        rate = self.output_tokens / self.seconds if self.seconds > 0 else 0.0
        text = (f"translated {self.lines} lines ({self.blank_lines} blank), "
                f"{self.sentences} sentences in {self.units} units, {self.source_tokens} -> "
                f"{self.output_tokens} tokens in {self.seconds:.1f}s ({rate:.0f} tok/s)")
        if self.paragraphs:
            text = text.replace(" lines ", f" lines in {self.paragraphs} paragraphs ", 1)
        unusual = unusual_notes(self, UNUSUAL_NOTES + _TRANSLATION_NOTES)
        return text + ("; " + ", ".join(unusual) if unusual else "")


# ---------------------------------------------------------------------------------------------
# Batching


def make_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Group indices into batches of similar length, longest first.

    Each batch holds at most ``max_tokens`` tokens counting padding (size × longest); a sequence
    longer than ``max_tokens`` gets a batch of its own rather than being dropped. Ties keep input
    order, so batching is deterministic.

    Args:
        lengths: Token count of each sequence.
        max_tokens: Token budget of one padded batch.

    Returns:
        Lists of indices into ``lengths``; every index appears exactly once.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        if current and (len(current) + 1) * longest > max_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


# ---------------------------------------------------------------------------------------------
# The model a translator decodes with


def inference_model(model: Seq2SeqTransformer, device: str | torch.device,
                    quantize: str = "none", pack: bool | None = None,
                    compile: bool = False, aot: bool = False) -> Seq2SeqTransformer:
    """The model ``Translator`` decodes with, in eval mode on ``device`` (``Translator``
    documents the arguments). Uncompiled float32 on a GPU moves ``model`` there and decodes it;
    every other setting decodes a copy and leaves the caller's model as it is.

    * ``quantize`` "int8" or "bf16": a converted copy (``seq2seq_diff.quantize``).
    * float32 or bf16 on a CPU, decoded eagerly: oneDNN-packed weights where packing pays on
      this CPU, or with ``pack=True`` (``packed.pack_linears``).
    * float32 or bf16 on a CPU otherwise: an inference copy (projections fused) with its linear
      weights stored input-major (``packed.store_input_major``).
    * ``compile``: then its decoding steps compiled (``compiled.compile_decoding``);
      ``aot``: its searches run graphs compiled ahead of time (``exported.aot_decoding``),
      int8 with activations quantised per row inside them (``quantize.int8_rows``).
    """
    device = torch.device(device)
    flag = "--aot" if aot else "--compile"
    if compile and aot:
        raise ConfigError("--compile and --aot are two ways to compile decoding: choose one")
    if compile and quantize == "int8":
        raise ConfigError("--compile takes float32 or bf16, not int8: drop --compile or "
                          "--int8, or compile ahead of time with --aot")
    if aot and device.type != "cpu":
        raise ConfigError(f"--aot compiles decoding for the CPU, not {device}: drop it, or "
                          "use --compile")
    if pack and (compile or aot or quantize == "int8"):
        raise ConfigError("oneDNN packing is for eager float32 or bf16 decoding: drop --pack, "
                          f"or drop {flag if compile or aot else '--int8'}")
    if quantize == "int8" and device.type != "cpu":
        raise ConfigError(f"int8 quantisation runs on the CPU only, not on {device}")
    cpu = device.type == "cpu"
    packs = (cpu and pack is not False and not (compile or aot)  # eager float32 or bf16
             and (pack or packing_pays()))
    if aot and quantize == "int8":  # int8 per row inside the graphs
        from seq2seq_diff.quantize import int8_rows

        model = int8_rows(model)
    elif quantize != "none":
        from seq2seq_diff.quantize import apply_quantization

        model = apply_quantization(model, quantize)  # ConfigError for an unknown mode
        if quantize == "bf16" and packs and packing_available(torch.bfloat16):
            return pack_linears(model).to(device).eval()
    elif packs and model.embed.weight.dtype == torch.float32 and packing_available():
        return pack_linears(model).to(device).eval()
    elif cpu:
        model = model.inference_copy()
    if cpu and quantize != "int8":
        store_input_major(model)
    if compile:
        from seq2seq_diff.compiled import compile_decoding

        return compile_decoding(model, device)  # a copy, on the device
    if aot:
        from seq2seq_diff.exported import aot_decoding

        return aot_decoding(model, quantize)  # a copy
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------
# The translator


ProgressHook = Callable[[int, int], None]  # (units done, output tokens) after each batch


class Translator:
    """A model and its tokenizer, ready to translate lists of sentences and documents.

    Args:
        model: The trained model.
        tokenizer: Its SentencePiece tokenizer.
        beam_size: Beam width; 1 uses greedy search.
        length_penalty: GNMT alpha of beam search (see ``search.py``).
        max_tokens: Source tokens per batch, padding included.
        max_sentence_tokens: Longer sentences are cut into chunks of at most this many pieces.
        max_len_a: Output length cap slope, per source token.
        max_len_b: Output length cap intercept.
        n_best: Hypotheses kept per unit (``translate_nbest``).
        lang: Source language code for sentence splitting (sentencex).
        context: Previous sentences of the paragraph given to a document-context model before
            each unit, each closed by eos, as in its training (``data.context``); 0 = none.
        device: Where the model runs.
        quantize: "none" (float32), "int8" (dynamic int8 linear layers, CPU) or "bf16" (bf16
            weights under autocast; CPUs with AVX512-BF16/AMX, GPUs): ``seq2seq_diff.quantize``.
        pack: Whether a float32 or bf16 model on the CPU runs with its linear weights packed
            into oneDNN's blocked layout (``seq2seq_diff.packed``: the same function, 1.1-1.4×
            faster decoding on AMD EPYC, slower on Intel Xeon in float32; bf16 1.04-1.25× on
            AMD EPYC); None (default): where it pays on this CPU (``packed.packing_pays``).
            False keeps torch's default GEMM, on weights stored input-major
            (``inference_model``). True with ``compile``, ``aot`` or int8 is a
            ``ConfigError``.
        compile: Run the decoding steps through ``torch.compile`` (``seq2seq_diff.compiled``:
            float32 or bf16, not int8; torch's GEMM on input-major weights, unpacked): tens of
            seconds to compile once per search kind, then faster steps; for long inputs.
        aot: Run the searches through graphs compiled ahead of time by AOTInductor
            (``seq2seq_diff.exported``: float32 or bf16, CPU): built on first use, tens of
            seconds a graph, and kept in a cache directory for every later run of the same
            model; then faster than ``compile``, with no compile time per process.
    """

    def __init__(
        self,
        model: Seq2SeqTransformer,
        tokenizer: Tokenizer,
        beam_size: int = 5,
        length_penalty: float = 1.0,
        max_tokens: int = 4096,
        max_sentence_tokens: int = DEFAULT_MAX_TOKENS,
        max_len_a: float = 1.2,
        max_len_b: int = 10,
        n_best: int = 1,
        lang: str = "en",
        context: int = 0,
        device: str | torch.device = "cpu",
        quantize: str = "none",
        pack: bool | None = None,
        compile: bool = False,
        aot: bool = False,
    ):
        if beam_size < 1:
            raise ConfigError(f"beam_size must be >= 1, got {beam_size}")
        if not 1 <= n_best <= beam_size:
            raise ConfigError(f"n_best must be between 1 and beam_size ({beam_size}), got "
                              f"{n_best}; raise --beam-size")
        if max_tokens < 1 or max_sentence_tokens < 1:
            raise ConfigError("max_tokens and max_sentence_tokens must be >= 1, got "
                              f"{max_tokens} and {max_sentence_tokens}")
        if context < 0:
            raise ConfigError(f"context must be >= 0 sentences, got {context}")
        if model.config.vocab_size != tokenizer.vocab_size:
            raise ConfigError(f"model vocabulary ({model.config.vocab_size}) and tokenizer "
                              f"({tokenizer.vocab_size}) differ: use the spm.model it was "
                              "trained with")
        self.device = torch.device(device)
        self.quantize = quantize
        self.model = inference_model(model, self.device, quantize, pack, compile, aot)
        self.tokenizer = tokenizer
        self.beam_size = beam_size
        self.length_penalty = length_penalty
        self.max_tokens = max_tokens
        self.max_sentence_tokens = max_sentence_tokens
        self.max_len_a = max_len_a
        self.max_len_b = max_len_b
        self.n_best = n_best
        self.lang = lang
        self.context = context
        self._ids: dict[str, list[int]] = {}

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, device: str | torch.device = "cpu",
                        **options: Any) -> Translator:
        """Load a model directory (``model_dir.load_model_dir``) and wrap it.

        ``lang`` and ``context`` default to the directory's training config (``src_lang``,
        ``context``), if it has them.
        """
        from seq2seq_diff.model_dir import load_model_dir

        model, tokenizer = load_model_dir(model_dir, device=device)
        for option, key, kind in (("lang", "src_lang", str), ("context", "context", int)):
            if options.get(option) is None:
                options.pop(option, None)
                value = _training_setting(Path(model_dir), key, kind)
                if value is not None:
                    options[option] = value
        return cls(model, tokenizer, device=device, **options)

    # -- public API ---------------------------------------------------------------------------

    def translate(self, texts: Sequence[str], stats: TranslationStats | None = None) -> list[str]:
        """Translate segments, one output per input, in input order.

        Empty and whitespace-only inputs give "" without reaching the model; a segment longer than
        ``max_sentence_tokens`` is split into sentences and chunks whose translations are joined.

        Args:
            texts: The segments (line breaks inside one are read as spaces).
            stats: Counts are added to it when given.
        """
        if isinstance(texts, str):
            raise TypeError("translate takes a list of strings; use translate_document for text")
        doc = self._segment_lines(texts, stats)
        return doc.reassemble_lines(self._translate_units(doc, stats))

    def translate_nbest(self, texts: Sequence[str],
                        stats: TranslationStats | None = None) -> list[list[tuple[str, float]]]:
        """Up to ``n_best`` ``(translation, score)`` per segment, best first.

        A segment cut into several units gets, as its k-th entry, the k-th hypothesis of each unit
        joined (the last one where a unit has fewer), scored by the mean of their scores. Blank
        segments give ``[("", 0.0)]``.
        """
        doc = self._segment_lines(texts, stats)
        hyps = self._search_units([u.text for u in doc.units], stats)
        depth = max((len(h) for h in hyps), default=1)
        # The k-th rebuilt document takes every unit's k-th (or last) hypothesis.
        rebuilt = [doc.reassemble_lines([h[min(k, len(h) - 1)][0] for h in hyps])
                   for k in range(depth)]
        out: list[list[tuple[str, float]]] = []
        for line, layout in enumerate(doc.lines):
            units = hyps[layout.first_unit : layout.first_unit + layout.num_units]
            if not units:
                out.append([("", 0.0)])
                continue
            entries = []
            for k in range(max(len(h) for h in units)):
                score = sum(h[min(k, len(h) - 1)][1] for h in units) / len(units)
                entries.append((rebuilt[k][line], score))
            out.append(entries)
        return out

    def translate_document(self, text: str, stats: TranslationStats | None = None) -> str:
        """Translate a whole document, keeping paragraphs, blank lines and the final newline.

        Args:
            text: The document; ``\\r\\n`` reads as ``\\n``.
            stats: Counts are added to it when given.
        """
        doc = segment_document(text, self.lang, self.max_sentence_tokens, self.count_tokens)
        if stats is not None:
            stats.add_segments(doc.summary)
        return doc.reassemble(self._translate_units(doc, stats))

    def count_tokens(self, text: str) -> int:
        """SentencePiece pieces in ``text`` (memoised until the units are translated)."""
        ids = self._ids.get(text)
        if ids is None:
            ids = self.tokenizer.encode([text])[0]
            self._ids[text] = ids
        return len(ids)

    # -- internals ----------------------------------------------------------------------------

    def _segment_lines(self, texts: Sequence[str], stats: TranslationStats | None):
        doc = segment_lines(texts, self.lang, self.max_sentence_tokens, self.count_tokens)
        if stats is not None:
            stats.add_segments(doc.summary, paragraphs=False)
        return doc

    def _translate_units(self, doc: SegmentedDocument, stats: TranslationStats | None,
                         progress: ProgressHook | None = None) -> list[str]:
        contexts = None
        if self.context:
            contexts = [doc.context_sentences(i, self.context) for i in range(len(doc.units))]
        hyps = self._search_units([u.text for u in doc.units], stats, progress, contexts)
        return [h[0][0] for h in hyps]

    def _encode(self, texts: Sequence[str],
                contexts: Sequence[Sequence[str]] | None = None) -> list[list[int]]:
        """Ids of each text plus eos, after its context sentences each closed by eos.

        Reuses the ids counted during segmentation.
        """
        wanted = [*texts, *(c for sentences in contexts or () for c in sentences)]
        missing = [t for t in dict.fromkeys(wanted) if t not in self._ids]
        if missing:
            self._ids.update(zip(missing, self.tokenizer.encode(missing), strict=True))
        eos = self.tokenizer.eos_id
        out = []
        for n, text in enumerate(texts):
            ids = [i for c in (contexts[n] if contexts else ()) for i in (*self._ids[c], eos)]
            out.append([*ids, *self._ids[text], eos])
        self._ids.clear()  # memo lives for one call: memory stays flat on long streams
        return out

    def _search_units(
        self,
        texts: Sequence[str],
        stats: TranslationStats | None = None,
        progress: ProgressHook | None = None,
        contexts: Sequence[Sequence[str]] | None = None,
    ) -> list[list[tuple[str, float]]]:
        """Search every unit; returns up to ``n_best`` (text, score) per unit, input order."""
        ids = self._encode(texts, contexts)
        results: list[list[tuple[str, float]] | None] = [None] * len(ids)
        for batch in make_batches([len(x) for x in ids], self.max_tokens):
            rows = [ids[i] for i in batch]
            src = torch.full((len(rows), max(map(len, rows))), self.tokenizer.pad_id,
                             dtype=torch.long)
            for r, row in enumerate(rows):
                src[r, : len(row)] = torch.tensor(row)
            src = src.to(self.device)
            src_mask = src != self.tokenizer.pad_id
            hyps = self._search(src, src_mask)
            caps = max_lengths(src_mask, self.max_len_a, self.max_len_b).tolist()
            texts_out = self.tokenizer.decode([tokens for unit in hyps for tokens, _ in unit])
            position = 0
            for i, unit, cap, row in zip(batch, hyps, caps, rows, strict=True):
                results[i] = [(texts_out[position + k], score)
                              for k, (_, score) in enumerate(unit)]
                position += len(unit)
                if stats is not None:
                    stats.source_tokens += len(row)
                    stats.output_tokens += len(unit[0][0])
                    stats.length_capped += len(unit[0][0]) >= cap
            if progress is not None:
                progress(len(batch), sum(len(hyps[r][0][0]) for r in range(len(batch))))
        return results  # type: ignore[return-value]

    def _search(self, src: torch.Tensor, src_mask: torch.Tensor) -> list[list[tuple[list[int],
                                                                                       float]]]:
        from seq2seq_diff.quantize import precision_context

        with precision_context(self.quantize, self.device):
            if self.beam_size == 1:
                tokens = greedy_search(self.model, src, src_mask, self.max_len_a, self.max_len_b)
                return [[(t, 0.0)] for t in tokens]
            results = beam_search(self.model, src, src_mask, self.beam_size,
                                  self.length_penalty, self.max_len_a, self.max_len_b,
                                  n_best=self.n_best)
        return [[(h.tokens, h.score) for h in hyps] for hyps in results]


def _training_setting(model_dir: Path, key: str, kind: type) -> Any | None:
    """The value of ``key`` in a model directory's training config, wherever it is nested."""
    path = model_dir / "training_config.yaml"
    if not path.is_file():
        return None
    try:
        import yaml

        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except Exception:  # an unreadable optional file is not worth failing for
        return None
    stack = [config]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if isinstance(node.get(key), kind):
                return node[key]
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return None
