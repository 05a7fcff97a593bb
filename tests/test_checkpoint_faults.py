"""Crash safety of checkpoint writes: a forked writer is SIGKILLed right before each rename, unlink and rmdir
that a save (new dir, replaced `best`, replaced `step_N`, save + rotation) performs, via utils.checkpoint's
fault hook; then the next start's clean-up runs and every checkpoint that existed before must still be
there, complete, holding either its old or its new weights. Also: disk full and permission failures end
in one line with the previous checkpoints intact, and model.safetensors gets the same mode as its siblings."""
from __future__ import annotations

import errno
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from utils import checkpoint as ckpt


def _weights(value: float) -> dict[str, torch.Tensor]:
    return {"model.inner.w": torch.full((4, 4), value), "model.inner.b": torch.full((4,), value)}


def _save(run_dir: Path, name: str, value: float) -> None:
    ckpt.save_checkpoint(run_dir, name, _weights(value), {"step": int(value)}, f"v: {value}\n",
                         extra_arrays={"eval_outputs.npz": {"preds": torch.zeros(2).numpy()}})


def _fixture(root: Path) -> Path:
    run_dir = root / "run"
    for step in (4, 8):
        _save(run_dir, f"step_{step}", float(step))
    _save(run_dir, "best", 4.0)
    return run_dir


def _value(step_dir: Path) -> float:
    w = ckpt.load_weights(step_dir)["model.inner.w"]
    assert torch.all(w == w[0, 0]), "a checkpoint with mixed contents"
    return float(w[0, 0])


SCENARIOS = {
    "new step dir": lambda d: _save(d, "step_12", 12.0),
    "replace best": lambda d: _save(d, "best", 12.0),
    "replace a step written twice": lambda d: _save(d, "step_8", 12.0),
    "new step + rotation": lambda d: (_save(d, "step_12", 12.0), ckpt.rotate_checkpoints(d, 2)),
}
# name -> the values each surviving checkpoint may hold after a kill (old or new)
ALLOWED = {"step_4": {4.0}, "step_8": {8.0, 12.0}, "best": {4.0, 12.0}, "step_12": {12.0}}


def _count_ops(action, root: Path) -> list[tuple[str, str]]:
    run_dir = _fixture(root)
    ops = []
    ckpt.fault_hook = lambda op, path: ops.append((op, Path(path).name))
    try:
        action(run_dir)
    finally:
        ckpt.fault_hook = None
    return ops


def _killed_at(action, run_dir: Path, n: int) -> None:
    """Run `action` in a forked child that SIGKILLs itself right before its n-th file-system op."""
    pid = os.fork()
    if pid == 0:  # child: no pytest teardown, no exception handlers, like a real kill
        count = [0]

        def hook(op, path):
            if count[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
            count[0] += 1
        ckpt.fault_hook = hook
        try:
            action(run_dir)
        finally:
            os._exit(0)
    deadline = time.time() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.time() > deadline:
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.005)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"op {n} was not reached"


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_kill_at_every_rename_and_unlink_keeps_every_checkpoint(scenario, tmp_path):
    action = SCENARIOS[scenario]
    ops = _count_ops(action, tmp_path / "count")
    assert any(op == "rename" for op, _ in ops)
    if scenario != "new step dir":
        assert any(op in ("unlink", "rmdir") for op, _ in ops)
    for n in range(len(ops)):
        root = tmp_path / f"kill{n}"
        run_dir = _fixture(root)
        _killed_at(action, run_dir, n)
        ckpt.remove_stale_temps(run_dir)  # what the next start does (with the run dir locked)
        names = {p.name for p in run_dir.iterdir()}
        assert not any(name.startswith(".tmp") for name in names), (scenario, n, ops[n], names)
        expected = {"step_4", "step_8", "best"}
        if scenario == "new step + rotation" and "step_12" in names:
            expected.discard("step_4")  # rotation may drop the oldest once the new one is complete
        assert expected <= names, (scenario, n, ops[n], sorted(names))
        for name in names:
            assert _value(run_dir / name) in ALLOWED[name], (scenario, n, ops[n], name)
            assert (run_dir / name / "config.yaml").is_file() and (run_dir / name / "train_state.pt").is_file()
        steps = [s for s, _ in ckpt.list_step_dirs(run_dir)]
        assert steps[-1] in (8, 12) and len(steps) >= 2


def test_a_replaced_dir_is_renamed_back_on_start(tmp_path):
    """The window the fault battery found: old `best` moved aside, new one not yet in place."""
    run_dir = _fixture(tmp_path)
    os.replace(run_dir / "best", run_dir / ".tmp-old-best-12345")
    assert ckpt.remove_stale_temps(run_dir) == [run_dir / "best"]
    assert _value(run_dir / "best") == 4.0
    # with its replacement present, the old copy is just removed
    shutil.copytree(run_dir / "best", run_dir / ".tmp-old-best-999")
    assert ckpt.remove_stale_temps(run_dir) == []
    assert sorted(p.name for p in run_dir.iterdir()) == ["best", "step_4", "step_8"]


@pytest.mark.parametrize("failure", ["enospc_oserror", "torch_unexpected_pos", "eacces"])
def test_disk_full_or_unwritable_is_one_line_and_keeps_checkpoints(failure, tmp_path, monkeypatch):
    run_dir = _fixture(tmp_path)
    errors = {"enospc_oserror": OSError(errno.ENOSPC, "No space left on device"),
              "torch_unexpected_pos": RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter "
                                                   "failed writing file data/0: file write failed\nunexpected pos 64 vs 0"),
              "eacces": PermissionError(errno.EACCES, "Permission denied")}

    def failing(*a, **kw):
        raise errors[failure]
    monkeypatch.setattr(ckpt.torch, "save", failing)
    with pytest.raises(ckpt.CheckpointError) as info:
        _save(run_dir, "best", 12.0)
    message = str(info.value)
    assert "\n" not in message and "'" + str(run_dir / "best") + "'" in message and "intact" in message
    assert ("no space left on device" in message) == (failure != "eacces")
    assert sorted(p.name for p in run_dir.iterdir()) == ["best", "step_4", "step_8"]
    assert _value(run_dir / "best") == 4.0


def test_real_full_disk_on_a_tmpfs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or os.system(f"mount -t tmpfs -o size=256k tmpfs {mnt} 2>/dev/null") != 0:
        pytest.skip("needs root and mount (tmpfs) to make a small file system")
    try:
        _save(mnt, "step_1", 1.0)
        with pytest.raises(ckpt.CheckpointError, match="no space left on device while writing checkpoint"):
            ckpt.save_checkpoint(mnt, "step_2", {"w": torch.zeros(200_000)}, {"step": 2}, "v: 2\n")
        assert sorted(p.name for p in mnt.iterdir()) == ["step_1"] and _value(mnt / "step_1") == 1.0
    finally:
        os.system(f"umount {mnt}")


def test_weights_file_has_the_mode_of_its_siblings(tmp_path):
    run_dir = _fixture(tmp_path)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (run_dir / "step_4").iterdir()}
    assert len(set(modes.values())) == 1, modes


# ------------------------------------------------------------------------------------------------------------
# The same through the real trainer, killed by strace at each file-system call on the run dir (slow: one
# trainer process per call).

FS_CALLS = ("rename", "renameat", "renameat2", "unlink", "unlinkat", "rmdir")


def _trace_calls(cmd: list[str], run_dir: Path, log: Path, env: dict) -> list[tuple[str, int]]:
    """(syscall, its ordinal in the main thread) of every rename/unlink/rmdir that touches run_dir."""
    import subprocess
    subprocess.run(["strace", "-f", "-qq", "-o", str(log), "-e", "trace=" + ",".join(FS_CALLS), *cmd],
                   env=env, check=True, capture_output=True, timeout=600)
    lines = log.read_text().splitlines()
    main_pid = lines[0].split()[0]
    seen: dict[str, int] = {}
    out = []
    for line in lines:
        pid, rest = line.split(None, 1)
        name = rest.split("(", 1)[0]
        if pid != main_pid or name not in FS_CALLS or "resumed>" in rest:
            continue
        seen[name] = seen.get(name, 0) + 1
        if str(run_dir) in rest:
            out.append((name, seen[name]))
    return out


@pytest.mark.slow
def test_trainer_killed_by_strace_at_each_run_dir_call(tmp_path):
    import subprocess
    import sys

    from trainer_helpers import REPO, build_tiny_sudoku, tiny_overrides, train
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed (apt-get install strace)")
    data = build_tiny_sudoku(tmp_path / "data")
    base = tmp_path / "base"
    extra = {"save_best.metric": "eval/lm_loss", "save_best.mode": "min", "checkpoint_limit": 2}
    train(tiny_overrides(data, base, epochs=2, **extra))
    assert sorted(p.name for p in base.iterdir() if not p.name.endswith((".jsonl", ".txt"))) == ["best", "step_4", "step_8"]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}

    def cmd(run_dir):
        return [sys.executable, str(REPO / "pretrain.py"), *tiny_overrides(data, run_dir, epochs=3, loader_workers=0,
                                                                             **extra)]
    shutil.copytree(base, tmp_path / "probe")
    calls = _trace_calls(cmd(tmp_path / "probe"), tmp_path / "probe", tmp_path / "strace.log", env)
    assert len(calls) >= 8, calls  # step_12 write, best replacement, rotation, lock, logs
    for i, (name, nth) in enumerate(calls):
        run_dir = tmp_path / f"kill{i}"
        shutil.copytree(base, run_dir)
        proc = subprocess.run(["strace", "-f", "-qq", "-o", "/dev/null", "-e", f"trace={name}",
                               "-e", f"inject={name}:signal=KILL:when={nth}", *cmd(run_dir)],
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode != 0, (name, nth, proc.stdout[-500:])
        ckpt.remove_stale_temps(run_dir)  # what the next start does first
        names = {p.name for p in run_dir.iterdir() if not p.name.startswith(".") and p.is_dir()}
        survivors = {"step_8", "best"} | ({"step_4"} if "step_12" not in names else set())
        assert survivors <= names, (name, nth, sorted(names))
        for d in names:
            ckpt.load_weights(run_dir / d)
            ckpt.load_train_state(run_dir / d)
        assert not any(p.name.startswith(".tmp") for p in run_dir.iterdir())
    # and a killed run resumes to the end
    resumed = subprocess.run(cmd(tmp_path / f"kill{len(calls) // 2}"), env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
