"""The bad-input matrix (docs/BAD_INPUT.md): each input kind through each entry point gives a
correct result (one output line per input line, blank in, blank out) or one clear error line
naming the file (and line), exit status 2, no traceback."""

from __future__ import annotations

import pytest

from seq2seq_diff.cli import main
from seq2seq_diff.translator import Translator

pytestmark = pytest.mark.usefixtures("one_thread")

LONG = ("The layer is hidden, and the brush is soft; " * 250)[:10_000]
# kind -> (file bytes, expected output lines or None for an error, words of the error)
CELLS = {
    "empty file": (b"", 0, None),
    "only blank lines": (b"\n   \n\t\n", 3, None),
    "blank lines interleaved": (b"Open the file.\n\nSave it.\n   \nClose it.\n", 5, None),
    "10,000-character line": (LONG.encode() + b"\n", 1, None),
    "punctuation and emoji only": ("!!! ...\n🙂🙂 🎨\n—\n".encode(), 3, None),
    "invalid UTF-8": (b"Open the file.\nSave \xff it.\n", None, ":2"),
    "CRLF line endings": (b"Open the file.\r\n\r\nSave it.\r\n", 3, None),
    "UTF-8 BOM": ("\ufeffOpen the file.\nSave it.\n".encode(), 2, None),
}


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: "), err
    assert not any("Traceback" in line for line in err), err
    return err[-1]


@pytest.mark.parametrize("kind", list(CELLS))
def test_translate_cli(kind, tmp_path, model_dir, capsys):
    data, expected, error = CELLS[kind]
    src = tmp_path / "in.en"
    src.write_bytes(data)
    out = tmp_path / "out.ro"
    rc = main(["translate", "--model", str(model_dir), "--input", str(src), "--output", str(out),
               "--beam-size", "1", "--max-len-b", "4", "--quiet"])
    if error:
        assert rc == 2
        assert str(src) + error in _one_error_line(capsys)
        return
    assert rc == 0
    lines = out.read_text(encoding="utf-8").split("\n")
    assert lines[-1] == ""  # every line ends with \n
    lines = lines[:-1]
    assert len(lines) == expected
    sources = data.decode("utf-8-sig").replace("\r\n", "\n").split("\n")[:expected]
    for source, target in zip(sources, lines, strict=True):
        assert (target == "") == (source.strip() == "")
        assert "\ufeff" not in target


def test_translate_cli_missing_and_unreadable_file(tmp_path, model_dir, capsys):
    missing = tmp_path / "nope.en"
    assert main(["translate", "--model", str(model_dir), "--input", str(missing)]) == 2
    assert "nope.en" in _one_error_line(capsys)
    folder = tmp_path / "folder.en"
    folder.mkdir()
    assert main(["translate", "--model", str(model_dir), "--input", str(folder)]) == 2
    assert "folder.en" in _one_error_line(capsys)


@pytest.mark.parametrize("kind", [k for k, cell in CELLS.items() if cell[2] is None])
def test_python_api(kind, model, tokenizer):
    data, expected, _ = CELLS[kind]
    lines = data.decode("utf-8-sig").splitlines()
    out = Translator(model, tokenizer, beam_size=1, max_len_b=4).translate(lines)
    assert len(out) == len(lines) == expected
    assert [o == "" for o in out] == [not s.strip() for s in lines]


@pytest.mark.parametrize("kind", list(CELLS))
def test_evaluate_cli(kind, tmp_path, capsys):
    data, expected, error = CELLS[kind]
    hyp = tmp_path / "hyp.ro"
    hyp.write_bytes(data)
    ref = tmp_path / "ref.ro"
    lines = data.decode("utf-8", errors="replace").lstrip("\ufeff").splitlines()
    ref.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    rc = main(["evaluate", "--hyp", str(hyp), "--ref", str(ref)])
    if error or expected == 0:  # invalid bytes or no segments: the hypothesis file is named
        assert rc == 2
        assert str(hyp) in _one_error_line(capsys)
    elif any(not line.strip() for line in lines):  # a blank reference cannot score a segment
        assert rc == 2
        first = next(i for i, line in enumerate(lines, 1) if not line.strip())
        assert f"{ref}:{first}: empty reference line" in _one_error_line(capsys)
    else:
        assert rc == 0


def test_evaluate_cli_mismatched_and_missing(tmp_path, capsys):
    hyp, ref = tmp_path / "hyp.ro", tmp_path / "ref.ro"
    hyp.write_text("a\nb\nc\n", encoding="utf-8")
    ref.write_text("a\nb\n", encoding="utf-8")
    assert main(["evaluate", "--hyp", str(hyp), "--ref", str(ref)]) == 2
    assert "ref.ro" in _one_error_line(capsys)
    assert main(["evaluate", "--hyp", str(tmp_path / "nope.ro"), "--ref", str(ref)]) == 2
    assert "nope.ro" in _one_error_line(capsys)
