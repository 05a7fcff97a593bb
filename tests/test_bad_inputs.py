"""Bad inputs through the real command-line entry points (pretrain.py, evaluate.py, generate.py and the dataset
builders), run in-process: the same `main()` a shell would run, minus the interpreter start. For each case:
a non-zero exit, exactly one `error:` line on stderr that names the key or file, no traceback, and nothing
left behind (no new or changed file in the workspace or the working directory)."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer_helpers import build_tiny_sudoku, tiny_overrides, train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Shared, read-only inputs: a tiny Sudoku set, a 1-step checkpoint on it, a tiny LM set, a 9x9 set."""
    root = tmp_path_factory.mktemp("bad_inputs")
    data = build_tiny_sudoku(root / "sudoku4")
    run = root / "run"
    train(tiny_overrides(data, run, max_steps=1))
    from dataset.build_sudoku_dataset import main as build_sudoku
    build_sudoku(["--generate", "20", "--grid", "9", "--blanks", "10", "--test-size", "8",
                  "--output-dir", str(root / "sudoku9"), "--seed", "0"])
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]
    rng = np.random.default_rng(0)
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(" ".join(rng.choice(words, 60)) for _ in range(40)), encoding="utf-8")
    from dataset.build_lm_dataset import main as build_lm
    build_lm(["--source", str(corpus), "--output-dir", str(root / "lm"), "--vocab-size", "300", "--max-seq-len", "32",
              "--doc-chars", "400", "--val-ratio", "0.1"])
    return {"root": root, "data": data, "run": run, "step": run / "step_1", "sudoku9": root / "sudoku9",
            "corpus": corpus, "lm": root / "lm"}


def _pretrain(argv):
    import pretrain
    old = sys.argv
    sys.argv = ["pretrain.py", *argv]
    try:
        pretrain.main()
    finally:
        sys.argv = old
    return 0


def _module_main(module):
    def run(argv):
        import importlib
        return importlib.import_module(module).main(argv) or 0
    return run


CLIS = {"pretrain": _pretrain, "evaluate": _module_main("evaluate"), "generate": _module_main("generate"),
        "sudoku": _module_main("dataset.build_sudoku_dataset"), "maze": _module_main("dataset.build_maze_dataset"),
        "arc": _module_main("dataset.build_arc_dataset"), "lm": _module_main("dataset.build_lm_dataset")}


def _tiny(ws, case, **extra):
    """pretrain overrides for a 1-step run of the tiny set into `case/run`."""
    extra.setdefault("max_steps", 1)
    return tiny_overrides(extra.pop("data", ws["data"]), case / "run", **extra)


def _copy_run(ws, case) -> Path:
    shutil.copytree(ws["run"], case / "run")
    return case / "run"


def _garbage(path: Path, data: bytes = b"\x00not a checkpoint\xff" * 10) -> Path:
    path.write_bytes(data)
    return path


def _broken_dataset(ws, case, edit) -> Path:
    d = case / "data"
    shutil.copytree(ws["data"], d)
    edit(d)
    return d


def _empty_dataset(d: Path):
    for split in ("train", "test"):
        meta = json.loads((d / split / "dataset.json").read_text())
        for name in meta["sets"]:
            for field, value in (("inputs", np.zeros((0, meta["seq_len"]), np.int32)),
                                 ("labels", np.zeros((0, meta["seq_len"]), np.int32)),
                                 ("puzzle_identifiers", np.zeros(0, np.int32)),
                                 ("puzzle_indices", np.zeros(1, np.int32)), ("group_indices", np.zeros(1, np.int32))):
                np.save(d / split / f"{name}__{field}.npy", value)
        meta["total_groups"] = 0
        (d / split / "dataset.json").write_text(json.dumps(meta))


def _evil_pickle(case) -> Path:
    class Evil:
        def __reduce__(self):
            return (Path.touch, (case / "pwned",))
    path = case / "orig" / "step_5"
    path.parent.mkdir()
    torch.save({"model.inner.x": torch.zeros(1), "payload": Evil()}, path)
    return path


def _held_lock(case):
    """The run dir held by a live run (another open file description of this process: flock conflicts)."""
    import fcntl
    import os
    run = _copy_run_dir_only(case)
    fd = os.open(run / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, b"pid 4242 on otherhost, since earlier")
    _held_lock.fds.append(fd)
    return run


_held_lock.fds = []


def _copy_run_dir_only(case) -> Path:
    (case / "run").mkdir()
    return case / "run"


def _csv(case, name: str, text: bytes) -> Path:
    src = case / "src"
    src.mkdir(exist_ok=True)
    (src / name).write_bytes(text)
    return src


SUDOKU_HEADER = b"source,question,answer,rating\n"
GOOD_ROW = (b"x," + b"." * 81 + b"," + b"123456789" * 9 + b",0\n")

# id -> (setup(ws, case_dir) -> (cli, argv), the text the error line must contain)
CASES = {
    # --- config: keys, types, ranges (refused before any work) ---
    "unknown key": (lambda ws, c: ("pretrain", _tiny(ws, c) + ["lrr=1e-3"]), "'lrr' did you mean 'lr'"),
    "unknown arch key": (lambda ws, c: ("pretrain", _tiny(ws, c) + ["arch.hidden_sizee=32"]), "arch.hidden_sizee"),
    "unknown arch choice": (lambda ws, c: ("pretrain", _tiny(ws, c) + ["arch=hrm_v9"]), "unknown arch 'hrm_v9'"),
    "lr nan": (lambda ws, c: ("pretrain", _tiny(ws, c, lr="nan")), "'lr' must be a finite number"),
    "lr negative": (lambda ws, c: ("pretrain", _tiny(ws, c, lr=-1)), "'lr' must be >= 0.0; got -1.0"),
    "beta1 above 1": (lambda ws, c: ("pretrain", _tiny(ws, c, beta1=1.5)), "'beta1' must be in [0.0, 1.0); got 1.5"),
    "beta2 negative": (lambda ws, c: ("pretrain", _tiny(ws, c, beta2=-0.1)), "'beta2' must be in [0.0, 1.0)"),
    "weight decay negative": (lambda ws, c: ("pretrain", _tiny(ws, c, weight_decay=-1)), "'weight_decay' must be >= 0"),
    "lr_min_ratio 2": (lambda ws, c: ("pretrain", _tiny(ws, c, lr_min_ratio=2)), "'lr_min_ratio' must be in [0.0, 1.0]"),
    "arch float nan": (lambda ws, c: ("pretrain", _tiny(ws, c) + ["arch.halt_exploration_prob=nan"]),
                       "'arch.halt_exploration_prob' must be a finite number"),
    "grad_clip inf": (lambda ws, c: ("pretrain", _tiny(ws, c, grad_clip="inf")), "'grad_clip' must be a finite number"),
    "checkpoint interval 0": (lambda ws, c: ("pretrain", _tiny(ws, c, checkpoint_interval_steps=0)),
                              "'checkpoint_interval_steps' must be >= 1; got 0"),
    "checkpoint interval -3": (lambda ws, c: ("pretrain", _tiny(ws, c, checkpoint_interval_steps=-3)),
                               "'checkpoint_interval_steps' must be >= 1; got -3"),
    "checkpoint limit -1": (lambda ws, c: ("pretrain", _tiny(ws, c, checkpoint_limit=-1)), "'checkpoint_limit' must be >= 0"),
    "warmup -5": (lambda ws, c: ("pretrain", _tiny(ws, c, lr_warmup_steps=-5)), "'lr_warmup_steps' must be >= 0; got -5"),
    "max_steps -1": (lambda ws, c: ("pretrain", _tiny(ws, c, max_steps=-1)), "'max_steps' must be >= 1; got -1"),
    "batch 0": (lambda ws, c: ("pretrain", _tiny(ws, c, global_batch_size=0)), "'global_batch_size' must be >= 1"),
    "epochs not an int": (lambda ws, c: ("pretrain", _tiny(ws, c, epochs="abc")), "'epochs' expects an int"),
    "fp16": (lambda ws, c: ("pretrain", _tiny(ws, c, mixed_precision="fp16")), "'mixed_precision': fp16"),
    "unknown logger": (lambda ws, c: ("pretrain", _tiny(ws, c, logger="tensorboard")), "'logger' must be one of"),
    "nonfinite mode": (lambda ws, c: ("pretrain", _tiny(ws, c, nonfinite_loss="ignore")), "'nonfinite_loss' must be one of"),
    "save_best mode": (lambda ws, c: ("pretrain", _tiny(ws, c) + ["save_best.mode=best"]), "'save_best.mode'"),
    "grad accum not dividing": (lambda ws, c: ("pretrain", _tiny(ws, c, grad_accum_steps=3)), "grad_accum_steps 3"),
    "eval batch 0": (lambda ws, c: ("pretrain", _tiny(ws, c, eval_batch_size=0)), "'eval_batch_size' must be >= 1"),
    # --- optimizer / scheduler values only the library checks ---
    "unknown optimizer": (lambda ws, c: ("pretrain", _tiny(ws, c) + ["optimizer.name=adamz"]), "optimizer.name 'adamz'"),
    "optimizer rejects eps": (lambda ws, c: ("pretrain", _tiny(ws, c) + ["optimizer.name=adamw", "+optimizer.kwargs.eps=-1"]),
                              "optimizer 'adamw' rejected its settings"),
    "scheduler rejects warmup": (lambda ws, c: ("pretrain", _tiny(ws, c, lr_warmup_steps=100)
                                                + ["lr_scheduler.name=cosine_annealing_with_warmup"]),
                                 "lr_scheduler 'cosine_annealing_with_warmup'"),
    # --- datasets ---
    "data_path missing": (lambda ws, c: ("pretrain", _tiny(ws, c, data=c / "nope")), "does not exist"),
    "data_path not a dataset": (lambda ws, c: ("pretrain", _tiny(ws, c, data=c)), "holds neither train/dataset.json"),
    "dataset.json not json": (lambda ws, c: ("pretrain", _tiny(ws, c, data=_broken_dataset(
        ws, c, lambda d: (d / "train" / "dataset.json").write_text("{oops")))), "dataset.json"),
    "dataset array missing": (lambda ws, c: ("pretrain", _tiny(ws, c, data=_broken_dataset(
        ws, c, lambda d: (d / "train" / "all__inputs.npy").unlink()))), "all__inputs.npy"),
    "dataset empty": (lambda ws, c: ("pretrain", _tiny(ws, c, data=_broken_dataset(ws, c, _empty_dataset))),
                      "the train split is empty"),
    "batch larger than data": (lambda ws, c: ("pretrain", _tiny(ws, c, global_batch_size=1024)),
                               "global_batch_size 1024 is larger than one epoch"),
    "metrics log unwritable": (lambda ws, c: ((c / "run" / "metrics.jsonl").mkdir(parents=True),
                                              ("pretrain", _tiny(ws, c)))[1], "cannot write the metrics log"),
    "checkpoint dir is a file": (lambda ws, c: ((c / "f").write_text("x"), ("pretrain", tiny_overrides(
        ws["data"], c / "f" / "run", max_steps=1)))[1], "is not writable"),
    # --- checkpoints ---
    "init_from missing": (lambda ws, c: ("pretrain", _tiny(ws, c, init_from=c / "nope")), "does not exist"),
    "init_from pickled objects": (lambda ws, c: ("pretrain", _tiny(ws, c, init_from=_evil_pickle(c))),
                                  "holds pickled Python objects; refused"),
    "init_from garbage safetensors": (lambda ws, c: ("pretrain", _tiny(ws, c, init_from=_garbage(c / "w.safetensors"))),
                                      "w.safetensors' is not a valid safetensors file"),
    "resume corrupt train state": (lambda ws, c: (_garbage(_copy_run(ws, c) / "step_1" / "train_state.pt"),
                                                  ("pretrain", _tiny(ws, c, max_steps=2)))[1], "train_state.pt"),
    "resume other shapes": (lambda ws, c: (_copy_run(ws, c), ("pretrain", _tiny(ws, c, max_steps=2)
                                                              + ["arch.hidden_size=64", "arch.puzzle_emb_ndim=64"]))[1],
                            "but the config gives"),
    "resume changed seed": (lambda ws, c: (_copy_run(ws, c), ("pretrain", _tiny(ws, c, max_steps=2, seed=7)))[1],
                            "with seed changed (0 -> 7)"),
    "run dir locked": (lambda ws, c: (_held_lock(c), ("pretrain", _tiny(ws, c)))[1],
                       "is in use by another run (pid 4242 on otherhost"),
    # --- evaluate.py ---
    "evaluate no checkpoint arg": (lambda ws, c: ("evaluate", []), "checkpoint="),
    "evaluate missing checkpoint": (lambda ws, c: ("evaluate", [f"checkpoint={c / 'nope'}"]), "does not exist"),
    "evaluate unknown key": (lambda ws, c: ("evaluate", [f"chekpoint={ws['step']}"]), "'chekpoint'"),
    "evaluate bad batch": (lambda ws, c: ("evaluate", [f"checkpoint={ws['step']}", "eval_batch_size=abc"]),
                           "'eval_batch_size' expects an integer"),
    "evaluate shapes do not fit data": (lambda ws, c: ("evaluate", [f"checkpoint={ws['step']}", f"data_path={ws['sudoku9']}",
                                                                    f"output_dir={c / 'out'}"]), "does not fit data_path"),
    "evaluate on an LM set": (lambda ws, c: ("evaluate", [f"checkpoint={ws['step']}", f"data_path={ws['lm']}",
                                                          f"output_dir={c / 'out'}"]), "does not fit data_path"),
    # --- builders ---
    "sudoku csv not utf-8": (lambda ws, c: ("sudoku", ["--source", str(_csv(c, "train.csv", SUDOKU_HEADER + b"x,\xff\xfe" + GOOD_ROW[3:]) and _csv(c, "test.csv", SUDOKU_HEADER + GOOD_ROW)),
                                                       "--output-dir", str(c / "out")]), "train.csv:2: not UTF-8"),
    "sudoku csv 3 columns": (lambda ws, c: ("sudoku", ["--source", str(_csv(c, "train.csv", SUDOKU_HEADER + b"a,b,c\n") and _csv(c, "test.csv", SUDOKU_HEADER + GOOD_ROW)),
                                                       "--output-dir", str(c / "out")]), "train.csv:2: expected 4 columns"),
    "maze csv not utf-8": (lambda ws, c: ("maze", ["--source", str(_csv(c, "train.csv", SUDOKU_HEADER + b"\xff\xfe,a,b,0\n") and _csv(c, "test.csv", SUDOKU_HEADER)),
                                                   "--output-dir", str(c / "out")]), "train.csv:2: not UTF-8"),
    "arc input missing": (lambda ws, c: ("arc", ["--dataset-dirs", str(c / "nope"), "--output-dir", str(c / "out")]), "nope"),
    "lm source missing": (lambda ws, c: ("lm", ["--source", str(c / "nope.txt"), "--output-dir", str(c / "out")]), "nope.txt"),
    "lm text not utf-8": (lambda ws, c: ("lm", ["--source", str(_garbage(c / "bad.txt", b"ok text\n\xff\xfe\xfa" * 50)),
                                                "--output-dir", str(c / "out")]), "bad.txt: not UTF-8"),
    "lm ratios sum past 1": (lambda ws, c: ("lm", ["--source", str(ws["corpus"]), "--output-dir", str(c / "out"),
                                                   "--val-ratio", "0.6", "--test-ratio", "0.5"]), "--val-ratio + --test-ratio"),
    "lm too few documents": (lambda ws, c: ("lm", ["--source", str((c / "two.txt").write_text("one doc\n\nanother doc") and c / "two.txt"),
                                                   "--output-dir", str(c / "out"), "--doc-chars", "5"]), "cannot fill train, validation and test"),
    "lm mix zero weight": (lambda ws, c: ("lm", ["mix", "--inputs", f"{ws['lm']}:0", "--output-dir", str(c / "out")]),
                           "weight for"),
    # --- LM data in training ---
    "lm meta.json broken": (lambda ws, c: ("pretrain", tiny_overrides(_lm_copy(ws, c, lambda d: (d / "meta.json").write_text("[1, 2")),
                                                                      c / "run", max_steps=1)), "meta.json"),
    # --- generation ---
    "generate missing checkpoint": (lambda ws, c: ("generate", [f"checkpoint={c / 'nope'}", "prompt=hi"]), "nope"),
    "generate unknown key": (lambda ws, c: ("generate", [f"checkpoint={ws['step']}", "temprature=0.5"]), "'temprature'"),
    "generate bad number": (lambda ws, c: ("generate", [f"checkpoint={ws['step']}", "max_new_tokens=lots"]),
                            "'max_new_tokens' expects int"),
    "generate zero tokens": (lambda ws, c: ("generate", [f"checkpoint={ws['step']}", "max_new_tokens=0"]), "max_new_tokens"),
    "generate puzzle checkpoint": (lambda ws, c: ("generate", [f"checkpoint={ws['step']}", "prompt=hi"]), "step_1"),
}


def _lm_copy(ws, case, edit) -> Path:
    d = case / "lm"
    shutil.copytree(ws["lm"], d)
    edit(d)
    return d


def _snapshot(*roots: Path) -> dict:
    out = {}
    for root in roots:
        for p in root.rglob("*"):
            st = p.lstat()
            out[str(p)] = (p.is_dir(), st.st_size if p.is_file() else 0, st.st_mtime_ns if p.is_file() else 0)
    return out


def test_at_least_40_distinct_cases():
    assert len(CASES) >= 40


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_error(name, ws, tmp_path, monkeypatch, capsys):
    setup, expected = CASES[name]
    case = tmp_path / "case"
    case.mkdir()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # anything written relative to the working directory shows up here
    cli, argv = setup(ws, case)
    before = _snapshot(ws["root"], case, cwd)
    capsys.readouterr()
    try:
        code = CLIS[cli]([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    finally:
        import os
        while _held_lock.fds:
            os.close(_held_lock.fds.pop())
    out, err = capsys.readouterr()
    error_lines = [line for line in err.splitlines() if line.startswith("error:") or ": error: " in line]
    assert code not in (0, None), (name, out[-500:], err[-2000:])
    assert len(error_lines) == 1, (name, err[-2000:])
    assert expected in error_lines[0], (name, error_lines[0])
    assert "Traceback" not in err and "Traceback" not in out, (name, err[-3000:])
    after = _snapshot(ws["root"], case, cwd)
    assert after == before, (name, sorted(set(after) ^ set(before)) or
                             [k for k in after if after[k] != before.get(k)])
    assert not (case / "pwned").exists()
