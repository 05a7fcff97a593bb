"""dataset.inspect on an LM dataset (dataset.build_lm_dataset) describes it instead of failing on the missing
puzzle metadata."""
from __future__ import annotations

import subprocess
import sys

from trainer_helpers import REPO


def test_inspect_describes_an_lm_dataset(tmp_path):
    text = "".join(f"SPEAKER {i % 3}:\nWords of line {i}, and more words after them.\n\n" for i in range(300))
    (tmp_path / "corpus.txt").write_text(text)
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    build = subprocess.run([sys.executable, "-m", "dataset.build_lm_dataset", "--source", str(tmp_path / "corpus.txt"),
                            "--output-dir", str(tmp_path / "lm"), "--vocab-size", "300", "--max-seq-len", "32",
                            "--doc-chars", "400", "--seed", "0"], cwd=REPO, env=env, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    proc = subprocess.run([sys.executable, "-m", "dataset.inspect", str(tmp_path / "lm"), "--show", "1"], cwd=REPO,
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("== LM dataset: ") and '"vocab_size": 300' in out
    for split in ("train", "validation", "test"):
        assert f"   {split}: " in out and "continuation tokens mean" in out
    assert "[0] 'SPEAKER" in out  # decoded with the dataset's tokenizer
    assert "validated and inspected LM dataset" in out


def test_the_shipped_sample_corpus_builds_all_three_splits(tmp_path):
    """dataset/samples/tinyshakespeare_head.txt (the README's LM corpus): 31 documents, of which the hash split
    sends one to validation and none to test; filling test must take a train document, not that one."""
    from dataset.build_lm_dataset import main
    main(["--source", str(REPO / "dataset" / "samples" / "tinyshakespeare_head.txt"), "--output-dir",
          str(tmp_path / "lm"), "--vocab-size", "300", "--max-seq-len", "128", "--seed", "0"])
    import json
    splits = json.loads((tmp_path / "lm" / "meta.json").read_text())["splits"]
    assert all(splits[s] > 0 for s in ("train", "validation", "test")), splits
