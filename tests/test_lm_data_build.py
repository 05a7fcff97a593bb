"""LM data pipeline: tokenizer, dataset builder (all modes), mixing, and bad input."""
import gzip
import json

import numpy as np
import pytest

from dataset import build_lm_dataset as B
from dataset.lm_tokenizer import LMDataError, LMTokenizer, SPECIAL_TOKENS, train_bpe_tokenizer
from lm_dataset import LMSplit, load_lm_meta, validate_lm_dataset


@pytest.fixture(scope="module")
def shakes(shared_data):
    return (shared_data / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def shakes_small(shakes, tmp_path_factory):
    """The first ~120 kB of tinyshakespeare as a file."""
    p = tmp_path_factory.mktemp("src") / "shakes.txt"
    p.write_text(shakes[:120_000], encoding="utf-8")
    return p


def run_cli(argv, capsys):
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    code = 0
    try:
        B.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def all_examples(path, split):
    s = LMSplit(path, split)
    return [tuple(np.asarray(a).tolist() for a in s.example(i)) for i in range(len(s))]


# ---- tokenizer ---------------------------------------------------------------------------------------

def test_tokenizer_round_trip_real_text(shakes):
    train_text, held_out = shakes[:200_000], shakes[500_000:520_000]
    tok = LMTokenizer(train_bpe_tokenizer([train_text[i:i + 5000] for i in range(0, len(train_text), 5000)],
                                          vocab_size=600))
    assert [tok.tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert tok.vocab_size == 600
    for text in (held_out, "  two  spaces,\ttab,\n\n\nnewlines  \r\n", "naïve café — 😀 ünïcödé\n"):
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert all(0 <= i < 600 for i in ids) and tok.unk_id not in ids  # bytes cover everything
    # even ~340 merges compress held-out English to ~0.5 tokens per byte
    assert len(tok.encode(held_out)) < 0.6 * len(held_out.encode())
    # streaming decode never emits half a UTF-8 character and reproduces the text
    text = "naïve 😀 end"
    sd = tok.stream_decoder()
    pieces = [sd.push(i) for i in tok.encode(text)]
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)


# ---- text mode ---------------------------------------------------------------------------------------

def test_build_is_deterministic(shakes_small, tmp_path, capsys):
    args = ["--source", shakes_small, "--vocab-size", 512, "--max-seq-len", 64, "--stride", 48,
            "--val-ratio", 0.1, "--test-ratio", 0.1, "--doc-chars", 2000]
    outs = []
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        code, out, err = run_cli(args + ["--output-dir", tmp_path / name, "--seed", seed], capsys)
        assert code in (0, None), err
        assert "train=" in out
        outs.append(tmp_path / name)
    files = sorted(p.relative_to(outs[0]) for p in outs[0].rglob("*") if p.is_file())
    assert len(files) == 2 + 3 * 4
    for f in files:
        assert (outs[0] / f).read_bytes() == (outs[1] / f).read_bytes(), f
    # another seed moves documents between splits
    assert load_lm_meta(outs[0])["splits"] != load_lm_meta(outs[2])["splits"]
    assert not list(tmp_path.glob("*.partial-*"))


def test_windows_are_disjoint_consecutive_spans_and_splits_follow_documents(shakes_small, tmp_path, capsys):
    out = tmp_path / "d"
    code, _, err = run_cli(["--source", shakes_small, "--output-dir", out, "--vocab-size", 512,
                            "--max-seq-len", 50, "--prompt-len", 20, "--val-ratio", 0.2, "--test-ratio", 0.2,
                            "--doc-chars", 3000, "--seed", 1], capsys)
    assert code in (0, None), err
    tok = LMTokenizer.from_dataset(out)
    docs = [d for _, d in B._iter_txt_documents(shakes_small, 3000)]
    assert "".join(docs) == shakes_small.read_text(encoding="utf-8")
    doc_split = [B._hash_split(1, i, 0.2, 0.2) for i in range(len(docs))]
    assert set(doc_split) == {"train", "validation", "test"}
    for split in B.SPLITS:
        ex = all_examples(out, split)
        expected_ids = [i for d, s in zip(docs, doc_split) if s == split for i in tok.encode(d)]
        # prompt then continuation, window after window, rebuild the split's documents token for token
        assert [i for p, t in ex for i in p + t] == expected_ids
        assert all(len(p) == min(20, len(p) + len(t) - 1) and 1 <= len(t) <= 30 for p, t in ex)
        assert sum(len(p) + len(t) == 50 for p, t in ex) > 0.8 * len(ex)  # only document tails are short
        assert tok.decode(expected_ids) == "".join(d for d, s in zip(docs, doc_split) if s == split)


def test_text_windows_with_stride():
    ids = list(range(100, 123))  # 23 tokens
    w = list(B.text_windows(ids, max_seq_len=10, stride=6, prompt_len=None, prompt_ratio=0.3))
    assert w[0] == (ids[0:3], ids[3:10])
    assert w[1] == (ids[6:9], ids[9:16])
    assert [p + t for p, t in w] == [ids[0:10], ids[6:16], ids[12:22], ids[18:23]]
    # a trailing window of one token cannot be split; non-overlapping windows cover the input exactly
    assert [p + t for p, t in B.text_windows(ids, 11, 11, 5, 0.5)] == [ids[0:11], ids[11:22]]


# ---- structured sources --------------------------------------------------------------------------------

QA = [{"data": {"question": f"What is {i} plus {i}?", "context": f"Arithmetic fact {i}.",
                "answers": {"text": [str(2 * i), "other"]}}} for i in range(40)]


@pytest.fixture(scope="module")
def qa_tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    texts = [f"{r['data']['question']} {r['data']['context']} {r['data']['answers']['text'][0]}" for r in QA] * 5
    tok = LMTokenizer(train_bpe_tokenizer(texts, vocab_size=300, min_frequency=1))
    tok.save(d / "tokenizer.json")
    return d / "tokenizer.json"


@pytest.mark.parametrize("fmt", ["jsonl.gz", "json", "parquet", "jsonl.zst"])
def test_prompt_response_template_dotted_paths_and_formats(fmt, qa_tok, tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    train, val = QA[:30], QA[30:]
    for name, recs in (("train", train), ("validation", val)):
        path = src / f"{name}.{fmt}"
        if fmt == "jsonl.gz":
            with gzip.open(path, "wt", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in recs)
        elif fmt == "jsonl.zst":
            import zstandard
            path.write_bytes(zstandard.ZstdCompressor().compress("".join(json.dumps(r) + "\n" for r in recs).encode()))
        elif fmt == "json":
            path.write_text(json.dumps(recs))
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq
            pq.write_table(pa.Table.from_pylist(recs), path)
    out = tmp_path / "out"
    code, _, err = run_cli(["--source", src, "--output-dir", out, "--mode", "prompt_response",
                            "--tokenizer", qa_tok, "--prompt-field", "data.question",
                            "--response-field", "data.answers.text[0]", "--context-field", "data.context",
                            "--prompt-template", "{question}\nContext: {context}"], capsys)
    assert code in (0, None), err
    meta = validate_lm_dataset(out)
    assert meta["splits"] == {"train": 30, "validation": 10, "test": 0}  # file names keep their split
    tok = LMTokenizer.from_dataset(out)
    p, t = all_examples(out, "validation")[3]
    assert tok.decode(p) == "What is 33 plus 33?\nContext: Arithmetic fact 33."
    assert tok.decode(t) == "66"


def test_triples_import(tmp_path, capsys):
    src = tmp_path / "seed"
    src.mkdir()
    (src / "meta.json").write_text(json.dumps({"vocab_size": 50, "pad_id": 0, "bos_id": 1, "eos_id": 2}))
    rows = [{"encoder_ids": [5, 6, 7, 0, 0], "decoder_input_ids": [1, 8, 9, 0], "labels": [8, 9, 2, -100]},
            {"encoder_ids": [10], "decoder_input_ids": [1, 11], "labels": [11, 2]}]
    (src / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (src / "val.jsonl").write_text(json.dumps(rows[1]) + "\n")
    out = tmp_path / "out"
    code, _, err = run_cli(["--source", src, "--output-dir", out, "--mode", "triples"], capsys)
    assert code in (0, None), err
    assert all_examples(out, "train") == [([5, 6, 7], [8, 9]), ([10], [11])]
    assert all_examples(out, "validation") == [([10], [11])]
    assert load_lm_meta(out)["token_dtype"] == "uint16"


# ---- mixing ----------------------------------------------------------------------------------------------

def _triples_dataset(tmp_path, name, n_train, n_val, base):
    src = tmp_path / f"src_{name}"
    src.mkdir()
    (src / "meta.json").write_text(json.dumps({"vocab_size": 1000, "pad_id": 0, "bos_id": 1, "eos_id": 2}))
    for split, n in (("train", n_train), ("validation", n_val)):
        rows = [{"encoder_ids": [base + i], "decoder_input_ids": [1, 4], "labels": [4, 2]} for i in range(n)]
        (src / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / name
    B.main(["--source", str(src), "--output-dir", str(out), "--mode", "triples"])
    return out


def test_mix_weights_quotas_and_determinism(tmp_path, capsys):
    lang = _triples_dataset(tmp_path, "lang", 90, 10, base=100)
    math = _triples_dataset(tmp_path, "math", 20, 4, base=500)
    capsys.readouterr()
    outs = []
    for name in ("m1", "m2"):
        code, _, err = run_cli(["mix", "--inputs", f"{lang}:0.9", f"{math}:0.1", "--output-dir", tmp_path / name,
                                "--train-samples", 50, "--seed", 3], capsys)
        assert code in (0, None), err
        outs.append(tmp_path / name)
    meta = load_lm_meta(outs[0])
    assert meta["splits"]["train"] == 50
    src_ids = [p[0] for p, _ in all_examples(outs[0], "train")]
    assert sum(i >= 500 for i in src_ids) == 5 and len(set(src_ids)) == 50  # 45 + 5, no repeats
    # no validation quota: the largest mix without repetition: min(10/0.9, 4/0.1) = 11 examples
    val_ids = [p[0] for p, _ in all_examples(outs[0], "validation")]
    assert len(val_ids) == 11 and sum(i >= 500 for i in val_ids) == 1
    for f in ("train/prompt_tokens.npy", "validation/prompt_offsets.npy", "meta.json"):
        assert (outs[0] / f).read_bytes() == (outs[1] / f).read_bytes()
    # a quota bigger than a source repeats it, with a warning
    code, _, err = run_cli(["mix", "--inputs", f"{lang}:0.5", f"{math}:0.5", "--output-dir", tmp_path / "m3",
                            "--train-samples", 60], capsys)
    assert code in (0, None) and "repeating" in err
    assert load_lm_meta(tmp_path / "m3")["mix"]["per_source"]["train"] == {str(lang): 30, str(math): 30}


# ---- bad input -------------------------------------------------------------------------------------------

def _one_line_error(code, err, *needles):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], lines[0]


def test_bad_empty_and_unreadable_corpus(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    _one_line_error(*run_cli(["--source", empty, "--output-dir", tmp_path / "o"], capsys)[::2], "empty")
    _one_line_error(*run_cli(["--source", tmp_path / "nope.txt", "--output-dir", tmp_path / "o"], capsys)[::2],
                    "nope.txt", "not found")
    d = tmp_path / "dir"
    d.mkdir()
    (d / "notes.md").write_text("x")
    _one_line_error(*run_cli(["--source", d, "--output-dir", tmp_path / "o"], capsys)[::2], "no readable corpus")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 au lait\n".encode("latin-1") * 10)
    _one_line_error(*run_cli(["--source", latin, "--output-dir", tmp_path / "o"], capsys)[::2],
                    "latin1.txt", "not UTF-8")
    broken_gz = tmp_path / "broken.jsonl.gz"
    broken_gz.write_bytes(gzip.compress(b'{"text": "hello"}\n' * 100)[:40])
    _one_line_error(*run_cli(["--source", broken_gz, "--output-dir", tmp_path / "o"], capsys)[::2],
                    "broken.jsonl.gz", "cannot read")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken\n')
    _one_line_error(*run_cli(["--source", bad, "--output-dir", tmp_path / "o", "--vocab-size", 300], capsys)[::2],
                    "bad.jsonl:2", "invalid JSON")
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob("o.partial-*"))


def test_bad_missing_field_path_names_record(qa_tok, tmp_path, capsys):
    src = tmp_path / "qa.jsonl"
    recs = QA[:3] + [{"data": {"question": "q?", "answers": {"text": []}}}]
    src.write_text("".join(json.dumps(r) + "\n" for r in recs))
    code, _, err = run_cli(["--source", src, "--output-dir", tmp_path / "o", "--mode", "prompt_response",
                            "--tokenizer", qa_tok, "--prompt-field", "data.question",
                            "--response-field", "data.answers.text[0]"], capsys)
    _one_line_error(code, err, "qa.jsonl:4", "data.answers.text[0]")


def test_bad_tokenizer_disagrees_with_meta(shakes_small, tmp_path, capsys):
    out = tmp_path / "d"
    run_cli(["--source", shakes_small, "--output-dir", out, "--vocab-size", 400, "--max-seq-len", 64], capsys)
    meta = json.loads((out / "meta.json").read_text())
    meta["vocab_size"] = 512
    (out / "meta.json").write_text(json.dumps(meta))
    # reusing that tokenizer for a new build
    code, _, err = run_cli(["--source", shakes_small, "--output-dir", tmp_path / "e", "--tokenizer",
                            out / "tokenizer.json"], capsys)
    _one_line_error(code, err, "400", "vocab_size=512")
    # and loading the dataset
    with pytest.raises(LMDataError, match="400 tokens but .*vocab_size=512"):
        validate_lm_dataset(out)


def test_bad_token_ids_in_triples(tmp_path, capsys):
    src = tmp_path / "seed"
    src.mkdir()
    (src / "meta.json").write_text(json.dumps({"vocab_size": 50, "pad_id": 0, "bos_id": 1, "eos_id": 2}))
    (src / "train.jsonl").write_text(
        json.dumps({"encoder_ids": [5], "decoder_input_ids": [1, 8], "labels": [8, 2]}) + "\n" +
        json.dumps({"encoder_ids": [5, 77], "decoder_input_ids": [1, 8], "labels": [8, 2]}) + "\n")
    code, _, err = run_cli(["--source", src, "--output-dir", tmp_path / "o", "--mode", "triples"], capsys)
    _one_line_error(code, err, "train.jsonl:2", "77", "[0, 50)")


def test_existing_output_needs_overwrite(shakes_small, tmp_path, capsys):
    out = tmp_path / "d"
    out.mkdir()
    (out / "keep").write_text("x")
    _one_line_error(*run_cli(["--source", shakes_small, "--output-dir", out], capsys)[::2], "--overwrite")
    assert (out / "keep").exists()
