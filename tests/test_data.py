"""The Lightning data module: tokenizer ready before setup, token-batch loaders, options, and
an exact mid-epoch resume under Lightning."""

import logging
from pathlib import Path

import pytest
import torch

from seq2seq_diff.data import TranslationDataModule
from seq2seq_diff.errors import ConfigError


@pytest.fixture(scope="module")
def module_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dm")
    return {"cache_dir": str(root / "cache"), "work_dir": str(root / "work")}


def _module(corpus, dirs, **kwargs):
    args = dict(train=str(corpus), valid=str(corpus), vocab_size=300, max_tokens=400,
                max_len=64, seed=0, **dirs)
    args.update(kwargs)
    return TranslationDataModule(**args)


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


def test_data_module_context_prepends_the_previous_segment(corpus, module_dirs):
    plain = _module(corpus, module_dirs, valid_size=20)
    plain.setup("fit")
    with_context = _module(corpus, module_dirs, valid_size=20, context=1)
    with_context.setup("fit")
    eos = plain.tokenizer.eos_id
    for split in ("train", "valid"):
        rows, ctx = plain.datasets[split]["src_ids"], with_context.datasets[split]["src_ids"]
        assert ctx[0] == rows[0]
        assert all(ctx[i] == rows[i - 1] + [eos] + rows[i] for i in range(1, len(rows)))
        assert with_context.datasets[split]["tgt_ids"] == plain.datasets[split]["tgt_ids"]
    with pytest.raises(ConfigError, match="context"):
        _module(corpus, module_dirs, context=-1)
