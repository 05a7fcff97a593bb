"""solve.py: one puzzle of the user's own through a checkpoint; the answer printed as a grid with the
segments, the Q confidence and the rule check; puzzles that do not fit the checkpoint are refused in one line."""
from __future__ import annotations

import dataclasses
import json

import pytest
import yaml

from trainer_helpers import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_checkpoint(root, seq_len: int, vocab_size: int):
    """An untrained tiny HRM saved as one of our step dirs (what solve.py needs: weights + config.yaml)."""
    from utils.checkpoint import save_checkpoint
    from utils.config import PretrainConfig
    from utils.modeling import build_head
    arch = {"name": "hrm.hrm_act_v1@HierarchicalReasoningModel_ACTV1",
            "loss": {"name": "losses@ACTLossHead", "loss_type": "stablemax_cross_entropy"},
            "hidden_size": 32, "num_heads": 2, "H_layers": 1, "L_layers": 1, "H_cycles": 1, "L_cycles": 2,
            "halt_max_steps": 2, "forward_dtype": "float32", "expansion": 2, "puzzle_emb_ndim": 0,
            "batch_size": 4, "seq_len": seq_len, "vocab_size": vocab_size, "num_puzzle_identifiers": 1}
    head = build_head(arch, {}, seed=0)
    cfg = dataclasses.asdict(PretrainConfig(arch=arch, data_path=str(root / "no-data")))
    return save_checkpoint(root / "run", "step_1", head.state_dict(), None, yaml.safe_dump(cfg))


@pytest.fixture(scope="module")
def sudoku_checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("solve"), 81, 11)


def test_solve_a_tdoku_sudoku_prints_grid_and_rule_check(sudoku_checkpoint, shared_data):
    line = (shared_data / "sudoku-tdoku-test" / "test_puzzles.txt").read_text().splitlines()[0]
    puzzle = line.split(":")[0]
    proc = run_cli(["solve.py", f"checkpoint={sudoku_checkpoint}", f"puzzle={puzzle}", "--steps"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert out.startswith("input:\n. 5 . | . 8 3 | . 1 7\n")  # the puzzle as a grid
    assert "segment 1:" in out and "segment 2 (" in out and "answer:\n" in out
    answer = out.split("answer:\n")[1].split("\n\n")[0].splitlines()
    assert len(answer) == 11 and answer[3] == "------+-------+------"  # 9 rows + 2 box separators
    assert "segments used: 2 of 2 (eval_halting=all); Q confidence sigmoid(q_halt) = " in out
    assert "rule check: FAIL (" in out or "rule check: PASS (" in out  # an untrained model: almost surely FAIL


def test_solve_in_process_checks_the_rules(sudoku_checkpoint, tmp_path, shared_data):
    import solve
    line = (shared_data / "sudoku-tdoku-test" / "test_puzzles.txt").read_text().splitlines()[1]
    f = tmp_path / "p.txt"
    f.write_text(line + "\n")  # a tdoku line `puzzle:rating:solution` read from a file
    res = solve.solve(solve.parse_args([f"checkpoint={sudoku_checkpoint}", f"puzzle={f}"]))
    assert res["task"] == "sudoku" and res["results"][0]["segments"] == 2
    assert res["results"][0]["ok"] is False  # untrained
    # the checker itself on the true solution
    import numpy as np
    q = solve.read_sudoku(line.split(":")[0], 9)
    sol = np.array([int(c) + 1 for c in line.split(":")[2]])
    assert solve.check_sudoku(q, sol, 9)[0]
    bad = sol.copy()
    bad[[0, 1]] = bad[[1, 0]]
    assert solve.check_sudoku(q, bad, 9)[0] is False


@pytest.mark.parametrize("puzzle, message", [
    ("." * 80, "the puzzle has 80 cells; this checkpoint solves 9x9 Sudoku (81 cells"),
    ("x" + "." * 80, "cell 1 holds 'x'; a 9x9 Sudoku takes 1-9, '.' or '0'"),
])
def test_solve_refuses_a_puzzle_that_does_not_fit(sudoku_checkpoint, puzzle, message):
    proc = run_cli(["solve.py", f"checkpoint={sudoku_checkpoint}", f"puzzle={puzzle}"])
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: {message}")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_solve_maze_and_arc_refusals(tmp_path):
    import solve
    maze_ckpt = tiny_checkpoint(tmp_path / "m", 49, 6)
    good = tmp_path / "maze.txt"
    good.write_text("#######\n#     #\n#S# #G#\n#     #\n#     #\n#######\n#######\n")
    res = solve.solve(solve.parse_args([f"checkpoint={maze_ckpt}", f"puzzle={good}"]))
    assert res["task"] == "maze" and res["results"][0]["ok"] is False  # untrained: not a shortest path
    bad = tmp_path / "bad.txt"
    bad.write_text("#######\n#  x  #\n#S# #G#\n#     #\n#     #\n#######\n#######\n")
    with pytest.raises(solve.PuzzleError, match=r"row 2, column 4 holds 'x'"):
        solve.solve(solve.parse_args([f"checkpoint={maze_ckpt}", f"puzzle={bad}"]))
    with pytest.raises(solve.PuzzleError, match="this checkpoint solves 7x7 mazes"):
        solve.solve(solve.parse_args([f"checkpoint={maze_ckpt}", "puzzle=#S G#"]))

    arc_ckpt = tiny_checkpoint(tmp_path / "a", 900, 12)
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"train": [], "test": [{"input": [[0] * 31] * 2}]}))
    with pytest.raises(solve.PuzzleError, match="grid is 2x31; expected at most 30x30"):
        solve.solve(solve.parse_args([f"checkpoint={arc_ckpt}", f"puzzle={big}"]))
    task = tmp_path / "new_task.json"
    task.write_text(json.dumps({"train": [], "test": [{"input": [[1, 2], [3, 4]], "output": [[4, 3], [2, 1]]}]}))
    res = solve.solve(solve.parse_args([f"checkpoint={arc_ckpt}", f"puzzle={task}"]))
    assert res["task"] == "arc" and res["results"][0]["ok"] is False
