"""File translation and the command line: streaming windows, resumable, bad input, CLI.

A tiny SentencePiece model (trained on a few hundred lines of the bundled corpus) and an
untrained tiny model: outputs are gibberish, but one output line per input line, blank lines,
paragraphs and byte-identical resumption must hold.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from seq2seq_diff.errors import ConfigError, DataError
from seq2seq_diff.translate import TranslationInterrupted, cli_main, progress_path, translate_file
from seq2seq_diff.translator import Translator

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_translator(model, tokenizer, **options) -> Translator:
    options = {"beam_size": 1, "max_len_a": 1.0, "max_len_b": 5, **options}
    return Translator(model, tokenizer, **options)


# --- files: streaming, resume, bad input ---------------------------------------------------

def write_input(path: Path, english: list[str]) -> list[str]:
    lines = []
    for i, sentence in enumerate(english[:60]):
        lines.append(sentence)
        if i % 7 == 3:
            lines.append("")
        if i % 11 == 5:
            lines.append("  ")
    lines[20] = " and ".join(s.rstrip(".") for s in english[100:160]) + "."  # chunked
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return lines


@pytest.mark.parametrize("mode", ["line", "document"])
def test_translate_file_streams_in_windows(tmp_path, model, tokenizer, english, mode):
    src = tmp_path / "in.txt"
    lines = write_input(src, english)
    translator = make_translator(model, tokenizer, max_sentence_tokens=30)
    whole = tmp_path / "whole.txt"
    windowed = tmp_path / "windowed.txt"
    stats = translate_file(translator, src, whole, mode, window_lines=100_000)
    stats_w = translate_file(translator, src, windowed, mode, window_lines=4)
    assert windowed.read_bytes() == whole.read_bytes()  # windows change nothing
    assert not progress_path(windowed).exists()  # removed once complete
    out = windowed.read_text(encoding="utf-8").split("\n")
    assert out[-1] == "" and len(out) - 1 == len(lines)
    assert [not o for o in out[:-1]] == [not line.strip() for line in lines]
    assert stats_w.lines == stats.lines == len(lines)
    assert stats_w.sentences == stats.sentences and stats_w.units == stats.units
    assert stats.chunked_sentences >= 1 and "chunked" in str(stats)


def test_empty_input_gives_empty_output(tmp_path, model, tokenizer):
    src = tmp_path / "empty.txt"
    src.write_bytes(b"")
    for mode in ("line", "document"):
        out = tmp_path / f"out-{mode}.txt"
        stats = translate_file(make_translator(model, tokenizer), src, out, mode)
        assert out.read_bytes() == b"" and stats.lines == 0


@pytest.mark.parametrize("mode", ["line", "document"])
def test_resume_after_interrupt_is_byte_identical(tmp_path, model, tokenizer, english,
                                                  monkeypatch, mode):
    src = tmp_path / "in.txt"
    write_input(src, english)
    translator = make_translator(model, tokenizer, max_sentence_tokens=30)
    reference = tmp_path / "reference.txt"
    translate_file(translator, src, reference, mode, window_lines=5)

    out = tmp_path / "out.txt"
    original = Translator._translate_units
    calls = []

    def interrupt_on_third(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Translator, "_translate_units", interrupt_on_third)
    with pytest.raises(TranslationInterrupted) as stop:
        translate_file(translator, src, out, mode, window_lines=5)
    assert stop.value.resumable and stop.value.lines_done >= 10
    state = json.loads(progress_path(out).read_text())
    assert state["lines_done"] == stop.value.lines_done
    assert state["output_bytes"] == out.stat().st_size
    monkeypatch.setattr(Translator, "_translate_units", original)

    with open(out, "ab") as f:  # a torn write after the last recorded window
        f.write(b"partial garbage")
    stats = translate_file(translator, src, out, mode, resume=True, window_lines=5)
    assert out.read_bytes() == reference.read_bytes()
    assert not progress_path(out).exists()
    assert stats.lines == len(src.read_text().split("\n")) - 1  # counts span both runs


def test_resume_checks(tmp_path, model, tokenizer, english):
    src = tmp_path / "in.txt"
    write_input(src, english)
    translator = make_translator(model, tokenizer)
    out = tmp_path / "out.txt"
    translate_file(translator, src, out, resume=True)  # nothing there yet: starts fresh
    with pytest.raises(DataError, match="nothing to resume"):
        translate_file(translator, src, out, resume=True)  # complete: no sidecar
    progress_path(out).write_text(json.dumps({"lines_done": 3, "output_bytes": 10,
                                              "settings": {"mode": "line"}}))
    with pytest.raises(ConfigError, match="other options"):
        translate_file(translator, src, out, resume=True)
    with pytest.raises(ConfigError, match="stdout"):
        translate_file(translator, src, "-", resume=True)
    with pytest.raises(ConfigError, match="differ"):
        translate_file(translator, src, src)


def test_invalid_utf8_names_file_and_line(tmp_path, model, tokenizer):
    src = tmp_path / "bad.txt"
    src.write_bytes(b"Hello there.\nA second line.\nBroken \xff\xfe here.\nFine.\n")
    translator = make_translator(model, tokenizer)
    with pytest.raises(DataError) as error:
        translate_file(translator, src, tmp_path / "out.txt")
    assert error.value.line == 3 and error.value.path == str(src) and "--errors replace" in str(
        error.value)
    stats = translate_file(translator, src, tmp_path / "out2.txt", errors="replace")
    assert stats.invalid_utf8_lines == 1
    assert len((tmp_path / "out2.txt").read_text().split("\n")) == 5


def test_crlf_and_bom_accepted(tmp_path, model, tokenizer, english):
    plain, windows = tmp_path / "plain.txt", tmp_path / "windows.txt"
    plain.write_bytes(("\n".join([english[0], "", english[1]]) + "\n").encode())
    windows.write_bytes(b"\xef\xbb\xbf" + ("\r\n".join([english[0], "", english[1]])
                                          + "\r\n").encode())
    translator = make_translator(model, tokenizer)
    for mode in ("line", "document"):
        translate_file(translator, plain, tmp_path / "a.txt", mode)
        stats = translate_file(translator, windows, tmp_path / "b.txt", mode)
        assert (tmp_path / "a.txt").read_bytes() == (tmp_path / "b.txt").read_bytes()
        assert stats.bom and stats.crlf_normalised == 3 and "BOM" in str(stats)


# --- the command line -----------------------------------------------------------------------

def test_cli_files_and_summary(tmp_path, model_dir, english, capsys):
    src = tmp_path / "in.txt"
    lines = write_input(src, english)
    out = tmp_path / "out.txt"
    argv = ["--model", str(model_dir), "--input", str(src), "--output", str(out),
            "--beam-size", "2", "--max-len-b", "5", "--max-len-a", "1"]
    assert cli_main(argv) == 0
    assert len(out.read_text().split("\n")) - 1 == len(lines)
    summary = capsys.readouterr().err.strip().splitlines()
    assert len(summary) == 1 and summary[0].startswith(f"translated {len(lines)} lines")
    assert cli_main([*argv, "--mode", "document", "--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_cli_stdin_to_stdout_and_nbest(tmp_path, model_dir, english, monkeypatch):
    data = ("\n".join([english[0], "", english[1]]) + "\n").encode()

    def run(*extra):
        stdout = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))
        monkeypatch.setattr(sys, "stdout", stdout)
        assert cli_main(["--model", str(model_dir), "--beam-size", "3", "--max-len-b", "4",
                         "--quiet", *extra]) == 0
        return stdout.buffer.getvalue().decode()

    lines = run().split("\n")
    assert len(lines) == 4 and lines[1] == "" and lines[0] and lines[2]
    nbest = run("--n-best", "3").splitlines()
    assert [line.split(" ||| ")[0] for line in nbest] == ["0", "0", "0", "1", "2", "2", "2"]
    scores = [float(line.split(" ||| ")[2]) for line in nbest if line.startswith("0 ")]
    assert scores == sorted(scores, reverse=True)


def test_cli_ctrl_c_then_resume_is_byte_identical(tmp_path, model_dir, english):
    """A real SIGINT to a running `python cli.py translate`, then --resume."""
    src = tmp_path / "in.txt"
    src.write_text("\n".join(english * 2) + "\n", encoding="utf-8")
    out, reference = tmp_path / "out.txt", tmp_path / "reference.txt"
    argv = ["--model", str(model_dir), "--input", str(src), "--beam-size", "1",
            "--max-len-b", "5", "--max-len-a", "1", "--window-lines", "10", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    # A suite started in the background (`cmd &` in a script) inherits SIGINT ignored, and
    # Python then installs no KeyboardInterrupt handler: the child gets SIGINT's default back.
    proc = subprocess.Popen([sys.executable, str(REPO / "cli.py"), "translate", *argv,
                             "--output", str(out)], env=env, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    sidecar = progress_path(out)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if sidecar.exists() and json.loads(sidecar.read_text() or "{}").get("lines_done", 0):
            break
        time.sleep(0.05)
    if proc.poll() is not None:
        pytest.fail(f"finished before it could be interrupted: {proc.communicate()[1]}")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "--resume" in err and len(err.strip().splitlines()) == 1
    assert cli_main([*argv, "--output", str(out), "--resume"]) == 0
    assert cli_main([*argv, "--output", str(reference)]) == 0
    assert out.read_bytes() == reference.read_bytes()
