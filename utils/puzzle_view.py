"""How a puzzle example looks: one palette and one layout for the browser viewer (utils/viewer.py,
visualize.py) and the PNG panels (training evals, evaluate.py).

Layout: an example is three grids side by side, input | target | prediction, under a caption
(index, puzzle name, exact or the number of wrong cells, Q-halt confidence, segments). A wrong
prediction cell gets a red frame. Grids by kind (`dataset.common.guess_kind`):
  sudoku  white cells with digits; given digits dark, filled-in digits blue; thick lines between boxes
  maze    wall dark, open white, start green, goal red, path blue (tokens of dataset/build_maze_dataset.py)
  arc     the standard ARC colours 0-9, each grid cropped to its real size on the 30x30 canvas
  grid    anything else: one colour per token id with the id written in the cell
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from dataset.common import ARC_COLOR_OFFSET, ARC_GRID, IGNORE_LABEL_ID, arc_grid_extent, sudoku_box

# The ARC task viewer's colours (black, blue, red, green, yellow, grey, magenta, orange, sky, maroon).
ARC_COLORS = ("#000000", "#0074D9", "#FF4136", "#2ECC40", "#FFDC00", "#AAAAAA", "#F012BE", "#FF851B",
              "#7FDBFF", "#870C25")
PAD_COLOR = "#D9D9D9"        # PAD token (outside the puzzle)
EOS_COLOR = "#BFBFBF"        # ARC end-of-grid marker
MAZE_COLORS = (PAD_COLOR, "#2B2D42", "#FFFFFF", "#2ECC40", "#FF4136", "#0074D9")  # PAD # ' ' S G o
CELL_COLOR = "#FFFFFF"       # Sudoku cells
GIVEN_TEXT = "#1A1A1A"
FILLED_TEXT = "#1F5FBF"
WRONG = "#FF1F1F"
LINE = "#9A9A9A"             # thin grid line
BOX_LINE = "#1A1A1A"         # Sudoku box border
# Generic token colours: a light qualitative cycle so that the written id stays readable.
GRID_COLORS = ("#FFFFFF", "#CFE2F3", "#D9EAD3", "#FFF2CC", "#F4CCCC", "#D9D2E9", "#FCE5CD", "#D0E0E3",
               "#EAD1DC", "#E6E6E6")


@dataclass(frozen=True)
class Style:
    """What every token of one dataset looks like; the viewer receives the same values as JSON."""
    kind: str
    rows: int
    cols: int
    colors: tuple[str, ...]      # background per token id
    texts: tuple[str, ...]       # text per token id ("" = none)
    box: tuple[int, int] = (0, 0)  # Sudoku box (rows, cols); (0, 0) = no box lines

    def to_json(self) -> dict:
        return {"kind": self.kind, "rows": self.rows, "cols": self.cols, "colors": list(self.colors),
                "texts": list(self.texts), "box": list(self.box), "wrong": WRONG, "line": LINE, "boxLine": BOX_LINE,
                "givenText": GIVEN_TEXT, "filledText": FILLED_TEXT, "pad": PAD_COLOR}


def make_style(kind: str, seq_len: int, vocab_size: int) -> Style:
    side = int(round(seq_len ** 0.5))
    if kind == "sudoku":
        texts = ["", ""] + [str(t - 1) for t in range(2, vocab_size)]
        return Style(kind, side, side, (PAD_COLOR,) + (CELL_COLOR,) * (vocab_size - 1), tuple(texts), sudoku_box(side))
    if kind == "maze":
        return Style(kind, side, side, MAZE_COLORS[:vocab_size], ("",) * vocab_size)
    if kind == "arc":
        colors = (PAD_COLOR, EOS_COLOR) + ARC_COLORS
        return Style(kind, ARC_GRID, ARC_GRID, colors[:vocab_size] + (PAD_COLOR,) * (vocab_size - len(colors)),
                     ("",) * vocab_size)
    cols = side if side * side == seq_len else int(np.ceil(seq_len ** 0.5))
    rows = -(-seq_len // cols)
    return Style("grid", rows, cols, tuple(GRID_COLORS[t % len(GRID_COLORS)] for t in range(vocab_size)),
                 tuple(str(t) for t in range(vocab_size)))


def arc_boxes(tokens: np.ndarray, scored: bool) -> np.ndarray:
    """[N, 900] ARC canvases -> [N, 4] uint8 (row, col, rows, cols) of the part to draw. scored=True: the
    grid the evaluator crops (what a prediction is judged on); False: the bounding box of the colour
    cells (dataset grids, including training examples placed at a random offset). Nothing -> the canvas."""
    tokens = np.asarray(tokens).reshape(len(tokens), ARC_GRID, ARC_GRID)
    out = np.zeros((len(tokens), 4), dtype=np.uint8)
    if scored:
        rows, cols = arc_grid_extent(tokens.reshape(len(tokens), -1))
        out[:, 2], out[:, 3] = rows, cols
    else:
        color = (tokens >= ARC_COLOR_OFFSET) & (tokens < ARC_COLOR_OFFSET + 10)
        any_r, any_c = color.any(axis=2), color.any(axis=1)
        r0, c0 = any_r.argmax(axis=1), any_c.argmax(axis=1)
        r1 = ARC_GRID - any_r[:, ::-1].argmax(axis=1)
        c1 = ARC_GRID - any_c[:, ::-1].argmax(axis=1)
        out[:, 0], out[:, 1], out[:, 2], out[:, 3] = r0, c0, r1 - r0, c1 - c0
    empty = (out[:, 2] == 0) | (out[:, 3] == 0)
    out[empty] = (0, 0, ARC_GRID, ARC_GRID)
    return out


def exact_and_wrong(preds: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: exact (every labelled cell right, as eval/exact_accuracy) and the number of wrong cells.
    `labels` use IGNORE_LABEL_ID for cells that are not scored."""
    mask = labels != IGNORE_LABEL_ID
    wrong = (mask & (preds != labels)).sum(axis=-1)
    return wrong == 0, wrong


def segment_exact_accuracy(segment_preds: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """[N, S, L] per-segment answers, [N, L] labels -> [S] fraction of rows exactly right at each segment."""
    if len(labels) == 0:
        return np.zeros(segment_preds.shape[1] if segment_preds.ndim == 3 else 0)
    mask = labels != IGNORE_LABEL_ID
    return np.array([(~((segment_preds[:, k] != labels) & mask).any(axis=-1)).mean()
                     for k in range(segment_preds.shape[1])])  # one segment at a time: [N, L] temporaries


def pick_examples(exact: np.ndarray, count: int) -> list[int]:
    """Up to `count` wrong rows, then up to `count` right rows, first in dataset order (deterministic)."""
    exact = np.asarray(exact, dtype=bool)
    wrong = np.flatnonzero(~exact)[:count].tolist()
    right = np.flatnonzero(exact)[:count].tolist()
    return wrong + right


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


# ---------------------------------------------------------------------------------------------------
# PNG panel (Pillow)

MARGIN, GAP, CAPTION_H, TITLE_H = 10, 16, 18, 14


def cell_px(style: Style, extent: Optional[int] = None) -> int:
    """Cell size in pixels: the largest grid (`extent` cells, default the style's) is about 200 px
    wide; cells between 6 and 28 px."""
    return int(np.clip(round(200 / (extent or max(style.rows, style.cols))), 6, 28))


def _hex(c: str) -> tuple[int, int, int]:
    return int(c[1:3], 16), int(c[3:5], 16), int(c[5:7], 16)


def _font(size: int):
    from PIL import ImageFont
    return ImageFont.load_default(size=size)


@dataclass
class PanelGrid:
    tokens: np.ndarray                  # [seq_len] token ids (labels: IGNORE_LABEL_ID allowed)
    title: str
    wrong: Optional[np.ndarray] = None  # [seq_len] bool: cells to frame in red
    given: Optional[np.ndarray] = None  # [seq_len] bool: Sudoku givens (dark text)
    box: Optional[Sequence[int]] = None  # ARC: (row, col, rows, cols) of the canvas to draw


MIN_GRID_W = 72  # px, so that a small ARC grid's title still fits above it


def grid_cells(style: Style, g: PanelGrid) -> tuple[int, int]:
    return (int(g.box[2]), int(g.box[3])) if g.box is not None else (style.rows, style.cols)


def draw_grid(draw, style: Style, g: PanelGrid, x0: int, y0: int, cp: int) -> None:
    """One grid with its top-left corner at (x0, y0); cell (r, c) spans [x0 + c*cp, x0 + (c+1)*cp]."""
    r0, c0, rows, cols = (int(v) for v in g.box) if g.box is not None else (0, 0, style.rows, style.cols)
    tokens = np.asarray(g.tokens).astype(np.int64)
    font = _font(max(8, int(cp * 0.6)))
    w, h = cols * cp, rows * cp
    draw.rectangle([x0, y0, x0 + w, y0 + h], fill=_hex(LINE))
    for r in range(rows):
        for c in range(cols):
            i = (r0 + r) * style.cols + (c0 + c)
            t = int(tokens[i]) if i < len(tokens) else -1
            color = style.colors[t] if 0 <= t < len(style.colors) else PAD_COLOR
            x, y = x0 + c * cp, y0 + r * cp
            inset = 1 if cp >= 8 else 0
            draw.rectangle([x + inset, y + inset, x + cp - 1, y + cp - 1], fill=_hex(color))
            text = style.texts[t] if 0 <= t < len(style.texts) else ""
            bad = g.wrong is not None and i < len(g.wrong) and bool(g.wrong[i])
            if bad:  # a red ring, then a white one inside: visible on every palette colour, red included
                lw = 2 if cp >= 12 else 1
                draw.rectangle([x + inset, y + inset, x + cp - 1, y + cp - 1], outline=_hex(WRONG), width=lw)
                if cp >= 10:
                    draw.rectangle([x + inset + lw, y + inset + lw, x + cp - 1 - lw, y + cp - 1 - lw], outline=(255, 255, 255),
                                   width=1)
            if text:
                fill = WRONG if bad else (GIVEN_TEXT if g.given is not None and g.given[i] else FILLED_TEXT)
                draw.text((x + cp / 2 + 0.5, y + cp / 2 + 0.5), text, fill=_hex(fill), font=font, anchor="mm")
    if style.box != (0, 0):
        br, bc = style.box
        for k in range(0, rows + 1, br):
            draw.line([x0, y0 + k * cp, x0 + w, y0 + k * cp], fill=_hex(BOX_LINE), width=2)
        for k in range(0, cols + 1, bc):
            draw.line([x0 + k * cp, y0, x0 + k * cp, y0 + h], fill=_hex(BOX_LINE), width=2)


def render_panel(style: Style, rows: list[tuple[str, bool, list[PanelGrid]]], title: str = ""):
    """rows: [(caption, right?, [grid, ...])] -> a PIL image, one example per row, grids left to right."""
    from PIL import Image, ImageDraw
    cap_font, title_font = _font(12), _font(13)
    cp = cell_px(style, max((max(grid_cells(style, g)) for _, _, grids in rows for g in grids), default=None))
    sizes = [[(max(c * cp + 1, MIN_GRID_W), r * cp + 1) for r, c in (grid_cells(style, g) for g in grids)]
             for _, _, grids in rows]
    width = max([MARGIN * 2 + sum(w for w, _ in s) + GAP * (len(s) - 1) for s in sizes] + [320])
    heights = [CAPTION_H + TITLE_H + max((h for _, h in s), default=0) + GAP for s in sizes]
    top = MARGIN + (CAPTION_H + 4 if title else 0)
    img = Image.new("RGB", (width, top + sum(heights) + MARGIN), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    if title:
        draw.text((MARGIN, MARGIN), title, fill=(0, 0, 0), font=title_font)
    y = top
    for (caption, right, grids), s, hh in zip(rows, sizes, heights):
        draw.text((MARGIN, y), caption, fill=(0, 110, 40) if right else _hex(WRONG), font=cap_font)
        x = MARGIN
        for g, (w, _) in zip(grids, s):
            draw.text((x, y + CAPTION_H), g.title, fill=(90, 90, 90), font=cap_font)
            draw_grid(draw, style, g, x, y + CAPTION_H + TITLE_H, cp)
            x += w + GAP
        y += hh
    return img


def example_panel(style: Style, inputs: np.ndarray, labels: np.ndarray, preds: np.ndarray, indices: list[int],
                  names: Optional[list[str]] = None, q_halt: Optional[np.ndarray] = None,
                  steps: Optional[np.ndarray] = None, title: str = ""):
    """The panel of chosen rows: input | target | prediction, wrong cells framed."""
    exact, n_wrong = exact_and_wrong(preds[indices], labels[indices]) if indices else (np.zeros(0, bool), [])
    rows = []
    for j, i in enumerate(indices):
        caption = f"#{i}" + (f" {names[j]}" if names and names[j] else "")
        caption += "  exact" if exact[j] else f"  wrong: {int(n_wrong[j])} cell{'s' if n_wrong[j] != 1 else ''}"
        if q_halt is not None:
            caption += f"  q={float(sigmoid(q_halt[i])):.2f}"
        if steps is not None and steps[i] > 0:
            caption += f"  {int(steps[i])} seg"
        lab = labels[i]
        shown_lab = np.where(lab == IGNORE_LABEL_ID, 0, lab)  # unscored cells draw as PAD
        wrong = (lab != IGNORE_LABEL_ID) & (preds[i] != lab)
        given = (inputs[i] >= 2) if style.kind == "sudoku" else None
        boxes = [None, None, None]
        if style.kind == "arc":
            boxes = [arc_boxes(inputs[i:i + 1], False)[0], arc_boxes(shown_lab[None], False)[0],
                     arc_boxes(preds[i:i + 1], True)[0]]
        rows.append((caption, bool(exact[j]), [PanelGrid(inputs[i], "input", given=given, box=boxes[0]),
                               PanelGrid(shown_lab, "target", given=given, box=boxes[1]),
                               PanelGrid(preds[i], "prediction", wrong=wrong, given=given, box=boxes[2])]))
    return render_panel(style, rows, title)


def save_png_atomic(img, path: str | os.PathLike) -> Path:
    """A PIL image or a matplotlib figure as PNG: a temporary sibling first, then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    (getattr(img, "savefig", None) or img.save)(tmp, format="png")
    os.replace(tmp, path)
    return path


def plot_segment_accuracy(acc: np.ndarray, path: str | os.PathLike, title: str = "") -> Path:
    """Exact accuracy after each ACT segment as a PNG line plot (matplotlib, no display needed)."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure
    fig = Figure(figsize=(5, 3.2), dpi=100)
    ax = fig.add_subplot()
    seg = np.arange(1, len(acc) + 1)
    ax.plot(seg, 100 * np.asarray(acc), marker="o", color="#1F5FBF")
    for s, a in zip(seg, acc):
        ax.annotate(f"{100 * a:.1f}", (s, 100 * a), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    ax.set_xlabel("ACT segment")
    ax.set_ylabel("exact accuracy (%)")
    ax.set_xticks(seg)
    ax.set_ylim(0, 105)
    ax.grid(alpha=0.3)
    ax.set_title(title or "exact accuracy by segment", fontsize=10)
    fig.tight_layout()
    return save_png_atomic(fig, path)
