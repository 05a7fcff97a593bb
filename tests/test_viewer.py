"""visualize.py / utils/viewer.py without a browser: what the page embeds (counts, exact flags, wrong
cells, segments, ARC crops, demo pairs and voted tasks), row matching, sampling, and the one-line errors
for bad input with no HTML left behind, and --serve."""
from __future__ import annotations

import base64
import gzip
import json

import numpy as np
import pytest

from dataset.common import PuzzleDatasetMetadata, guess_kind, parse_arc_identifier
from trainer_helpers import run_cli
from utils import viewer
from viewer_helpers import N_SEGMENTS, build_datasets, fake_predictions, split_arrays


def unblob(b: dict) -> np.ndarray:
    dtype = {"u1": np.uint8, "u2": np.uint16, "i4": np.int32, "f4": np.float32}[b["dtype"]]
    return np.frombuffer(gzip.decompress(base64.b64decode(b["b64"])), dtype=dtype).reshape(b["shape"])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_datasets(tmp_path_factory.mktemp("viewer_data"))


def test_sudoku_payload_marks_wrong_rows_and_segments(data, tmp_path):
    pred = fake_predictions(data["sudoku"], tmp_path / "p.npz", {1: [0], 4: [3, 5]}, (2, 6))
    p = viewer.build_payload(str(data["sudoku"]), predictions=str(tmp_path / "p.npz"))
    assert p["style"]["kind"] == "sudoku" and p["style"]["box"] == [2, 2] and p["style"]["texts"][2:] == ["1", "2", "3", "4"]
    items = p["items"]
    assert p["summary"]["items"] == 32 and p["summary"]["segments"] == N_SEGMENTS
    assert unblob(items["exact"]).tolist() == [int(i not in (1, 4)) for i in range(32)]
    assert unblob(items["nwrong"])[[0, 1, 4]].tolist() == [0, 1, 2]
    assert np.array_equal(unblob(items["preds"]), pred["preds"])
    segs = unblob(items["segs"])
    assert segs.shape == (32, N_SEGMENTS, 16) and np.array_equal(segs[:, -1], pred["preds"])
    # fake_predictions: two extra wrong cells at segment 1, one at segment 2, none at 3 (except rows 1 and 4)
    assert p["summary"]["segmentExact"] == pytest.approx([0.0, 0.0, 30 / 32])
    assert unblob(items["q"])[[0, 1]] == pytest.approx([1 / (1 + np.exp(-3)), 1 / (1 + np.exp(2))], rel=1e-6)
    html = viewer.render_html(p)
    assert html.count("__VIEWER_DATA__") == 0 and "http://" not in html.split("<script")[0]
    assert "<script src" not in html and "<link" not in html  # nothing fetched: the page is self-contained


def test_maze_and_plain_dataset_without_predictions(data):
    p = viewer.build_payload(str(data["maze"]))
    assert p["style"]["kind"] == "maze" and p["summary"] == {"items": 6, "examples": 6, "predicted": 0}
    assert "preds" not in p["items"] and p["predictions"] is None
    inputs, _, _ = split_arrays(data["maze"])
    assert np.array_equal(unblob(p["items"]["inputs"]), inputs)
    assert viewer.build_payload(str(data["maze"]), kind="grid")["style"]["texts"][:3] == ["0", "1", "2"]


def test_4x4_sudoku_is_not_a_maze(data):
    meta = PuzzleDatasetMetadata.load(data["sudoku"] / "test" / "dataset.json")
    assert meta.vocab_size == 6 and meta.seq_len == 16  # the same shape as a 4x4 maze
    _, labels, _ = split_arrays(data["sudoku"])
    _, maze_labels, _ = split_arrays(data["maze"])
    assert guess_kind(meta, labels[0]) == "sudoku"
    assert guess_kind(meta, maze_labels[0][:16]) == "maze"


def test_rows_are_matched_by_content_and_sampled(data, tmp_path):
    pred = fake_predictions(data["sudoku"], tmp_path / "p.npz", {5: [2]}, (2, 6))
    perm = np.random.default_rng(0).permutation(32)[:20]  # a multi-rank order, and fewer rows (max_eval_batches)
    np.savez(tmp_path / "perm.npz", **{k: v[perm] for k, v in pred.items()})
    p = viewer.build_payload(str(data["sudoku"]), predictions=str(tmp_path / "perm.npz"))
    assert unblob(p["items"]["row"]).tolist() == perm.tolist()
    assert unblob(p["items"]["exact"]).tolist() == [int(r != 5) for r in perm]
    s = viewer.build_payload(str(data["sudoku"]), predictions=str(tmp_path / "p.npz"), limit=7, seed=3)
    rows = unblob(s["items"]["row"])
    assert len(rows) == 7 and s["sampled"] and list(rows) == sorted(rows)
    assert np.array_equal(rows, unblob(viewer.build_payload(str(data["sudoku"]), limit=7, seed=3)["items"]["row"]))


def test_training_eval_outputs_dir_is_accepted(data, tmp_path):
    pred = fake_predictions(data["sudoku"], tmp_path / "step_8" / "eval_outputs.npz", {}, (2, 6))
    del pred["preds"]  # only segments saved: the last segment is the answer
    np.savez(tmp_path / "step_8" / "eval_outputs.npz", **pred)
    p = viewer.build_payload(str(data["sudoku"]), predictions=str(tmp_path / "step_8"))
    assert p["summary"]["exact"] == 1.0 and p["predictions"].endswith("eval_outputs.npz")


def test_arc_payload_has_crops_demos_and_voted_tasks(shared_data, tmp_path_factory, tmp_path):
    arc = build_datasets(tmp_path_factory.mktemp("viewer_arc"), shared_data)["arc"]
    inputs, labels, pids = split_arrays(arc)
    fake_predictions(arc, tmp_path / "p.npz", {0: [0]}, (2, 12))
    p = viewer.build_payload(str(arc), predictions=str(tmp_path / "p.npz"))
    assert p["style"]["kind"] == "arc" and p["style"]["colors"][2] == "#000000" and len(p["style"]["colors"]) == 12
    n = len(inputs)
    assert p["summary"]["items"] == n and unblob(p["items"]["exact"]).sum() == n - 1
    from dataset.common import arc_grid_from_tokens
    in_box = unblob(p["items"]["inBox"])
    for i in range(n):  # test grids sit at (0, 0): the box is the scored grid's size
        assert tuple(in_box[i]) == (0, 0) + arc_grid_from_tokens(inputs[i]).shape
    demos = p["demos"]
    slot, start, count = unblob(demos["itemSlot"]), unblob(demos["start"]), unblob(demos["count"])
    assert (slot >= 0).all() and (count[slot] >= 2).all()
    # demo pairs of row 0 are the train split's examples of the same puzzle id
    tr_inputs, _, tr_pids = split_arrays(arc, "train")
    first = unblob(demos["inputs"])[start[slot[0]]]
    assert any(np.array_equal(first, tr_inputs[r]) for r in np.flatnonzero(tr_pids == pids[0]))
    tasks = p["tasks"]
    assert len(tasks["list"]) == 3 and tasks["pass@1"] == 1.0  # one wrong variant is outvoted
    names = json.loads((arc / "identifiers.json").read_text())
    assert {t["name"] for t in tasks["list"]} == {parse_arc_identifier(names[i])[0] for i in set(pids.tolist())}
    assert all(t["tests"][0]["rank"] == 0 and t["tests"][0]["cands"][0]["votes"] >= 3 for t in tasks["list"])


@pytest.mark.parametrize("case", ["not_a_dataset", "count", "seq_len", "kind", "not_npz", "lm"])
def test_bad_input_is_one_line_and_writes_nothing(data, tmp_path, capsys, case):
    out = tmp_path / "page" / "viewer.html"
    args = [f"data_path={data['sudoku']}", f"out={out}"]
    pred = fake_predictions(data["sudoku"], tmp_path / "p.npz", {}, (2, 6))
    if case == "not_a_dataset":
        (tmp_path / "empty").mkdir()
        args[0] = f"data_path={tmp_path / 'empty'}"
        expect = f"error: data_path '{tmp_path / 'empty'}' holds neither train/dataset.json"
    elif case == "count":
        np.savez(tmp_path / "more.npz", preds=np.concatenate([pred["preds"]] * 2))
        args.append(f"predictions={tmp_path / 'more.npz'}")
        expect = f"error: predictions '{tmp_path / 'more.npz'}': 64 rows but {data['sudoku'] / 'test'} has only 32 examples"
    elif case == "seq_len":
        np.savez(tmp_path / "long.npz", preds=np.zeros((32, 81), np.int32))
        args.append(f"predictions={tmp_path / 'long.npz'}")
        expect = f"error: predictions '{tmp_path / 'long.npz'}': preds have shape (32, 81) but {data['sudoku'] / 'test'} has seq_len 16"
    elif case == "kind":
        args.append("kind=chess")
        expect = "error: unknown puzzle type kind='chess'; choose auto, sudoku, maze, arc, grid"
    elif case == "not_npz":
        (tmp_path / "bad.npz").write_text("not a zip")
        args.append(f"predictions={tmp_path / 'bad.npz'}")
        expect = f"error: predictions '{tmp_path / 'bad.npz'}': not a readable .npz file"
    else:
        (tmp_path / "lm").mkdir()
        (tmp_path / "lm" / "meta.json").write_text("{}")
        args[0] = f"data_path={tmp_path / 'lm'}"
        expect = f"error: data_path '{tmp_path / 'lm'}' is a language-model dataset"
    if case == "kind":  # one case as a real process: the exit status and stderr a user sees
        proc = run_cli(["visualize.py", *args], timeout=120)
        code, err = proc.returncode, proc.stderr
    else:
        import visualize
        with pytest.raises(SystemExit) as e:
            visualize.main(args)
        code, err = e.value.code, capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(expect), err
    assert not out.exists() and not (out.parent.exists() and any(out.parent.iterdir()))


def test_cli_writes_page_atomically_and_states_large_sizes(data, tmp_path, monkeypatch, capsys):
    import visualize
    out = tmp_path / "v.html"
    visualize.main([f"data_path={data['maze']}", f"out={out}"])
    assert "wrote" in capsys.readouterr().out and out.read_text().startswith("<!doctype html>")
    assert [p.name for p in tmp_path.iterdir()] == ["v.html"]  # no temp file left
    monkeypatch.setattr(viewer, "SIZE_NOTE_BYTES", 1000)
    visualize.main([f"data_path={data['maze']}", f"out={out}"])
    err = capsys.readouterr().err
    assert err.startswith("note: the page will be") and "add limit=N" in err and out.is_file()
    with pytest.raises(SystemExit) as e:
        visualize.main([f"data_path={data['maze']}", "limt=3"])
    assert e.value.code == 2 and "did you mean 'limit'" in capsys.readouterr().err


def test_serve_answers_on_loopback_only(data):
    """--serve: the same page from memory on 127.0.0.1 (a free port), stopped by the test."""
    import subprocess
    import urllib.request

    from trainer_helpers import PY, REPO
    proc = subprocess.Popen([PY, "visualize.py", f"data_path={data['maze']}", "--serve", "port=0"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = None
        for _ in range(5):  # the summary line, then the address
            line = proc.stdout.readline()
            if "http://127.0.0.1:" in line:
                url = line.split("serving the viewer on ")[1].split()[0]
                break
        assert url is not None and url.startswith("http://127.0.0.1:"), proc.stderr.read() if proc.poll() is not None else ""
        with urllib.request.urlopen(url, timeout=30) as r:
            page = r.read().decode()
        assert r.status == 200 and 'id="viewer-data"' in page and '"kind":"maze"' in page
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(url + "other", timeout=30)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
