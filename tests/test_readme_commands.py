"""Every shell command of README.md (```bash blocks and inline `code` that starts with a program) and of the
header comments of config/experiment/*.yaml is runnable as written.

The commands run in document order in a sandbox: a directory whose entries link to this checkout's (so
`data/`, `checkpoints/` and `multirun/` are the sandbox's own), with the venv activated, as the README says.
- Cheap commands run for real. Training runs get extra overrides that keep them to seconds (a tiny model,
  max_steps=2, a small 6x6 Sudoku under the README's data path); nothing else in them changes.
- Long GPU recipes are checked without running: torchrun's own argument parser takes the launcher flags, then
  Hydra composes the training config and our validation checks it (`pretrain.py ... --cfg job`), and dataset
  builders with placeholders (`<dir>`) get their arguments checked by the builder's argparse parser.
- A few commands cannot run here at all (CUDA-only pip builds, the set-up that would install another torch,
  the test suite itself): their program and scripts are checked to exist and parse.
A command no rule covers fails the test, naming it: add a rule rather than skip it."""
from __future__ import annotations

import argparse
import importlib
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from trainer_helpers import TINY_ARCH

REPO = Path(__file__).resolve().parents[1]
PROGRAMS = ("python", "python3", "torchrun", "bash", "pip")
RUN_ARTEFACTS = {"data", "checkpoints", "multirun", "outputs", "wandb", "runs", "cache", ".git", ".pytest_cache"}
CHEAP_EXPERIMENTS = {"sudoku_cpu_demo"}  # the CPU demo; every other recipe is a multi-GPU-hour run
TINY_RUN = {"max_steps": "2", "global_batch_size": "16", "eval_batch_size": "32", "max_eval_batches": "2",
            "loader_workers": "0", "data_path": "data/sudoku-6x6-demo"}
TIMEOUT_S = 300
LM_ARCHS = ("hrm_lm", "lm_transformer")  # arch choices (prefixes) that train on LM datasets


@dataclass
class Command:
    source: str  # file:line
    text: str

    def __str__(self) -> str:
        return f"{self.source}: {self.text}"


def _first_program(words: list[str]) -> tuple[dict, list[str]]:
    env = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        key, value = words[0].split("=", 1)
        env[key] = value
        words = words[1:]
    return env, words


def _is_command(text: str) -> bool:
    try:
        _, words = _first_program(shlex.split(text, comments=True))
    except ValueError:
        return False
    return len(words) >= 2 and os.path.basename(words[0]) in PROGRAMS  # a bare `python` names, not runs


def readme_commands(path: Path = REPO / "README.md") -> list[Command]:
    out, lines, block, pending, start = [], path.read_text().splitlines(), False, "", 0
    for no, line in enumerate(lines, 1):
        if line.strip().startswith("```"):
            block = line.strip() in ("```bash", "```sh", "```shell")
            continue
        if block:
            if pending == "":
                start = no
            stripped = line.strip()
            if stripped.endswith("\\"):
                pending += stripped[:-1] + " "
                continue
            text = (pending + stripped).strip()
            pending = ""
            if text and not text.startswith("#"):
                out.append(Command(f"README.md:{start}", text))
            continue
        for span in re.findall(r"`([^`]+)`", line):
            if _is_command(span):
                out.append(Command(f"README.md:{no}", span))
    return out


def experiment_commands() -> list[Command]:
    out = []
    for path in sorted((REPO / "config" / "experiment").glob("*.yaml")):
        pending, start = "", 0
        for no, line in enumerate(path.read_text().splitlines(), 1):
            if not line.startswith("#"):
                break  # the header ends at the first YAML line
            m = re.match(r"#\s{3,}(\S.*)$", line)
            if not m and not pending:
                continue
            text = m.group(1).rstrip() if m else ""
            if not pending:
                start = no
            if text.endswith("\\"):
                pending += text[:-1] + " "
                continue
            text = (pending + text).strip()
            pending = ""
            if _is_command(text):
                out.append(Command(f"config/experiment/{path.name}:{start}", text))
    return out


# ------------------------------------------------------------------------------------------------
# the sandbox


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    box = tmp_path_factory.mktemp("fresh_clone")
    for entry in REPO.iterdir():
        if entry.name not in RUN_ARTEFACTS:
            (box / entry.name).symlink_to(entry)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    venv = REPO / ".venv"
    env.update({"VIRTUAL_ENV": str(venv), "PATH": f"{venv / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}",
                "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "WANDB_SILENT": "true"})
    # the README's demo data path, built small (the demo builds 20,000 puzzles when it is missing)
    subprocess.run([sys.executable, "-m", "dataset.build_sudoku_dataset", "--generate", "96", "--grid", "6",
                    "--blanks", "8..12", "--test-size", "32", "--seed", "0", "--output-dir", "data/sudoku-6x6-demo"],
                   cwd=box, env=env, check=True, capture_output=True)
    return box, env


def _run(box: Path, env: dict, text: str, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", "-c", text], cwd=box, env={**env, **(extra_env or {})}, capture_output=True,
                          text=True, timeout=TIMEOUT_S)
    return proc


def _newest_step(box: Path, lm: bool) -> str:
    steps = [p for p in (box / "checkpoints").glob("*/*/*") if p.is_dir() and (p / "model.safetensors").is_file()
             and (p / "tokenizer.json").is_file() == lm]
    assert steps, f"no {'LM' if lm else 'puzzle'} checkpoint in the sandbox yet"
    return str(max(steps, key=lambda p: p.stat().st_mtime).relative_to(box))


def _placeholder(word: str) -> bool:
    return "PLACEHOLDER" in word or "path/to/" in word or "..." in word


def _tiny_pretrain_args(args: list[str]) -> list[str]:
    given = {a.split("=", 1)[0].lstrip("+") for a in args if "=" in a}
    arch = next((a.split("=", 1)[1] for a in args if a.startswith("arch=")), "hrm_v1")
    extra = [f"{k}={v}" for k, v in TINY_RUN.items() if k not in given]
    experiment = next((a.split("=", 1)[1] for a in args if a.startswith("experiment=")), None)
    if experiment and "data_path" not in given:
        extra = [e for e in extra if not e.startswith("data_path=")]  # the recipe names its own data
    if not arch.startswith(LM_ARCHS):
        extra += [a for a in TINY_ARCH if a.split("=", 1)[0] not in given]
    return args + extra


class ParsedOnly(Exception):
    pass


def _builder_parses(module: str, argv: list[str]) -> None:
    """The builder's own argparse parser accepts argv (its main() stops right after parsing)."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        original(self, args, namespace)
        raise ParsedOnly

    mod = importlib.import_module(module)
    argparse.ArgumentParser.parse_args = parse_then_stop
    try:
        with pytest.raises(ParsedOnly):
            mod.main(argv)
    finally:
        argparse.ArgumentParser.parse_args = original


class Checker:
    """Checks commands in order. full=False (the default suite) runs for real what a new user runs first -
    the demo, the first of each evaluate/generate, the cheap dataset builds, the LM trio - and checks the
    rest without running it (Hydra composes and validates every job, argparse parses); full=True (-m slow)
    runs every cheap command for real, sweeps and repeats included."""

    def __init__(self, box: Path, env: dict, full: bool):
        self.box, self.env, self.full = box, env, full
        self.seen: set[str] = set()

    def first(self, kind: str) -> bool:
        new = kind not in self.seen
        self.seen.add(kind)
        return new or self.full

    def run(self, cmd: Command, text: str, extra_env: dict | None = None, what: str = "ran") -> str:
        proc = _run(self.box, self.env, text, extra_env)
        assert proc.returncode == 0, f"{cmd}\n`{text}` exited {proc.returncode}:\n{proc.stdout[-1500:]}\n{proc.stderr[-2500:]}"
        assert "Traceback" not in proc.stderr, f"{cmd}\n{proc.stderr[-2500:]}"
        return what

    def missing_run(self, arg: str) -> bool:
        """`arg` names a run artefact (checkpoints/...) that only a long run would have made."""
        value = arg.split("=", 1)[-1]
        return value.startswith("checkpoints/") and not (self.box / value).exists()

    def check(self, cmd: Command) -> str:
        """Run or check one command; returns what was done; fails the test when the command fails."""
        # <placeholders> (which may hold spaces) become one word; a user types a path there
        env_words, words = _first_program(shlex.split(re.sub(r"<[^<>]+>", "PLACEHOLDER", cmd.text), comments=True))
        prog, args = os.path.basename(words[0]), words[1:]
        run = lambda text, extra=None, what="ran": self.run(cmd, text, {**env_words, **(extra or {})}, what)  # noqa: E731
        if prog == "torchrun":
            from torch.distributed.run import get_args_parser
            ns = get_args_parser().parse_args(args)  # torchrun's own flags
            return "torchrun flags parsed; " + self.script(cmd, ns.training_script, list(ns.training_script_args),
                                                            run, multi_gpu=True)
        if prog == "bash":
            script = args[0]
            if script == "scripts/demo.sh":
                if self.first("demo"):
                    return run(shlex.join(["bash", script, *_tiny_pretrain_args(args[1:])]), {"SKIP_SETUP": "1"},
                               "ran (SKIP_SETUP=1, tiny overrides)")
                recipe = "trm_cpu_demo" if "arch=trm" in args[1:] else "sudoku_cpu_demo"  # as demo.sh picks it
                rest = [a for a in args[1:] if a != "arch=trm"]
                return self.script(cmd, "pretrain.py", [f"experiment={recipe}", *rest], run, multi_gpu=True)
            # .ci/run runs this suite and scripts/setup.sh (re)installs torch: they must parse, what they call exist
            assert (self.box / script).is_file(), f"{cmd}: {script} does not exist"
            run(f"bash -n {shlex.quote(script)}")
            if script == ".ci/run":
                assert (self.box / "scripts" / "setup.sh").is_file()
            return "bash -n (not run: it would run the suite / reinstall torch)"
        if prog == "pip":
            assert Path(words[0] if "/" in words[0] else REPO / ".venv" / "bin" / "pip").exists(), str(cmd)
            assert args[:1] == ["install"], str(cmd)
            return "pip exists (not run: CUDA builds)"
        if prog in ("python", "python3"):
            if args[:1] == ["-m"]:
                module, rest = args[1], args[2:]
                if module == "pytest":
                    return run(shlex.join([words[0], "-m", "pytest", "--version"]), what="pytest runs (not run: it is this suite)")
                slow_build = any(re.fullmatch(r"\d{5,}", a) for a in rest)  # e.g. --generate 20000
                if module.startswith("dataset.build_") and (any(_placeholder(a) for a in rest) or
                                                             (slow_build and not self.full)):
                    _builder_parses(module, ["src" if _placeholder(a) else a for a in rest])
                    return "builder parser accepts the arguments"
                if any(_placeholder(a) or self.missing_run(a) for a in rest):  # another tool, with `...` or the
                    # checkpoints of a long run for its arguments
                    return run(shlex.join([words[0], "-m", module, "--help"]), what="--help works")
                return run(shlex.join([words[0], "-m", module, *rest]))
            return self.script(cmd, args[0], args[1:], run, multi_gpu=False, python=words[0])
        raise AssertionError(f"{cmd}: no rule of {__name__} covers program '{prog}'")

    def script(self, cmd: Command, script: str, args: list[str], run, multi_gpu: bool, python: str = "python") -> str:
        name = os.path.basename(script)
        if name == "pretrain.py":
            experiment = next((a.split("=", 1)[1] for a in args if a.startswith("experiment=")), None)
            if "--help" in args or "-h" in args:
                return run(shlex.join([python, script, *args]))
            lm = any(a.startswith(tuple(f"arch={name}" for name in LM_ARCHS)) for a in args)
            real = not (multi_gpu or "--cfg" in args or (experiment and experiment not in CHEAP_EXPERIMENTS)) and (
                self.full or (lm and self.first("lm-pretrain")))
            if not real:  # Hydra composes (every job of a sweep) and our validation checks it
                text = shlex.join([python, script, *args] + ([] if "--cfg" in args else ["--cfg", "job"]))
                return run(text, what="Hydra composed and validated (--cfg job)")
            return run(shlex.join([python, script, *_tiny_pretrain_args(args)]), what="trained (tiny overrides)")
        if name in ("evaluate.py", "generate.py"):
            fixed = []
            for a in args:
                key, _, value = a.partition("=")
                if key == "checkpoint" and (_placeholder(value) or not (self.box / value).exists()):
                    a = f"checkpoint={_newest_step(self.box, lm=name == 'generate.py')}"
                elif key == "data_path" and not (self.box / value).exists():
                    a = "data_path=data/sudoku-6x6-demo"
                fixed.append(a)
            if multi_gpu or not self.first(name):  # its own argument parser
                importlib.import_module(name[:-3]).parse_args(fixed)
                return "argument parser accepts the arguments"
            return run(shlex.join([python, script, *fixed]), what="ran (placeholders -> sandbox checkpoint/data)")
        # another entry point (solve.py, visualize.py, ...): at least its --help must work
        return run(shlex.join([python, script, "--help"]), what="--help works")


def test_the_readme_and_recipe_headers_hold_commands():
    readme, recipes = readme_commands(), experiment_commands()
    assert len(readme) >= 15 and any("demo.sh" in c.text for c in readme)
    assert {Path(c.source.split(":")[0]).stem for c in recipes} >= {"arc_1", "sudoku_extreme_1k", "maze_30x30_hard_1k"}


@pytest.mark.parametrize("full", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["first-runs", "all-runs"])
def test_every_command_runs_as_written(sandbox, full):
    import time
    checker = Checker(*sandbox, full=full)
    for cmd in readme_commands() + experiment_commands():
        t0 = time.perf_counter()
        what = checker.check(cmd)
        print(f"{time.perf_counter() - t0:5.1f} s  {cmd} -> {what}", flush=True)
