"""The command line through its real entry point: train, export, average, errors, exact resume."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import write_corpus

from seq2seq_diff.cli import COMMANDS, expand_config_bases, main
from seq2seq_diff.model import ModelConfig, Seq2SeqTransformer
from seq2seq_diff.model_dir import checkpoint_model_state, load_checkpoint, load_model_dir

# Tiny models: one thread is faster, and much faster beside a busy neighbour (conftest).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    """Corpus, Arrow cache and SentencePiece work dir shared by the module's runs."""
    root = tmp_path_factory.mktemp("shared")
    write_corpus(root / "corpus")
    return root


def tiny_config(shared: Path, run_dir: Path, **trainer) -> dict:
    """A tests-only training config: d_model 32, 1+1 layers, vocab 300 on 300 pairs."""
    return {
        "seed_everything": 7,
        "run_dir": str(run_dir),
        "model": {
            "config": {"d_model": 32, "num_heads": 2, "num_encoder_layers": 1,
                       "num_decoder_layers": 1, "ffn_dim": 64, "dropout": 0.1},
            "lr": 0.003, "warmup_steps": 3, "valid_bleu_size": 8,
        },
        "data": {
            "train": str(shared / "corpus" / "train"), "valid": str(shared / "corpus" / "dev"),
            "vocab_size": 300, "max_tokens": 400, "max_len": 128, "valid_size": 16,
            "cache_dir": str(shared / "cache"), "work_dir": str(shared / "work"),
        },
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": 4, "val_check_interval": 2,
            "check_val_every_n_epoch": None, "num_sanity_val_steps": 0,
            "log_every_n_steps": 2, "enable_progress_bar": False,
            "enable_model_summary": False, "use_distributed_sampler": False,
            "callbacks": [
                {"class_path": "seq2seq_diff.lit_module.ResumableCheckpoint",
                 "init_args": {"dirpath": "unused", "monitor": "val_bleu", "mode": "max",
                               "save_top_k": 2, "save_last": True,
                               "filename": "step{step}", "auto_insert_metric_name": False}},
            ],
            "logger": [{"class_path": "CSVLogger",
                        "init_args": {"save_dir": "unused", "name": "csv"}}],
            **trainer,
        },
    }


def write_config(path: Path, config: dict) -> str:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(path)


def one_error_line(capsys) -> str:
    """The error is one line, the last; anything before it is a log record; no traceback."""
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: "), err
    assert all(line.startswith(("INFO ", "WARNING ")) for line in err[:-1]), err
    assert not any("Traceback" in line for line in err), err
    return err[-1]


@pytest.fixture(scope="module")
def trained(shared, tmp_path_factory) -> Path:
    """One 4-step run through `python cli.py train` (validation at steps 2 and 4)."""
    root = tmp_path_factory.mktemp("trained")
    config = write_config(root / "tiny.yaml", tiny_config(shared, root / "run"))
    assert main(["train", "--config", config]) == 0
    return root / "run"


# -- dispatch ---------------------------------------------------------------------------------


def test_help_lists_the_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out
    assert main([]) == 2


def test_unknown_command(capsys):
    assert main(["trian"]) == 2
    assert "unknown command 'trian'" in one_error_line(capsys)


# -- train ------------------------------------------------------------------------------------


def test_train_exports_a_model_dir_with_the_checkpoints_logits(trained, capsys):
    model, tokenizer = load_model_dir(trained / "model")
    meta = json.loads((trained / "model" / "metadata.json").read_text())
    checkpoint = load_checkpoint(meta["checkpoint"])
    reference = Seq2SeqTransformer(ModelConfig.from_dict(
        json.loads((trained / "model" / "model_config.json").read_text())))
    reference.load_state_dict(checkpoint_model_state(checkpoint))
    reference.eval()
    src = torch.tensor([tokenizer.encode(["The house is small."])[0] + [3]])
    tgt_in = torch.tensor([[2, 10, 11, 12]])
    with torch.no_grad():
        assert torch.equal(model(src, tgt_in), reference(src, tgt_in))
    assert model.config.vocab_size == tokenizer.vocab_size == 300
    assert (trained / "config.yaml").is_file()
    assert (trained / "checkpoints" / "last.ckpt").is_file()
    training = yaml.safe_load((trained / "model" / "training_config.yaml").read_text())
    assert training["model"]["config"]["d_model"] == 32
    assert training["trainer"]["max_steps"] == 4
    metrics = (trained / "csv" / "version_0" / "metrics.csv").read_text()
    for name in ("val_bleu", "val_chrf", "val_loss", "train_loss", "tok_s"):
        assert name in metrics.splitlines()[0]


def test_monitor_step_exports_the_final_step_not_the_last_validated(shared, tmp_path):
    config = tiny_config(shared, tmp_path / "run", max_steps=5)
    config["trainer"]["callbacks"][0]["init_args"].update(monitor="step", mode="max")
    assert main(["train", "--config", write_config(tmp_path / "c.yaml", config)]) == 0
    meta = json.loads((tmp_path / "run" / "model" / "metadata.json").read_text())
    assert meta["global_step"] == 5  # validations ran at steps 2 and 4 only


def test_sigkill_mid_run_then_resume_equals_an_uninterrupted_run(shared, tmp_path):
    """`train` killed with SIGKILL after its first checkpoint resumes to the same end state."""
    import os
    import signal
    import subprocess
    import sys
    import time

    steps = 40
    config = tiny_config(shared, tmp_path / "killed", max_steps=steps, val_check_interval=4)
    path = write_config(tmp_path / "killed.yaml", config)
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    child = subprocess.Popen([sys.executable, str(root / "cli.py"), "train", "--config", path,
                              "--export", "false"], cwd=root, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 120
    while not last.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL, "training ended before it could be killed"
    killed_at = torch.load(last, weights_only=False)["global_step"]
    assert 0 < killed_at < steps
    assert main(["train", "--config", path, "--export", "false", "--ckpt_path", "last"]) == 0
    resumed = torch.load(last, weights_only=False)
    full_path = write_config(tmp_path / "full.yaml",
                             tiny_config(shared, tmp_path / "full", max_steps=steps,
                                         val_check_interval=4))
    assert main(["train", "--config", full_path, "--export", "false"]) == 0
    full = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=False)
    assert resumed["global_step"] == full["global_step"] == steps
    assert resumed["lr_schedulers"] == full["lr_schedulers"]
    for key, value in full["state_dict"].items():
        assert torch.allclose(value, resumed["state_dict"][key], atol=1e-6), key


def test_checkpoints_are_written_atomically(trained):
    checkpoints = trained / "checkpoints"
    assert (checkpoints / "last.ckpt").is_file()
    assert not list(checkpoints.glob(".*tmp*"))  # temp files are renamed into place


def test_print_config(shared, tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", tiny_config(shared, tmp_path / "run"))
    assert main(["train", "--config", config, "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["config"]["d_model"] == 32
    assert printed["data"]["vocab_size"] == 300
    assert printed["trainer"]["max_steps"] == 4
    assert not (tmp_path / "run").exists()


def test_unknown_config_key_is_one_line(shared, tmp_path, capsys):
    config = tiny_config(shared, tmp_path / "run")
    config["model"]["config"]["num_layerz"] = 2
    assert main(["train", "--config", write_config(tmp_path / "c.yaml", config)]) == 2
    assert "num_layerz" in one_error_line(capsys)


def test_wrong_type_and_missing_file_are_one_line(shared, tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", tiny_config(shared, tmp_path / "run"))
    assert main(["train", "--config", config, "--model.lr", "fast"]) == 2
    assert "model.lr" in one_error_line(capsys)
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in one_error_line(capsys)


def test_impossible_model_config_is_one_line(shared, tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", tiny_config(shared, tmp_path / "run"))
    assert main(["train", "--config", config, "--model.config.d_model", "30"]) == 2
    assert "d_model" in one_error_line(capsys)


def test_debug_shows_the_traceback(shared, tmp_path):
    config = tiny_config(shared, tmp_path / "run")
    config["model"]["bogus"] = 1
    path = write_config(tmp_path / "c.yaml", config)
    with pytest.raises(Exception, match="bogus"):
        main(["train", "--config", path, "--debug"])


def test_config_base_chain(shared, tmp_path, capsys):
    write_config(tmp_path / "base.yaml", tiny_config(shared, tmp_path / "run"))
    (tmp_path / "twin.yaml").write_text("base: base.yaml\nmodel:\n  config:\n"
                                        "    attention: standard\n")
    argv = ["--config", str(tmp_path / "twin.yaml"), "--trainer.max_steps", "9"]
    assert expand_config_bases(argv) == [
        "--config", str(tmp_path / "base.yaml"), "--config", str(tmp_path / "twin.yaml"),
        "--trainer.max_steps", "9"]
    assert main(["train", *argv, "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["config"]["attention"] == "standard"
    assert printed["model"]["config"]["d_model"] == 32
    assert printed["trainer"]["max_steps"] == 9


# -- export / average / train-tokenizer ------------------------------------------------------


def test_export_and_average_commands(trained, tmp_path, capsys):
    assert main(["export", str(trained / "checkpoints" / "last.ckpt"), "--out",
                 str(tmp_path / "exported")]) == 0
    assert "model directory:" in capsys.readouterr().out
    load_model_dir(tmp_path / "exported")
    assert main(["average", "--run-dir", str(trained), "--last", "2", "--out",
                 str(tmp_path / "averaged")]) == 0
    meta = json.loads((tmp_path / "averaged" / "metadata.json").read_text())
    assert len(meta["averaged_checkpoints"]) == 2
    load_model_dir(tmp_path / "averaged")
    assert main(["average", "--run-dir", str(trained), "--last", "9", "--out",
                 str(tmp_path / "x")]) == 2
    assert "--last" in one_error_line(capsys)
    assert main(["export", str(tmp_path / "none.ckpt"), "--out", str(tmp_path / "y")]) == 2
    assert "no such checkpoint" in one_error_line(capsys)


def test_train_tokenizer_from_files(shared, tmp_path, capsys):
    corpus = shared / "corpus"
    out = tmp_path / "spm.model"
    assert main(["train-tokenizer", "--files", str(corpus / "train.en"),
                 str(corpus / "train.ro"), "--vocab-size", "250", "--output", str(out)]) == 0
    assert "250 pieces" in capsys.readouterr().out
    assert out.is_file()


def test_train_tokenizer_from_a_config(shared, tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", tiny_config(shared, tmp_path / "run"))
    assert main(["train-tokenizer", "--config", config]) == 0
    assert "300 pieces" in capsys.readouterr().out
    assert (shared / "work" / "spm.model").is_file()


# -- exact resume -----------------------------------------------------------------------------


def test_resume_is_exact(shared, tmp_path):
    """16 steps in one go == 8 steps, then `--ckpt_path last` to 16 (dropout on).

    The stop at step 8 falls between validations (every 3 steps) and inside the first epoch;
    the resumed run crosses into the second epoch (about 13 batches per epoch).
    """
    steps = 16

    def run(name: str, *extra: str) -> dict:
        config = tiny_config(shared, tmp_path / name, max_steps=steps, val_check_interval=3)
        path = write_config(tmp_path / f"{name}.yaml", config)
        assert main(["train", "--config", path, "--export", "false", *extra]) == 0
        return torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=False)

    full = run("full")
    half = run("half", "--trainer.max_steps", str(steps // 2))
    assert half["global_step"] == steps // 2
    resumed = run("half", "--ckpt_path", "last")

    assert resumed["global_step"] == full["global_step"] == steps
    assert resumed["epoch"] == full["epoch"]
    assert (resumed["loops"]["fit_loop"]["state_dict"]
            == full["loops"]["fit_loop"]["state_dict"])  # the data position
    assert resumed["lr_schedulers"] == full["lr_schedulers"]
    full_opt, resumed_opt = full["optimizer_states"][0], resumed["optimizer_states"][0]
    assert full_opt["param_groups"] == resumed_opt["param_groups"]  # incl. the current LR
    for index, state in full_opt["state"].items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.allclose(state[key], resumed_opt["state"][index][key]), (index, key)
    for key, value in full["state_dict"].items():
        assert torch.allclose(value, resumed["state_dict"][key]), key


@pytest.mark.parametrize("native, warned", [(True, False), (False, True), (None, False)])
def test_bf16_on_a_cpu_warns_only_where_bf16_is_emulated(monkeypatch, caplog, native, warned):
    from seq2seq_diff.cli import warn_slow_bf16

    def check():
        if native is None:  # a torch build without oneDNN's check: say nothing
            raise RuntimeError("No such operator mkldnn::_is_mkldnn_bf16_supported")
        return native

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", check)
    with caplog.at_level("WARNING"):
        warn_slow_bf16({"trainer": {"accelerator": "cpu", "precision": "bf16-mixed"}})
        warn_slow_bf16({"trainer": {"accelerator": "cpu", "precision": "32-true"}})
    assert ("bf16 is emulated" in caplog.text) == warned
    assert caplog.text.count("bf16 is emulated") <= 1
