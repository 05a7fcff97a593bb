"""Run a trained checkpoint on one puzzle of your own and print its answer.

    python solve.py checkpoint=checkpoints/demo/sudoku-6x6/step_2496 puzzle="6.1.4353461.246.5131.264.521..163425"
    python solve.py checkpoint=... puzzle=my_sudoku.txt --steps      # each segment's answer as it refines
    python solve.py checkpoint=... puzzle=maze.txt                    # text rows of '#', ' ', 'S', 'G'
    python solve.py checkpoint=... puzzle=task.json                   # an ARC task (its test inputs)

The checkpoint decides the puzzle kind (from its vocabulary and sequence length): Sudoku (an n*n-character
string or file, '.' or '0' blank; a `puzzle:...` line of a tdoku-style file works too), maze (side lines of
side characters) or ARC (a task JSON with "test": [{"input": grid}, ...], grids up to 30x30).
Printed: the input, the answer as a grid, the segments used and the Q confidence sigmoid(q_halt); then a
check where one exists: Sudoku rules (rows, columns, boxes, givens kept), maze path validity and
shortest length, for ARC the task's test output if the JSON has one.

ARC and unseen tasks: HRM sees only the test input; what a task asks it learns through that task's
puzzle embedding, trained on the task's demonstration pairs. A task found (by name) in the dataset's
identifiers.json uses its own embedding; any other task runs with the blank embedding (id 0, never
trained), so its answer is not expected to be right; to solve a new task, add it to an ARC dataset and
train or fine-tune (init_from=...) on its demonstration pairs.
The inference keys (eval_halting, eval_max_segments, eval_samples, eval_noise_std, eval_select, seed)
work as in evaluate.py."""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from utils.config import check_eval_keys
from utils.schema import ConfigError, apply_key_values

INFERENCE_OPTIONS = ("eval_halting", "eval_max_segments", "eval_samples", "eval_noise_std", "eval_select", "seed")
OPTIONS = ("checkpoint", "puzzle", "data_path", "device") + INFERENCE_OPTIONS
INT_OPTIONS = ("eval_max_segments", "eval_samples", "seed")
SUDOKU_BOXES = {4: (2, 2), 6: (2, 3), 9: (3, 3)}


class PuzzleError(ValueError):
    """A puzzle that does not fit the checkpoint; one line."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="solve.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="key=value, keys: " + ", ".join(OPTIONS))
    parser.add_argument("--steps", action="store_true", help="print each segment's answer")
    args = parser.parse_intermixed_args(argv)  # --steps may stand between key=value words
    for key in OPTIONS:
        setattr(args, key, None)
    apply_key_values(args, args.overrides, OPTIONS, ints=INT_OPTIONS, floats=("eval_noise_std",))
    for key in ("checkpoint", "puzzle"):
        if not getattr(args, key):
            raise ConfigError(f"{key}=... is required (python solve.py checkpoint=<step dir> puzzle=<puzzle or file>)")
    check_eval_keys({k: getattr(args, k) for k in INFERENCE_OPTIONS if getattr(args, k) is not None})
    return args


# ------------------------------------------------------------------------------------------------
# reading a puzzle

def _text(puzzle: str) -> str:
    path = Path(puzzle)
    try:
        if path.is_file():
            return path.read_text()
    except OSError:  # a long puzzle string is not a file name
        pass
    return puzzle


def read_sudoku(puzzle: str, side: int) -> np.ndarray:
    """-> tokens [side*side]: blank 1, digit d -> d + 1 (dataset/build_sudoku_dataset.py)."""
    text = _text(puzzle)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if len(lines) == 1 and ":" in lines[0]:
        lines = [lines[0].split(":", 1)[0]]  # tdoku / CSV-like `puzzle:...` line
    cells = "".join(ch for ch in "".join(lines) if ch not in " |+-\t")
    if len(cells) != side * side:
        raise PuzzleError(f"the puzzle has {len(cells)} cells; this checkpoint solves {side}x{side} Sudoku "
                          f"({side * side} cells, '.' or '0' for blanks)")
    out = np.ones(side * side, dtype=np.int32)
    for i, ch in enumerate(cells):
        if ch in ".0":
            continue
        if not ch.isdigit() or not 1 <= int(ch) <= side:
            raise PuzzleError(f"cell {i + 1} holds {ch!r}; a {side}x{side} Sudoku takes 1-{side}, '.' or '0'")
        out[i] = int(ch) + 1
    return out


def read_maze(puzzle: str, side: int) -> np.ndarray:
    """-> tokens [side*side] from side text rows of '#', ' ', 'S', 'G' (dataset/build_maze_dataset.py)."""
    from dataset.build_maze_dataset import CHARSET
    rows = [ln.rstrip("\n") for ln in _text(puzzle).splitlines()]
    while rows and not rows[-1].strip():
        rows.pop()
    if len(rows) != side or any(len(r) != side for r in rows):
        sizes = sorted({len(r) for r in rows})
        raise PuzzleError(f"the maze has {len(rows)} rows of {'/'.join(map(str, sizes)) or 0} characters; "
                          f"this checkpoint solves {side}x{side} mazes")
    out = np.zeros(side * side, dtype=np.int32)
    for r, row in enumerate(rows):
        for c, ch in enumerate(row):
            if ch not in CHARSET[:4]:
                raise PuzzleError(f"row {r + 1}, column {c + 1} holds {ch!r}; a maze takes '#', ' ', 'S', 'G'")
            out[r * side + c] = CHARSET.index(ch) + 1
    counts = {ch: int((out == CHARSET.index(ch) + 1).sum()) for ch in "SG"}
    if counts != {"S": 1, "G": 1}:
        raise PuzzleError(f"the maze has {counts['S']} S and {counts['G']} G; expected exactly one of each")
    return out


def read_arc(puzzle: str) -> tuple[str, list[np.ndarray], list]:
    """-> (task name, test input grids, test outputs or None each) from an ARC task JSON."""
    from dataset.build_arc_dataset import _grid as arc_grid  # the builder's own grid validation
    from dataset.common import DatasetError
    path = Path(puzzle)
    if not path.is_file():
        raise PuzzleError(f"'{puzzle}' is not a file; an ARC puzzle is a task JSON file")
    try:
        task = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PuzzleError(f"{path}: not valid JSON ({e})") from None
    tests = task.get("test") if isinstance(task, dict) else None
    if not isinstance(tests, list) or not tests or not all(isinstance(t, dict) and "input" in t for t in tests):
        raise PuzzleError(f"{path}: expected a task object whose 'test' is a list of {{\"input\": grid}}")
    try:
        inputs = [arc_grid(t["input"], f"{path}: test[{i}].input") for i, t in enumerate(tests)]
        outputs = [arc_grid(t["output"], f"{path}: test[{i}].output") if "output" in t else None
                   for i, t in enumerate(tests)]
    except DatasetError as e:
        raise PuzzleError(str(e)) from None
    return str(task.get("name", path.stem)), inputs, outputs


# ------------------------------------------------------------------------------------------------
# showing and checking an answer

def show_sudoku(tokens: np.ndarray, side: int) -> str:
    br, bc = SUDOKU_BOXES[side]
    g = np.asarray(tokens).reshape(side, side)
    lines = []
    for r in range(side):
        if r and r % br == 0:
            lines.append("-+-".join("-" * (2 * bc - 1) for _ in range(side // bc)))
        cells = ["." if v <= 1 else (str(v - 1) if v - 1 <= side else "?") for v in g[r]]
        lines.append(" | ".join(" ".join(cells[c:c + bc]) for c in range(0, side, bc)))
    return "\n".join(lines)


def check_sudoku(question: np.ndarray, answer: np.ndarray, side: int) -> tuple[bool, str]:
    from dataset.build_sudoku_dataset import invalid_solution_rows
    digits = np.asarray(answer) - 1
    if ((digits < 1) | (digits > side)).any():
        return False, f"{int(((digits < 1) | (digits > side)).sum())} cells are not filled with a digit"
    given = np.asarray(question) > 1
    if (answer[given] != question[given]).any():
        return False, f"changes {int((answer[given] != question[given]).sum())} of the {int(given.sum())} givens"
    if invalid_solution_rows(digits[None], side)[0]:
        return False, "a row, column or box repeats a digit"
    return True, f"valid: every row, column and box holds 1-{side} once, all {int(given.sum())} givens kept"


def show_maze(tokens: np.ndarray, side: int) -> str:
    from dataset.build_maze_dataset import CHARSET
    return "\n".join("".join(CHARSET[v - 1] if 1 <= v <= len(CHARSET) else "?" for v in row)
                     for row in np.asarray(tokens).reshape(side, side))


def show_arc(grid: np.ndarray) -> str:
    return "\n".join(" ".join(str(int(v)) for v in row) for row in grid) if grid.size else "(empty grid)"


# ------------------------------------------------------------------------------------------------

def solve(args: argparse.Namespace) -> dict:
    """Load, read the puzzle, run, print. Returns what was printed as data (for tests)."""
    import torch

    from utils.checkpoint import load_model_from_checkpoint
    from utils.eval_metrics import check_maze_path, task_from_shape
    from utils.inference import InferenceSettings, infer_batch, sample_generator, supports_segments
    from utils.modeling import autocast_context

    device = torch.device("cuda" if (args.device or "auto") == "auto" and torch.cuda.is_available()
                          else ("cpu" if (args.device or "auto") == "auto" else args.device))
    cfg, head = load_model_from_checkpoint(args.checkpoint, device=device, data_path=args.data_path)
    model = head.model
    if not supports_segments(model) or not hasattr(head, "score"):
        raise PuzzleError(f"{type(model).__name__} is not a puzzle model (solve.py runs ACT puzzle checkpoints)")
    seq_len, vocab = model.config.seq_len, model.config.vocab_size
    task = task_from_shape(vocab, seq_len)
    side = math.isqrt(seq_len)
    pid, notes, expected = 0, [], []
    if task == "sudoku":
        questions = [read_sudoku(args.puzzle, side)]
    elif task == "maze":
        questions = [read_maze(args.puzzle, side)]
    elif task == "arc":
        from dataset.build_arc_dataset import encode_grid
        name, grids, expected = read_arc(args.puzzle)
        questions = [encode_grid(g, 0, 0).astype(np.int32) for g in grids]
        ids_file = Path(args.data_path or cfg.data_path) / "identifiers.json"
        identifiers = json.loads(ids_file.read_text()) if ids_file.is_file() else []
        if name in identifiers:
            pid = identifiers.index(name)
            notes.append(f"ARC task '{name}': puzzle id {pid} of {ids_file} (its trained embedding)")
        else:
            where = f"not in {ids_file}" if ids_file.is_file() else f"no identifiers.json at {ids_file}"
            notes.append(f"ARC task '{name}' is unseen ({where}): it runs with the blank puzzle embedding "
                         "(id 0, never trained), so HRM does not know what this task asks and the answer is not "
                         "expected to be right; train or fine-tune on its demonstration pairs to solve it")
    else:
        raise PuzzleError(f"this checkpoint's format (vocab {vocab}, {seq_len} tokens) is not Sudoku, maze or ARC")

    settings = InferenceSettings(
        halting=args.eval_halting or cfg.eval_halting, samples=args.eval_samples or cfg.eval_samples,
        max_segments=args.eval_max_segments or cfg.eval_max_segments,
        noise_std=cfg.eval_noise_std if args.eval_noise_std is None else args.eval_noise_std,
        select=args.eval_select or cfg.eval_select, seed=cfg.seed if args.seed is None else args.seed)
    rows = len(questions)
    batch = {"inputs": torch.from_numpy(np.stack(questions)).to(device),
             "labels": torch.full((rows, seq_len), -100, dtype=torch.int32, device=device),
             "puzzle_identifiers": torch.full((rows,), pid, dtype=torch.int32, device=device)}
    with torch.inference_mode(), autocast_context(device, cfg.mixed_precision):
        _, out = infer_batch(head, batch, settings, generator=sample_generator(settings, 0, device),
                             capture_segments=True)
    answers = torch.argmax(out["logits"], dim=-1).cpu().numpy()
    segments = out["segment_preds"].cpu().numpy()
    steps = out["steps"].cpu().tolist()
    conf = torch.sigmoid(out["q_halt_logits"].float()).cpu().tolist()
    budget = settings.max_segments or model.config.halt_max_steps

    def show(tokens, i):
        if task == "sudoku":
            return show_sudoku(tokens, side)
        if task == "maze":
            return show_maze(tokens, side)
        from dataset.common import arc_grid_from_tokens
        return show_arc(arc_grid_from_tokens(tokens))

    results = []
    for note in notes:
        print(note)
    for i, q in enumerate(questions):
        title = f" (test input {i + 1} of {rows})" if rows > 1 else ""
        print(f"input{title}:\n{show(q, i)}\n")
        if args.steps:
            for s in range(steps[i]):
                changed = int((segments[i, s] != segments[i, s - 1]).sum()) if s else None
                print(f"segment {s + 1}" + (f" ({changed} cells changed)" if changed is not None else "") +
                      f":\n{show(segments[i, s], i)}\n")
        print(f"answer:\n{show(answers[i], i)}\n")
        print(f"segments used: {steps[i]} of {budget} (eval_halting={settings.halting}); "
              f"Q confidence sigmoid(q_halt) = {conf[i]:.3f}" +
              (f"; {settings.samples} samples, chosen by {settings.select}" if settings.samples > 1 else ""))
        ok, reason = None, None
        if task == "sudoku":
            ok, reason = check_sudoku(q, answers[i], side)
            print(f"rule check: {'PASS' if ok else 'FAIL'} ({reason})")
        elif task == "maze":
            ok, reason = check_maze_path(q, answers[i])
            print(f"path check: {'PASS' if ok else 'FAIL'} ({reason})")
        elif expected and expected[i] is not None:
            from dataset.common import arc_grid_from_tokens
            ok = np.array_equal(arc_grid_from_tokens(answers[i]), expected[i])
            reason = "the task's test output"
            print(f"check: {'matches' if ok else 'does not match'} the task's test output")
        else:
            print("check: none for ARC without a test output in the JSON")
        results.append({"answer": answers[i], "segments": steps[i], "q_confidence": conf[i], "ok": ok, "reason": reason})
    return {"task": task, "results": results}


def main(argv: list[str] | None = None) -> None:
    from utils.checkpoint import CheckpointError
    try:
        solve(parse_args(sys.argv[1:] if argv is None else argv))
    except (ConfigError, CheckpointError, PuzzleError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
