"""Scores must be sacreBLEU's, to the digit: API, command line, signatures, documents, bootstrap."""

import importlib.util
import json
import random
import subprocess
import sys
import types
from pathlib import Path

import pytest
import sacrebleu
from sacrebleu.metrics import BLEU, CHRF, TER

from seq2seq_diff.errors import ConfigError, DataError
from seq2seq_diff.evaluate import cli_main, read_docids, read_lines, score

DATA = Path("/work/shared/data/en-ro/test")
NUM_LINES = 300

pytestmark = pytest.mark.skipif(
    not (DATA / "newstest2016.ro").exists(), reason="shared newstest2016 data not present"
)


def perturb(lines: list[str], seed: int = 0, empty_line: bool = True) -> list[str]:
    """A plausible 'system output': dropped, swapped, replaced and lowercased words, one empty."""
    rng = random.Random(seed)
    out = []
    for i, line in enumerate(lines):
        words = line.split()
        if i % 2 == 0 and len(words) > 3:
            del words[rng.randrange(len(words))]
        if i % 3 == 0 and len(words) > 3:
            j = rng.randrange(len(words) - 1)
            words[j], words[j + 1] = words[j + 1], words[j]
        if i % 4 == 0 and words:
            words[rng.randrange(len(words))] = "și"
        text = " ".join(words)
        out.append(text.lower() if i % 7 == 0 else text)
    if empty_line:
        out[10] = ""
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Reference, hypothesis and docids: the first NUM_LINES lines of newstest2016."""
    root = tmp_path_factory.mktemp("eval")
    ref = (DATA / "newstest2016.ro").read_text(encoding="utf-8").splitlines()[:NUM_LINES]
    docids = (DATA / "newstest2016.docids").read_text(encoding="utf-8").splitlines()[:NUM_LINES]
    hyp = perturb(ref)
    paths = {"ref": root / "ref.ro", "hyp": root / "hyp.ro", "docids": root / "test.docids"}
    paths["ref"].write_text("\n".join(ref) + "\n", encoding="utf-8")
    paths["hyp"].write_text("\n".join(hyp) + "\n", encoding="utf-8")
    paths["docids"].write_text("\n".join(docids) + "\n", encoding="utf-8")
    return {"paths": paths, "ref": ref, "hyp": hyp, "docids": [d.split("\t")[0] for d in docids]}


def run_cli(argv, capsys) -> str:
    assert cli_main([str(a) for a in argv]) == 0
    return capsys.readouterr().out


def test_score_equals_sacrebleu_api(files):
    result = score(files["hyp"], files["ref"])
    for name, metric in [("bleu", BLEU()), ("chrf", CHRF()), ("ter", TER())]:
        expected = metric.corpus_score(files["hyp"], [files["ref"]])
        assert result[name].score == expected.score
        assert result[name].name == expected.name
        assert result[name].signature == str(metric.get_signature())
    assert result["bleu"].score == sacrebleu.corpus_bleu(files["hyp"], [files["ref"]]).score
    assert 20 < result["bleu"].score < 90  # a perturbation, not a copy
    assert result.num_segments == NUM_LINES and result.num_refs == 1


def test_cli_equals_sacrebleu_command_line(files, capsys):
    paths = files["paths"]
    command = [sys.executable, "-m", "sacrebleu", str(paths["ref"]), "-i", str(paths["hyp"])]
    command += ["-m", "bleu", "chrf", "ter", "-w", "4", "-f", "json", "-q"]
    theirs = json.loads(subprocess.run(command, capture_output=True, check=True, text=True).stdout)
    ours = json.loads(run_cli(["--hyp", paths["hyp"], "--ref", paths["ref"], "--json"], capsys))
    ours_by_name = {item["name"]: item for item in ours["scores"]}
    assert sorted(ours_by_name) == sorted(item["name"] for item in theirs)
    for item in theirs:
        assert round(ours_by_name[item["name"]]["score"], 4) == item["score"]
        assert ours_by_name[item["name"]]["signature"] == item["signature"]

    text = run_cli(["--hyp", paths["hyp"], "--ref", paths["ref"]], capsys)
    lines = text.splitlines()
    assert [line.split(" = ")[0] for line in lines] == ["BLEU", "chrF2", "TER"]
    bleu = next(item for item in theirs if item["name"] == "BLEU")
    assert lines[0] == f"BLEU = {bleu['score']:.2f} {bleu['signature']}"
    assert lines[0].endswith(
        f"nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:{sacrebleu.__version__}"
    )


def test_bootstrap_is_sacrebleus_and_matches_its_command_line(files, capsys):
    paths = files["paths"]
    result = score(files["hyp"], files["ref"], metrics=["bleu"], bootstrap=200)
    metric = BLEU()
    expected = metric.corpus_score(files["hyp"], [files["ref"]], n_bootstrap=200)
    assert (result["bleu"].bootstrap_mean, result["bleu"].bootstrap_ci) == pytest.approx(
        (expected._mean, expected._ci), abs=0
    )
    assert result["bleu"].signature == str(metric.get_signature())
    assert "bs:200|seed:12345" in result["bleu"].signature
    again = score(files["hyp"], files["ref"], metrics=["bleu"], bootstrap=200)
    assert again["bleu"].bootstrap_ci == result["bleu"].bootstrap_ci  # fixed seed

    command = [sys.executable, "-m", "sacrebleu", str(paths["ref"]), "-i", str(paths["hyp"])]
    command += ["-m", "bleu", "--confidence", "-cin", "200", "-w", "4", "-f", "json", "-q"]
    theirs = json.loads(subprocess.run(command, capture_output=True, check=True, text=True).stdout)
    assert round(result["bleu"].bootstrap_mean, 4) == theirs["confidence_mean"]
    assert round(result["bleu"].bootstrap_ci, 4) == theirs["confidence_var"]
    assert result["bleu"].signature == theirs["signature"]
    line = run_cli(
        ["--hyp", paths["hyp"], "--ref", paths["ref"], "--metrics", "bleu", "--bootstrap", 200],
        capsys,
    )
    assert f"(μ = {result['bleu'].bootstrap_mean:.2f} ± {result['bleu'].bootstrap_ci:.2f})" in line


def test_per_document_scores_equal_sacrebleu_on_each_document(files, capsys):
    result = score(files["hyp"], files["ref"], docids=files["docids"])
    first_seen = list(dict.fromkeys(files["docids"]))
    assert list(result.document_sizes) == first_seen
    assert len(first_seen) > 5
    for docid in first_seen:
        idx = [i for i, d in enumerate(files["docids"]) if d == docid]
        hyps = [files["hyp"][i] for i in idx]
        refs = [[files["ref"][i] for i in idx]]
        assert result.document_sizes[docid] == len(idx)
        for name, metric in [("bleu", BLEU()), ("chrf", CHRF()), ("ter", TER())]:
            assert result[name].documents[docid] == metric.corpus_score(hyps, refs).score
    assert read_docids(files["paths"]["docids"]) == files["docids"]

    paths = files["paths"]
    argv = ["--hyp", paths["hyp"], "--ref", paths["ref"], "--docids", paths["docids"]]
    text = run_cli(argv + ["--metrics", "bleu"], capsys)
    table = text.splitlines()[2:]
    assert table[0].split() == ["document", "segs", "BLEU"]
    assert [row.split()[0] for row in table[1:]] == first_seen
    assert float(table[1].split()[2]) == round(result["bleu"].documents[first_seen[0]], 2)


def test_per_document_scores_on_the_whole_test_set():
    ref = (DATA / "newstest2016.ro").read_text(encoding="utf-8").splitlines()
    docids = read_docids(DATA / "newstest2016.docids")
    hyp = perturb(ref, seed=1)
    result = score(hyp, ref, metrics=["bleu"], docids=docids)
    assert len(result.document_sizes) == 93
    for docid in list(result.document_sizes)[::10]:
        idx = [i for i, d in enumerate(docids) if d == docid]
        expected = BLEU().corpus_score([hyp[i] for i in idx], [[ref[i] for i in idx]]).score
        assert result["bleu"].documents[docid] == expected


def test_options_reach_sacrebleu(files):
    hyp, ref = files["hyp"], files["ref"]
    second = perturb(ref, seed=2, empty_line=False)
    result = score(hyp, [ref, second], tokenize="intl", lowercase=True)
    bleu, chrf = BLEU(tokenize="intl", lowercase=True), CHRF(lowercase=True)
    assert result["bleu"].score == bleu.corpus_score(hyp, [ref, second]).score
    assert result["chrf"].score == chrf.corpus_score(hyp, [ref, second]).score
    assert result["ter"].score == TER().corpus_score(hyp, [ref, second]).score
    assert result["bleu"].signature == str(bleu.get_signature())
    assert "nrefs:2|case:lc|eff:no|tok:intl" in result["bleu"].signature
    assert [s.metric for s in score(hyp, ref, metrics=["ter", "bleu"]).scores] == ["ter", "bleu"]


def test_cli_with_two_references_and_output_file(files, tmp_path, capsys):
    paths = files["paths"]
    second = tmp_path / "ref2.ro"
    second.write_text(
        "\n".join(perturb(files["ref"], seed=3, empty_line=False)) + "\n", encoding="utf-8"
    )
    out = tmp_path / "reports" / "scores.json"
    argv = ["--hyp", paths["hyp"], "--ref", paths["ref"], "--ref", second, "--metrics", "chrf"]
    assert run_cli(argv + ["--json", "--output", out], capsys) == ""
    report = json.loads(out.read_text(encoding="utf-8"))
    expected = CHRF().corpus_score(
        files["hyp"], [files["ref"], perturb(files["ref"], seed=3, empty_line=False)]
    )
    assert report["scores"][0]["score"] == expected.score
    assert report["num_refs"] == 2 and report["ref"] == [str(paths["ref"]), str(second)]


def test_bom_crlf_and_empty_hypothesis_lines(files, tmp_path):
    hyp = tmp_path / "hyp.txt"
    hyp.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(files["hyp"]).encode("utf-8") + b"\r\n")
    lines = read_lines(hyp)
    assert lines == files["hyp"] and lines[10] == ""
    assert read_lines(tmp_path / "hyp.txt") == read_lines(files["paths"]["hyp"])
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert read_lines(empty) == []


def test_missing_file_names_it(files, tmp_path):
    missing = tmp_path / "nope.ro"
    with pytest.raises(DataError, match="nope.ro: hypothesis file not found") as info:
        cli_main(["--hyp", str(missing), "--ref", str(files["paths"]["ref"])])
    assert info.value.path == str(missing)
    with pytest.raises(DataError, match="nope.ro: reference file not found"):
        cli_main(["--hyp", str(files["paths"]["hyp"]), "--ref", str(missing)])


def test_line_count_mismatch_states_both_counts_and_paths(files, tmp_path):
    short = tmp_path / "short.ro"
    short.write_text("\n".join(files["ref"][:-1]) + "\n", encoding="utf-8")
    hyp = str(files["paths"]["hyp"])
    with pytest.raises(DataError) as info:
        cli_main(["--hyp", hyp, "--ref", str(short)])
    message = str(info.value)
    assert str(short) in message and hyp in message
    assert f"{NUM_LINES - 1} lines" in message and f"has {NUM_LINES}" in message


def test_empty_reference_is_an_error(files, tmp_path):
    empty = tmp_path / "empty.ro"
    empty.write_text("")
    hyp = str(files["paths"]["hyp"])
    with pytest.raises(DataError, match="empty.ro: reference file is empty"):
        cli_main(["--hyp", hyp, "--ref", str(empty)])
    holes = tmp_path / "holes.ro"
    ref = list(files["ref"])
    ref[4] = ref[9] = "  "
    holes.write_text("\n".join(ref) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"holes.ro:5: empty reference line \(2 in all\)"):
        cli_main(["--hyp", hyp, "--ref", str(holes)])


def test_invalid_utf8_gives_the_line(tmp_path):
    bad = tmp_path / "bad.ro"
    bad.write_bytes("ok\nșă\n".encode() + b"caf\xe9\n")
    with pytest.raises(DataError, match=r"bad.ro:3: invalid UTF-8") as info:
        read_lines(bad)
    assert info.value.line == 3


def test_bad_options_are_config_or_data_errors(files, tmp_path):
    paths = files["paths"]
    hyp, ref = str(paths["hyp"]), str(paths["ref"])
    with pytest.raises(ConfigError, match="unknown metric 'meteor'"):
        score(files["hyp"], files["ref"], metrics=["meteor"])
    with pytest.raises(ConfigError, match="bootstrap"):
        score(files["hyp"], files["ref"], bootstrap=1)
    with pytest.raises(DataError, match="no hypotheses"):
        score([], [])
    with pytest.raises(DataError, match="299 segments but there are 300"):
        score(files["hyp"], files["ref"][:-1])
    with pytest.raises(ConfigError, match="--model needs --src"):
        cli_main(["--model", str(tmp_path), "--ref", ref])
    with pytest.raises(ConfigError, match="--src is only used with --model"):
        cli_main(["--hyp", hyp, "--ref", ref, "--src", hyp])
    few = tmp_path / "few.docids"
    few.write_text("a\nb\n")
    with pytest.raises(DataError, match="few.docids: 2 document ids"):
        cli_main(["--hyp", hyp, "--ref", ref, "--docids", str(few)])
    with pytest.raises(SystemExit):  # argparse: usage message, exit status 2
        cli_main(["--ref", ref])


class FakeTranslator:
    """Stands in for seq2seq_diff.translator.Translator: 'translates' by looking up references."""

    table: dict[str, str] = {}
    loaded_from: list[str] = []

    @classmethod
    def from_pretrained(cls, path):
        cls.loaded_from.append(path)
        return cls()

    def translate(self, lines):
        return [self.table[line] for line in lines]


def test_model_path_translates_then_scores(files, tmp_path, monkeypatch, capsys):
    src = (DATA / "newstest2016.en").read_text(encoding="utf-8").splitlines()[:NUM_LINES]
    src_path = tmp_path / "src.en"
    src_path.write_text("\n".join(src) + "\n", encoding="utf-8")
    FakeTranslator.table = dict(zip(src, files["hyp"], strict=True))
    fake = types.ModuleType("seq2seq_diff.translator")
    fake.Translator = FakeTranslator
    monkeypatch.setitem(sys.modules, "seq2seq_diff.translator", fake)
    argv = ["--model", tmp_path, "--src", src_path, "--ref", files["paths"]["ref"], "--json"]
    argv += ["--metrics", "bleu"]
    report = json.loads(run_cli(argv, capsys))
    assert FakeTranslator.loaded_from[-1] == str(tmp_path)
    assert report["scores"][0]["score"] == BLEU().corpus_score(files["hyp"], [files["ref"]]).score


@pytest.mark.skipif(
    importlib.util.find_spec("seq2seq_diff.translator") is None,
    reason="seq2seq_diff.translator not written yet",
)
def test_real_translate_module_has_the_interface_evaluate_calls():
    from seq2seq_diff.translator import Translator

    assert callable(Translator.from_pretrained)
    assert callable(Translator.translate)
