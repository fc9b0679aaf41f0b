"""Two CPU processes (DDP, gloo) train a few steps through the real command line.

Lightning's DDP launcher re-runs the command for rank 1, so the run goes through a subprocess
(`python cli.py train ...`) rather than in-process. About 25 s on 2 cores, so not marked slow.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from helpers import write_corpus

ROOT = Path(__file__).resolve().parents[1]


def test_two_process_ddp_trains_and_exports(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    run_dir = tmp_path / "run"
    config = {
        "seed_everything": 3,
        "run_dir": str(run_dir),
        "model": {"config": {"d_model": 32, "num_heads": 2, "num_encoder_layers": 1,
                             "num_decoder_layers": 1, "ffn_dim": 64, "dropout": 0.1},
                  "warmup_steps": 2, "valid_bleu_size": 8},
        "data": {"train": str(corpus / "train"), "valid": str(corpus / "dev"),
                 "vocab_size": 300, "max_tokens": 400, "max_len": 128, "valid_size": 16,
                 "cache_dir": str(tmp_path / "cache"), "work_dir": str(tmp_path / "work")},
        "trainer": {
            "accelerator": "cpu", "devices": 2, "strategy": "ddp", "max_steps": 3,
            "val_check_interval": 3, "check_val_every_n_epoch": None,
            "num_sanity_val_steps": 0, "enable_progress_bar": False,
            "enable_model_summary": False, "use_distributed_sampler": False,
            "callbacks": [{"class_path": "seq2seq_diff.lit_module.ResumableCheckpoint",
                           "init_args": {"monitor": "val_bleu", "mode": "max",
                                         "save_last": True}}],
            "logger": [{"class_path": "CSVLogger", "init_args": {"save_dir": "unused"}}],
        },
    }
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "cli.py", "train", "--config", str(path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "model directory:" in done.stdout
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 3
    # Each rank took its own batches: the loader state counts both ranks' batches.
    assert last["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["consumed"] == 6
    meta = json.loads((run_dir / "model" / "metadata.json").read_text())
    assert meta["attention"] == "diff"
    metrics = (run_dir / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "val_bleu" in metrics.splitlines()[0]
