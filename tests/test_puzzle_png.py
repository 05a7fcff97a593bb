"""The PNG renderer (known grids -> known colours at known pixels), the example panel a training eval
logs (PNG in the run dir, W&B offline media), and evaluate.py's per-segment answers and accuracy plot."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from utils import puzzle_view as pv
from trainer_helpers import build_tiny_sudoku, tiny_overrides, train

pytestmark = pytest.mark.usefixtures("one_thread")


def rgb(hex_color: str) -> tuple[int, int, int]:
    return tuple(int(hex_color[i:i + 2], 16) for i in (1, 3, 5))


def grid_origin(title: bool) -> tuple[int, int]:
    """Top-left pixel of the first row's first grid (render_panel's layout constants)."""
    top = pv.MARGIN + (pv.CAPTION_H + 4 if title else 0)
    return pv.MARGIN, top + pv.CAPTION_H + pv.TITLE_H


def test_maze_grid_colours_and_wrong_ring_at_known_pixels():
    style = pv.make_style("maze", 9, 6)
    tokens = np.array([1, 1, 1, 3, 5, 4, 1, 2, 1])  # wall row; start, path, goal; wall open wall
    label = tokens.copy()
    pred = tokens.copy()
    pred[4] = 2  # the path cell predicted open: wrong
    img = pv.example_panel(style, tokens[None], label[None], pred[None], [0])
    cp = pv.cell_px(style)
    assert cp == 28
    x0, y0 = grid_origin(title=False)
    px = img.load()
    for k, t in enumerate(tokens):
        r, c = divmod(k, 3)
        assert px[x0 + c * cp + cp // 2, y0 + r * cp + cp // 2] == rgb(pv.MAZE_COLORS[t]), (r, c)
    # The prediction is the third grid: its wrong cell (1, 1) has a red ring, then a white one, then its colour.
    xp = x0 + 2 * (3 * cp + 1 + pv.GAP) if 3 * cp + 1 >= pv.MIN_GRID_W else x0 + 2 * (pv.MIN_GRID_W + pv.GAP)
    cx, cy = xp + cp, y0 + cp + cp // 2
    assert px[cx + 1, cy] == rgb(pv.WRONG)
    assert px[cx + 3, cy] == (255, 255, 255)
    assert px[cx + cp // 2, cy] == rgb(pv.MAZE_COLORS[2])
    assert px[xp + cp // 2 + 1, y0 + cp // 2] == rgb(pv.MAZE_COLORS[1])  # a right cell: no ring


def test_arc_grid_is_cropped_to_its_size_with_the_standard_palette():
    style = pv.make_style("arc", 900, 12)
    canvas = np.zeros((30, 30), np.int64)
    grid = np.array([[0, 1, 2], [3, 4, 9]])
    canvas[:2, :3] = grid + 2
    canvas[2, :3] = 1  # EOS row under the grid
    canvas[:2, 3] = 1  # EOS column right of it
    flat = canvas.reshape(1, -1)
    img = pv.example_panel(style, flat, flat, flat, [0], title="t")
    cp = pv.cell_px(style, 3)  # the panel's cell size comes from its largest (cropped) grid
    x0, y0 = grid_origin(title=True)
    px = img.load()
    for r in range(2):
        for c in range(3):
            assert px[x0 + c * cp + cp // 2, y0 + r * cp + cp // 2] == rgb(pv.ARC_COLORS[grid[r, c]])
    assert px[x0 + cp // 2, y0 + 2 * cp + cp // 2] == (255, 255, 255)  # below the 2-row grid: background
    assert pv.ARC_COLORS[:3] == ("#000000", "#0074D9", "#FF4136")


def test_training_eval_logs_example_panel_to_run_dir_and_wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    data = build_tiny_sudoku(tmp_path / "data")
    run_dir = tmp_path / "run"
    train(tiny_overrides(data, run_dir, logger="wandb", eval_examples=2, epochs=1, eval_save_segments="true",
                         eval_save_outputs="[inputs,labels,puzzle_identifiers,preds,q_halt_logits]"))
    png = run_dir / "examples" / "eval_examples_step_4.png"
    img = Image.open(png)
    assert img.format == "PNG" and img.width > 300 and img.height > 200
    # 2 wrong + 2 right requested; an untrained model gets nothing right, so 2 rows: about 2 grid heights
    assert len(np.unique(np.asarray(img.convert("RGB")).reshape(-1, 3), axis=0)) > 5  # not blank
    media = list((run_dir / "wandb").glob("offline-run-*/files/media/images/eval/examples_4_*.png"))
    assert len(media) == 1, list((run_dir / "wandb").rglob("*.png"))
    outputs = np.load(run_dir / "step_4" / "eval_outputs.npz")
    assert outputs["segment_preds"].shape == (32, 2, 16) and (outputs["segment_steps"] == 2).all()
    assert np.array_equal(outputs["segment_preds"][:, -1], outputs["preds"])


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """One epoch with the defaults: eval_examples=4 and no eval_save_outputs."""
    root = tmp_path_factory.mktemp("panel_run")
    data = build_tiny_sudoku(root / "data")
    train(tiny_overrides(data, root / "run", epochs=1))
    return data, root / "run"


def test_panel_without_saved_outputs_and_off_switch(default_run, tmp_path):
    data, run = default_run
    assert [p.name for p in (run / "examples").iterdir()] == ["eval_examples_step_4.png"]
    train(tiny_overrides(data, tmp_path / "b", epochs=1, eval_examples=0))
    assert not (tmp_path / "b" / "examples").exists()
    from trainer_helpers import compose
    from utils.schema import ConfigError
    with pytest.raises(ConfigError, match="eval_examples"):
        compose(tiny_overrides(data, tmp_path / "c", eval_examples=-1))


def test_evaluate_writes_segments_and_accuracy_plot(default_run, tmp_path, capsys):
    import evaluate  # in-process (a subprocess would spend most of this test importing torch)
    _, run = default_run
    evaluate.run(evaluate.parse_args([f"checkpoint={run / 'step_4'}", f"output_dir={tmp_path / 'ev'}"]))
    assert "exact accuracy by segment: 1: " in capsys.readouterr().out
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    p = np.load(tmp_path / "ev" / "predictions.npz")
    acc = pv.segment_exact_accuracy(p["segment_preds"], p["labels"])
    assert [m["eval/segment_1/exact_accuracy"], m["eval/segment_2/exact_accuracy"]] == pytest.approx(acc.tolist())
    assert m["eval/segment_2/exact_accuracy"] == pytest.approx(m["eval/exact_accuracy"])  # the last segment is the answer
    plot = Image.open(tmp_path / "ev" / "accuracy_by_segment.png")
    assert plot.format == "PNG" and plot.size == (500, 320)
    evaluate.run(evaluate.parse_args([f"checkpoint={run / 'step_4'}", f"output_dir={tmp_path / 'ev2'}",
                                      "save_segments=false"]))
    assert "segment_preds" not in np.load(tmp_path / "ev2" / "predictions.npz").files
    assert not (tmp_path / "ev2" / "accuracy_by_segment.png").exists()
