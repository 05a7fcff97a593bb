"""The trainer never loses or corrupts a run: non-finite weights are never checkpointed, skip mode stops after
`nonfinite_max_skips` consecutive skips and says so on the console, one run dir holds one live run (lock),
config changes on resume are refused or applied and announced, and a failed start leaves no empty run dir."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from trainer_helpers import load_step_weights, tiny_overrides, train
from utils.checkpoint import CheckpointError, list_step_dirs
from utils.schema import ConfigError


def test_nonfinite_weights_are_never_checkpointed(tiny_data, tmp_path, monkeypatch):
    import pretrain
    real_step = pretrain.train_step

    def corrupting_step(run, batch):
        real_step(run, batch)
        if run.step == 4:  # the update of step 4 overflows; its loss (computed before) was finite
            with torch.no_grad():
                next(run.head.parameters()).fill_(float("inf"))
    monkeypatch.setattr(pretrain, "train_step", corrupting_step)
    run_dir = tmp_path / "nanw"
    with pytest.raises(pretrain.TrainError, match=r"weights are non-finite at step 4 .*not checkpointed; the last "
                                                  r"checkpoint in .* is intact"):
        train(tiny_overrides(tiny_data, run_dir, checkpoint_interval_steps=2, log_every=100))
    assert [s for s, _ in list_step_dirs(run_dir)] == [2]
    assert all(torch.isfinite(v).all() for v in load_step_weights(run_dir / "step_2").values())


def _nan_loss(monkeypatch):
    from models import losses
    real = losses.ACTLossHead.forward

    def nan_loss(self, *a, **kw):
        carry, loss, metrics, outputs, halted = real(self, *a, **kw)
        return carry, loss * float("nan"), metrics, outputs, halted
    monkeypatch.setattr(losses.ACTLossHead, "forward", nan_loss)


def test_skip_mode_stops_after_consecutive_skips_and_reports_them(tiny_data, tmp_path, monkeypatch, capsys):
    _nan_loss(monkeypatch)
    import pretrain
    with pytest.raises(pretrain.TrainError, match=r"3 consecutive steps \(up to step 3\) had a non-finite loss "
                                                  r"\(nonfinite_max_skips=3\)"):
        train(tiny_overrides(tiny_data, tmp_path / "skip", nonfinite_loss="skip", nonfinite_max_skips=3))
    err = capsys.readouterr().err
    assert "warning: skipped 2 steps with a non-finite loss up to step 2 (2 in all; nonfinite_loss=skip)" in err
    assert list_step_dirs(tmp_path / "skip") == []


def test_second_run_on_a_locked_dir_is_refused_naming_the_holder(tiny_data, tmp_path):
    import subprocess
    import sys
    run_dir = tmp_path / "locked"
    run_dir.mkdir()
    (run_dir / ".tmp-step_5-4242").mkdir()  # the holder's in-progress write: must survive the refused start
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(run_dir / '.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.write(fd, b'pid %d on testhost, since now' % os.getpid())\n"
        "print('locked', flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(CheckpointError, match=rf"run dir '.*locked' is in use by another run \(pid {holder.pid} "
                                                  r"on testhost, since now\)"):
            train(tiny_overrides(tiny_data, run_dir, max_steps=1))
        assert (run_dir / ".tmp-step_5-4242").is_dir() and (run_dir / ".lock").is_file()
    finally:
        holder.kill()
        holder.wait()
    # the holder died: its lock is gone with it and the stale file is taken over
    summary = train(tiny_overrides(tiny_data, run_dir, max_steps=1))
    assert summary["step"] == 1 and not (run_dir / ".lock").exists()
    assert not (run_dir / ".tmp-step_5-4242").exists()


def test_failed_start_leaves_no_empty_run_dir(tiny_data, tmp_path):
    run_dir = tmp_path / "new" / "deeper" / "run"
    with pytest.raises(ConfigError, match="lr_scheduler 'cosine_annealing_with_warmup'"):
        train(tiny_overrides(tiny_data, run_dir, lr_warmup_steps=100, max_steps=1)
              + ["lr_scheduler.name=cosine_annealing_with_warmup"])
    assert not (tmp_path / "new").exists()


def test_multirun_jobs_with_a_fixed_run_name_get_their_own_dirs(tiny_data, tmp_path):
    from trainer_helpers import run_cli
    run_dir = tmp_path / "sweep"
    args = [a for a in tiny_overrides(tiny_data, run_dir, max_steps=1) if not a.startswith("lr=")]
    proc = run_cli(["pretrain.py", "--multirun", "lr=1e-3,2e-3", *args, "hydra.sweep.dir=" + str(tmp_path / "hy")])
    assert proc.returncode == 0, proc.stderr[-2000:]
    for job, lr in ((0, "0.001"), (1, "0.002")):
        step = Path(f"{run_dir}-job{job}") / "step_1"
        assert f"lr: {lr}" in (step / "config.yaml").read_text() and "run_name: t-job%d" % job in (step / "config.yaml").read_text()
    assert "nothing to do" not in proc.stdout


def test_resume_refuses_what_cannot_change_and_applies_the_rest(tiny_data, tmp_path, capsys):
    run_dir = tmp_path / "res"
    train(tiny_overrides(tiny_data, run_dir, max_steps=4))
    capsys.readouterr()
    for override, key in (("seed=5", "seed"), ("global_batch_size=8", "global_batch_size"),
                          ("optimizer.name=adamw", "optimizer.name")):
        with pytest.raises(ConfigError, match=rf"cannot resume .*step_4 with {key} changed .*: "):
            train(tiny_overrides(tiny_data, run_dir) + [override])
    # lr, warmup and halt_max_steps change: applied, announced, and recorded in the next checkpoint's config
    train(tiny_overrides(tiny_data, run_dir, max_steps=5, lr=3e-3, lr_warmup_steps=10) + ["arch.halt_max_steps=3"])
    out = capsys.readouterr().out
    assert "resume: lr changed 0.001 -> 0.003, in force from step 5" in out
    assert "resume: lr_warmup_steps changed 2 -> 10, in force from step 5" in out
    assert "resume: arch.halt_max_steps changed 2 -> 3, in force from step 5" in out
    cfg5 = (run_dir / "step_5" / "config.yaml").read_text()
    assert "lr: 0.003" in cfg5 and "halt_max_steps: 3" in cfg5
    from utils.logger import read_jsonl
    lr5 = [l["train/lr"] for l in read_jsonl(run_dir / "metrics.jsonl") if l.get("step") == 5 and "train/lr" in l]
    assert lr5 == [pytest.approx(3e-3 * 6 / 10, rel=1e-9)]  # new base, new warmup: the LR for step 6 is 6/10 of it


def test_read_only_file_system_is_one_line(tiny_data, tmp_path):
    import os
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if os.geteuid() != 0 or os.system(f"mount -t tmpfs -o size=8m tmpfs {mnt} 2>/dev/null") != 0:
        pytest.skip("needs root and mount (tmpfs) to make a read-only file system")
    try:
        train(tiny_overrides(tiny_data, mnt / "run", max_steps=1))
        assert os.system(f"mount -o remount,ro {mnt}") == 0
        with pytest.raises(CheckpointError, match=r"checkpoint dir '.*run' is not writable \(Read-only file system\)"):
            train(tiny_overrides(tiny_data, mnt / "run", max_steps=2))
        assert [s for s, _ in list_step_dirs(mnt / "run")] == [1]
    finally:
        os.system(f"umount {mnt}")
