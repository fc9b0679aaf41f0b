"""glibc malloc thresholds (seq2seq_diff.malloc): their effect, the user's settings, the CLI."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from seq2seq_diff import cli, malloc

ROOT = Path(__file__).resolve().parents[1]
GLIBC = malloc._glibc() is not None

# A 960 x 256 float32 rms_norm (one encoder norm of a 32 x 30 batch) allocates ~1 MB blocks; the
# child prints whether the thresholds were set and the page faults per call after a warm-up.
FAULTS = textwrap.dedent("""
    import resource, sys
    import torch
    import torch.nn.functional as F
    from seq2seq_diff.malloc import tune_malloc
    torch.set_num_threads(1)
    tuned = sys.argv[1] == "tuned" and tune_malloc()
    x, w = torch.randn(960, 256), torch.ones(256)
    for _ in range(5):
        F.rms_norm(x, (256,), w)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(40):
        F.rms_norm(x, (256,), w)
    print(tuned, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 40)
""")


def _page_faults(setting: str) -> tuple[bool, float]:
    env = {**malloc.without_malloc_settings(os.environ), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", FAULTS, setting], capture_output=True,
                         text=True, env=env, check=True).stdout.split()
    return out[0] == "True", float(out[1])


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_tuned_malloc_reuses_freed_blocks_instead_of_faulting_them_in_again():
    tuned, tuned_faults = _page_faults("tuned")
    untouched, system_faults = _page_faults("system")
    assert tuned and not untouched
    # One 960 x 256 float32 tensor is 240 pages: reused blocks fault none of them in again.
    assert tuned_faults < 24, (tuned_faults, system_faults)
    # glibc's own threshold rises as blocks are freed, and sometimes its run faults only a few
    # dozen pages a call too (CI once: 12 tuned, 32.8 system); when it faults most of the
    # tensor in, tuned must fault a quarter of that at most.
    assert tuned_faults < system_faults / 4 or system_faults < 120, (tuned_faults, system_faults)


@pytest.mark.parametrize("env", [
    {malloc.ENV: "system"},
    {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1048576"},
    {"MALLOC_MMAP_THRESHOLD_": "1048576"},
])
def test_the_users_malloc_settings_are_kept(monkeypatch, env):
    for name in ("GLIBC_TUNABLES", malloc.ENV, *malloc.GLIBC_MALLOC_ENV):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    calls = []
    monkeypatch.setattr(malloc, "_glibc", lambda: type("libc", (), {
        "mallopt": staticmethod(lambda *a: calls.append(a) or 1)}))
    assert malloc.user_settings() == "{}={}".format(*next(iter(env.items())))
    assert malloc.tune_malloc() is False
    assert calls == []
    monkeypatch.delenv(next(iter(env)))
    assert malloc.user_settings() is None
    assert malloc.tune_malloc() is True
    assert calls == [(malloc.M_MMAP_THRESHOLD, malloc.MMAP_THRESHOLD),
                     (malloc.M_TRIM_THRESHOLD, malloc.TRIM_THRESHOLD)]


def test_other_c_libraries_are_left_alone(monkeypatch):
    monkeypatch.setattr(malloc, "_glibc", lambda: None)
    assert malloc.tune_malloc() is False


def test_every_command_tunes_malloc_first(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(cli, "tune_malloc", lambda: calls.append(1) or True)
    assert cli.main(["export", "--help"]) == 0
    assert calls == [1]
    assert cli.main(["no-such-command"]) == 2  # refused before anything runs
    assert calls == [1]
