"""Data: every input format gives the same examples, validation errors name file and line,
token batches respect the budget, cover each example once, shard over ranks and resume."""

import json
import logging
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seq2seq_diff import data as D
from seq2seq_diff.errors import ConfigError, DataError
from seq2seq_diff.tokenizer import train_tokenizer

DATA = Path(__file__).resolve().parents[1] / "data" / "en-ro"
N_LINES = 200


def _head(path: Path, n: int = N_LINES) -> list[str]:
    """Every 140th line: the bundled corpus is grouped by origin, this mixes all of them."""
    return path.read_text(encoding="utf-8").splitlines()[::140][:n]


@pytest.fixture(scope="module")
def lines() -> dict[str, list[str]]:
    return {lang: _head(DATA / "train" / f"train.{lang}") for lang in ("en", "ro", "origin")}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, lines) -> Path:
    """A tiny plain-text corpus prefix: corpus.en, corpus.ro, corpus.origin."""
    root = tmp_path_factory.mktemp("corpus")
    for lang, text in lines.items():
        (root / f"corpus.{lang}").write_text("\n".join(text) + "\n", encoding="utf-8")
    return root / "corpus"


@pytest.fixture(scope="module")
def tok(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("spm") / "spm.model"
    return train_tokenizer(lines["en"] + lines["ro"], path, vocab_size=300)


def _pairs(spec, src="en", tgt="ro", fmt="auto", cache=None, origins=None):
    source = D.resolve_source(str(spec), src, tgt, fmt)
    ds = D.load_pairs(source, src, tgt, cache, origins)
    return list(zip(ds["src_text"], ds["tgt_text"], strict=True))


# ----------------------------------------------------------------------------------------------
# Formats


def test_all_formats_give_identical_examples(tmp_path, corpus, lines, tok):
    en, ro = lines["en"], lines["ro"]
    records = [{"en": e, "ro": r} for e, r in zip(en, ro, strict=True)]
    (tmp_path / "flat.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    wmt = [{"translation": r} for r in records]
    (tmp_path / "wmt.jsonl").write_text("\n".join(json.dumps(r) for r in wmt) + "\n")
    (tmp_path / "plain.tsv").write_text("".join(f"{e}\t{r}\n" for e, r in zip(en, ro, strict=True)))
    # A header picks columns by name, whatever their order.
    header = "".join(f"{r}\t{e}\n" for e, r in zip(en, ro, strict=True))
    (tmp_path / "header.tsv").write_text("ro\ten\n" + header)
    flat = datasets.Dataset.from_list(records)
    flat.to_parquet(str(tmp_path / "flat.parquet"))
    flat.save_to_disk(str(tmp_path / "saved"))
    cache = tmp_path / "cache"
    specs = {
        "text prefix": (corpus, "auto"),
        "two paths": (f"{corpus}.en,{corpus}.ro", "auto"),
        "tsv": (tmp_path / "plain.tsv", "auto"),
        "tsv header": (tmp_path / "header.tsv", "auto"),
        "jsonl flat": (tmp_path / "flat.jsonl", "auto"),
        "jsonl wmt16": (tmp_path / "wmt.jsonl", "auto"),
        "load_dataset json": (tmp_path / "wmt.jsonl", "json"),
        "load_dataset parquet": (tmp_path / "flat.parquet", "auto"),
        "load_from_disk": (tmp_path / "saved", "auto"),
    }
    expected = list(zip(en, ro, strict=True))
    tokens = None
    for name, (spec, fmt) in specs.items():
        source = D.resolve_source(str(spec), "en", "ro", fmt)
        pairs = D.load_pairs(source, "en", "ro", cache)
        assert list(zip(pairs["src_text"], pairs["tgt_text"], strict=True)) == expected, name
        ids = D.tokenize_pairs(pairs, tok, cache)
        got = (ids["src_ids"], ids["tgt_ids"])
        tokens = tokens or got
        assert got == tokens, name


def test_direction_swaps(corpus, lines, tmp_path):
    expected = list(zip(lines["ro"], lines["en"], strict=True))
    assert _pairs(corpus, "ro", "en", cache=tmp_path) == expected


def test_crlf_and_bom_are_accepted(tmp_path, lines):
    en, ro = lines["en"][:20], lines["ro"][:20]
    (tmp_path / "w.en").write_bytes(("\ufeff" + "\r\n".join(en) + "\r\n").encode())
    (tmp_path / "w.ro").write_bytes(("\r\n".join(ro)).encode())  # no final newline either
    assert _pairs(tmp_path / "w", cache=tmp_path / "c") == list(zip(en, ro, strict=True))


def test_hub_spec(monkeypatch, tmp_path):
    assert D.parse_hub_spec("hf:wmt16:ro-en:train") == ("wmt16", "ro-en", "train")
    assert D.parse_hub_spec("hf:wmt16:ro-en") == ("wmt16", "ro-en", "train")
    assert D.parse_hub_spec("hf:org/name::validation") == ("org/name", None, "validation")
    calls = []
    features = datasets.Features({"translation": datasets.Translation(languages=["en", "ro"])})
    rows = {"translation": [{"en": "Hello.", "ro": "Salut."}]}

    def fake_load_dataset(name, config=None, split=None, **kwargs):
        calls.append((name, config, split))
        return datasets.Dataset.from_dict(rows, features=features)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert _pairs("hf:wmt16:ro-en:validation", "ro", "en", cache=tmp_path) == [("Salut.", "Hello.")]
    assert calls == [("wmt16", "ro-en", "validation")]


# ----------------------------------------------------------------------------------------------
# Validation errors


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_mismatched_line_counts(tmp_path):
    _write(tmp_path / "m.en", ["a", "b", "c"])
    _write(tmp_path / "m.ro", ["a", "b"])
    with pytest.raises(DataError, match="ends after 2 lines.*has 3 lines") as info:
        _pairs(tmp_path / "m", cache=tmp_path / "c")
    assert info.value.path == str(tmp_path / "m.ro") and info.value.line == 3


def test_empty_and_missing_files(tmp_path):
    _write(tmp_path / "e.en", ["a"])
    (tmp_path / "e.ro").write_bytes(b"")
    with pytest.raises(DataError, match="file is empty") as info:
        _pairs(tmp_path / "e", cache=tmp_path)
    assert info.value.path == str(tmp_path / "e.ro")
    with pytest.raises(DataError, match="not found") as info:
        _pairs(tmp_path / "nothing", cache=tmp_path)
    with pytest.raises(DataError, match="file not found") as info:
        _pairs(f"{tmp_path}/e.en,{tmp_path}/absent.ro", cache=tmp_path)
    assert info.value.path == str(tmp_path / "absent.ro")


def test_invalid_utf8_names_the_line(tmp_path):
    _write(tmp_path / "u.en", ["one", "two", "three"])
    (tmp_path / "u.ro").write_bytes(b"unu\ndoi\ntr\xe9i\n")
    with pytest.raises(DataError, match="invalid UTF-8") as info:
        _pairs(tmp_path / "u", cache=tmp_path / "c")
    assert (info.value.path, info.value.line) == (str(tmp_path / "u.ro"), 3)
    assert str(info.value).startswith(f"{tmp_path / 'u.ro'}:3: ")


def test_bad_json_and_missing_key(tmp_path):
    bad = _write(tmp_path / "bad.jsonl", ['{"en": "a", "ro": "b"}', '{"en": "a", "ro": '])
    with pytest.raises(DataError, match="bad JSON") as info:
        _pairs(bad, cache=tmp_path / "c1")
    assert (info.value.path, info.value.line) == (str(bad), 2)
    key = _write(tmp_path / "key.jsonl", ['{"en": "a", "ro": "b"}', '{"en": "a", "de": "b"}'])
    with pytest.raises(DataError, match="missing language key 'ro'") as info:
        _pairs(key, cache=tmp_path / "c2")
    assert info.value.line == 2
    tsv = _write(tmp_path / "x.tsv", ["a\tb", "a\tb\tc"])
    with pytest.raises(DataError, match="expected 2 tab-separated fields") as info:
        _pairs(tsv, cache=tmp_path / "c3")
    assert info.value.line == 2
    parquet = tmp_path / "p.parquet"
    datasets.Dataset.from_list([{"en": "a", "de": "b"}]).to_parquet(str(parquet))
    with pytest.raises(DataError, match="no 'en' and 'ro' columns"):
        _pairs(parquet, cache=tmp_path / "c4")


def test_empty_pairs_dropped_and_counted(tmp_path, tok, caplog):
    _write(tmp_path / "w.en", ["Hello.", "   ", "Good night.", "", "Yes.", "\t"])
    _write(tmp_path / "w.ro", ["Salut.", "Ceva.", "Noapte bună.", "", "Da.", " "])
    source = D.resolve_source(str(tmp_path / "w"), "en", "ro")
    tokens = D.tokenize_pairs(D.load_pairs(source, "en", "ro", tmp_path / "c"), tok, tmp_path)
    with caplog.at_level(logging.INFO, logger="seq2seq_diff.data"):
        ds, stats = D.filter_pairs(tokens, name="w")
    assert (stats.total, stats.empty, stats.kept) == (6, 3, 3)
    assert ds["src_text"] == ["Hello.", "Good night.", "Yes."]
    assert "dropped 3 with an empty side" in caplog.text


def test_length_and_ratio_filters_counted(corpus, tok, tmp_path):
    pairs = D.load_pairs(D.resolve_source(str(corpus), "en", "ro"), "en", "ro", tmp_path)
    tokens = D.tokenize_pairs(pairs, tok, tmp_path)
    src = np.array(tokens["src_len"])
    tgt = np.array(tokens["tgt_len"])
    long = (src > 12) | (tgt > 12)
    bad = ~long & (np.maximum(src, tgt) / np.minimum(src, tgt) > 1.3)
    ds, stats = D.filter_pairs(tokens, max_len=12, max_len_ratio=1.3)
    assert (stats.too_long, stats.bad_ratio) == (long.sum(), bad.sum())
    assert stats.kept == len(ds) == N_LINES - long.sum() - bad.sum()
    assert max(ds["src_len"]) <= 12 and max(ds["tgt_len"]) <= 12


def test_origins_filter(corpus, lines, tmp_path):
    pairs = _pairs(corpus, cache=tmp_path, origins=["tatoeba_anki"])
    rows = zip(lines["en"], lines["ro"], lines["origin"], strict=True)
    wanted = [(e, r) for e, r, o in rows if o == "tatoeba_anki"]
    assert pairs == wanted and 0 < len(pairs) < N_LINES
    with pytest.raises(ConfigError, match="origin"):
        _pairs(f"{corpus}.en,{corpus}.ro", cache=tmp_path, origins=["udhr"])


def test_tokens_cache_keyed_on_tokenizer(corpus, lines, tok, tmp_path):
    pairs = D.load_pairs(D.resolve_source(str(corpus), "en", "ro"), "en", "ro", tmp_path)
    first = D.tokenize_pairs(pairs, tok, tmp_path / "tok")
    again = D.tokenize_pairs(pairs, tok, tmp_path / "tok")
    assert again.cache_files == first.cache_files  # reused
    other = train_tokenizer(lines["en"] + lines["ro"], tmp_path / "o.model", vocab_size=250)
    retok = D.tokenize_pairs(pairs, other, tmp_path / "tok")
    assert retok.cache_files != first.cache_files
    assert retok["src_ids"] == other.encode(pairs["src_text"])
    assert len(list((tmp_path / "tok").glob("tokens-*.arrow"))) == 2


# ----------------------------------------------------------------------------------------------
# Token batches


def _lengths(n: int = 500, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    src = rng.integers(2, 60, size=n)
    return src, np.clip(src + rng.integers(-5, 10, size=n), 2, None)


def _within_budget(batches, src, tgt, max_tokens) -> bool:
    return all(
        len(b) * src[b].max() <= max_tokens and len(b) * tgt[b].max() <= max_tokens for b in batches
    )


def test_batches_within_budget_and_cover_each_example_once():
    src, tgt = _lengths()
    sampler = D.TokenBatchSampler(src, tgt, max_tokens=300, seed=1)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        assert _within_budget(batches, src, tgt, 300)
        assert sorted(i for b in batches for i in b) == list(range(len(src)))


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 40)), min_size=1, max_size=80),
    max_tokens=st.integers(40, 200),
    replicas=st.integers(1, 3),
    seed=st.integers(0, 3),
)
def test_sampler_properties(lengths, max_tokens, replicas, seed):
    src, tgt = (np.array(x) for x in zip(*lengths, strict=True))
    ranks = [
        D.TokenBatchSampler(src, tgt, max_tokens, seed=seed, num_replicas=replicas, rank=r,
                            pool_size=16)
        for r in range(replicas)
    ]
    per_rank = [list(s) for s in ranks]
    assert len({len(b) for b in per_rank}) == 1  # same number of batches on every rank
    assert all(_within_budget(b, src, tgt, max_tokens) for b in per_rank)
    seen = Counter(i for batches in per_rank for b in batches for i in b)
    assert set(seen) == set(range(len(src)))  # nothing lost
    extra = sum(seen.values()) - len(src)
    assert extra <= (replicas - 1) * max(map(len, ranks[0].batches))  # only wrap-around repeats


def test_two_ranks_disjoint_with_equal_counts():
    src, tgt = _lengths(301)
    for drop_last in (False, True):
        samplers = [
            D.TokenBatchSampler(src, tgt, 250, seed=3, num_replicas=2, rank=r, drop_last=drop_last)
            for r in (0, 1)
        ]
        for s in samplers:
            s.set_epoch(2)
        rank0, rank1 = (list(s) for s in samplers)
        assert len(rank0) == len(rank1) == len(samplers[0])
        n = samplers[0].batches_per_epoch
        ids0 = {tuple(b) for b in rank0}
        ids1 = {tuple(b) for b in rank1}
        if drop_last or n % 2 == 0:
            assert not ids0 & ids1
        else:  # the odd batch count is evened out by repeating the epoch's first batch
            assert len(ids0 & ids1) <= 1
        covered = {i for b in rank0 + rank1 for i in b}
        assert drop_last or covered == set(range(len(src)))


def test_order_depends_on_seed_and_epoch_only():
    src, tgt = _lengths()

    def order(seed, epoch):
        sampler = D.TokenBatchSampler(src, tgt, 300, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(0, 0) == order(0, 0)
    assert order(0, 1) == order(0, 1)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)
    fixed = D.TokenBatchSampler(src, tgt, 300, shuffle=False)
    assert list(fixed) == (fixed.set_epoch(5) or list(fixed))
    flat = [i for b in fixed for i in b]
    longer = np.maximum(src, tgt)
    assert list(longer[flat]) == sorted(longer)  # evaluation batches are length-sorted


def test_oversized_example_gets_its_own_batch():
    src, tgt = np.array([5, 500, 5, 5]), np.array([5, 5, 600, 5])
    batches = list(D.TokenBatchSampler(src, tgt, max_tokens=100, shuffle=False))
    assert [1] in batches and [2] in batches
    assert sorted(i for b in batches for i in b) == [0, 1, 2, 3]


class _Examples(torch.utils.data.Dataset):
    def __init__(self, src, tgt):
        self.rows = [{"src_ids": [5] * (s - 1), "tgt_ids": [6] * (t - 1), "i": i}
                     for i, (s, t) in enumerate(zip(src.tolist(), tgt.tolist(), strict=True))]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _ids(batch):
    return batch["i"]


def _collate_ids(examples):
    return {"i": [ex["i"] for ex in examples], **D.collate(examples)}


@pytest.mark.parametrize("replicas,workers", [(1, 0), (2, 0), (1, 2)])
def test_resume_mid_epoch_equals_tail(replicas, workers):
    src, tgt = _lengths(400)
    dataset = _Examples(src, tgt)

    def loaders():
        return [
            D.BatchLoader(dataset, D.TokenBatchSampler(src, tgt, 300, seed=7, num_replicas=replicas,
                                                       rank=r), _collate_ids, num_workers=workers)
            for r in range(replicas)
        ]

    full = loaders()
    for loader in full:
        loader.sampler.set_epoch(1)
    whole = [[_ids(b) for b in loader] for loader in full]

    first = loaders()
    states = []
    for loader in first:
        loader.sampler.set_epoch(1)
        iterator = iter(loader)
        head = [_ids(next(iterator)) for _ in range(5)]  # workers prefetch more than this
        assert head == whole[first.index(loader)][:5]
        states.append(loader.state_dict())
    assert states[0] == {"epoch": 1, "consumed": 5 * replicas, "seed": 7}

    resumed = loaders()
    for loader, tail in zip(resumed, whole, strict=True):
        loader.load_state_dict(states[0])  # Lightning restores rank 0's state on every rank
        loader.sampler.set_epoch(1)
        assert len(loader) == len(tail)  # Lightning wants the whole epoch's length
        assert [_ids(b) for b in loader] == tail[5:]
        loader.sampler.set_epoch(2)
        assert len([_ids(b) for b in loader]) == len(tail)  # the next epoch is whole again


def test_resume_after_a_finished_epoch_starts_the_next():
    src, tgt = _lengths(100)
    sampler = D.TokenBatchSampler(src, tgt, 300, seed=1)
    loader = D.BatchLoader(_Examples(src, tgt), sampler, _collate_ids)
    done = [_ids(b) for b in loader]
    state = loader.state_dict()
    fresh = D.BatchLoader(_Examples(src, tgt), D.TokenBatchSampler(src, tgt, 300, seed=1),
                          _collate_ids)
    fresh.load_state_dict(state)
    fresh.sampler.set_epoch(1)
    after = [_ids(b) for b in fresh]
    sampler.set_epoch(1)
    assert after == [b for b in sampler] and after != done


def test_collate_follows_the_contract():
    examples = [
        {"src_ids": [7, 8, 9], "tgt_ids": [10, 11], "src_text": "a b c", "tgt_text": "x y"},
        {"src_ids": [7], "tgt_ids": [12, 13, 14, 15], "src_text": "a", "tgt_text": "z"},
    ]
    batch = D.collate(examples, with_text=True)
    assert batch["src"].tolist() == [[7, 8, 9, 3], [7, 3, 0, 0]]
    assert batch["tgt_in"].tolist() == [[2, 10, 11, 0, 0], [2, 12, 13, 14, 15]]
    assert batch["tgt_out"].tolist() == [[10, 11, 3, 0, 0], [12, 13, 14, 15, 3]]
    assert batch["src"].dtype == torch.long
    assert batch["src_text"] == ["a b c", "a"] and batch["ref_text"] == ["x y", "z"]
    assert set(D.collate(examples)) == {"src", "tgt_in", "tgt_out"}


# ----------------------------------------------------------------------------------------------
# Data module


@pytest.fixture(scope="module")
def module_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dm")
    return {"cache_dir": str(root / "cache"), "work_dir": str(root / "work")}


def _module(corpus, dirs, **kwargs):
    args = dict(train=str(corpus), valid=str(corpus), vocab_size=300, max_tokens=400,
                max_len=64, seed=0, **dirs)
    args.update(kwargs)
    return D.TranslationDataModule(**args)


def test_data_module_end_to_end(corpus, module_dirs, caplog):
    dm = _module(corpus, module_dirs)
    assert dm.vocab_size == dm.tokenizer.vocab_size == 300  # ready before setup (LightningCLI)
    assert (Path(module_dirs["work_dir"]) / "spm.model").is_file()
    dm.setup("fit")
    train = list(dm.train_dataloader())
    assert sum(len(b["src"]) for b in train) == len(dm.datasets["train"])
    assert all(b["src"].numel() <= 400 and b["tgt_in"].numel() <= 400 for b in train)
    valid = list(dm.val_dataloader())
    assert list(dm.val_dataloader())[0]["src_text"] == valid[0]["src_text"]  # fixed order
    refs = {t for b in valid for t in b["ref_text"]}
    assert refs == set(dm.datasets["valid"]["tgt_text"])
    with caplog.at_level(logging.INFO, logger="seq2seq_diff.data"):
        again = _module(corpus, module_dirs)  # same data and settings: tokenizer reused
    assert "reusing" in caplog.text and again.tokenizer.fingerprint == dm.tokenizer.fingerprint


def test_data_module_options(corpus, module_dirs, lines, tmp_path):
    dm = _module(corpus, module_dirs, src_lang="ro", tgt_lang="en", valid_size=10,
                 tokenizer_path=str(Path(module_dirs["work_dir"]) / "spm.model"))
    dm.setup("validate")
    assert dm.datasets["valid"]["src_text"] == lines["ro"][:10]
    assert dm.datasets["valid"]["tgt_text"] == lines["en"][:10]
    with pytest.raises(ConfigError, match="max_tokens"):
        _module(corpus, module_dirs, max_tokens=32, max_len=64)
    with pytest.raises(ConfigError, match="tokenizer_path"):
        _module(corpus, module_dirs, tokenizer_path=str(tmp_path / "none.model"))


class _Recorder:
    """A tiny LightningModule recording the first source row of every training batch."""

    @staticmethod
    def make():
        import lightning as L

        class Module(L.LightningModule):
            def __init__(self):
                super().__init__()
                self.w = torch.nn.Parameter(torch.ones(1))
                self.seen = []
                self.validated = 0

            def training_step(self, batch, batch_idx):
                self.seen.append((self.current_epoch, tuple(batch["src"][0].tolist())))
                return (self.w * batch["src"].float().mean()).sum()

            def validation_step(self, batch, batch_idx):
                assert len(batch["src_text"]) == len(batch["ref_text"]) == len(batch["src"])
                self.validated += 1

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.0)

        return Module()


def test_lightning_resumes_mid_epoch(corpus, module_dirs, tmp_path):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    def trainer(**kwargs):
        return L.Trainer(max_epochs=2, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=2, accelerator="cpu",
                         **kwargs)

    dm = _module(corpus, module_dirs, max_tokens=200, max_len=50)
    full = _Recorder.make()
    every = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1,
                            filename="{step}")
    trainer(callbacks=[every]).fit(full, datamodule=dm)
    steps_per_epoch = len(full.seen) // 2
    assert steps_per_epoch > 3 and {e for e, _ in full.seen} == {0, 1}
    epochs = [[row for e, row in full.seen if e == epoch] for epoch in (0, 1)]
    assert epochs[0] != epochs[1] and sorted(epochs[0]) == sorted(epochs[1])  # set_epoch reached

    resumed = _Recorder.make()
    dm2 = _module(corpus, module_dirs, max_tokens=200, max_len=50)
    trainer(enable_checkpointing=False).fit(resumed, datamodule=dm2,
                                            ckpt_path=str(tmp_path / "step=3.ckpt"))
    assert resumed.seen == full.seen[3:]
    assert full.validated > 0
