"""LM answer evaluation (utils/lm_eval.py) and the gate/halting controls of the HRM LM: batched KV-cache answer
decoding equals a one-example, no-cache greedy reference; bits per character by hand; gate_mode=off does
not depend on the core; bad values are one clear line."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from models.hrm_lm.hrm_lm_v1 import HRMLanguageModel
from models.hrm_lm.losses import LMLossHead
from models.lm_transformer.lm_transformer import LMTransformer
from utils.distributed import DistInfo
from utils.lm_eval import LMEvalSettings, answer_eval, check_settings, exact_answers, lm_eval, target_chars
from utils.schema import ConfigError

pytestmark = [pytest.mark.usefixtures("one_thread")]

V, PAD, BOS, EOS = 20, 0, 1, 2
CPU = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
GROUPS = ["len_2", "len_3", "len_4", "len_5"]


def tiny(**over):
    cfg = dict(vocab_size=V, hidden_size=32, num_heads=2, encoder="transformer", encoder_layers=1, H_layers=1,
               L_layers=1, H_cycles=1, L_cycles=2, decoder_layers=1, halt_max_steps=2, expansion=2.0)
    cfg.update(over)
    return HRMLanguageModel(cfg)


def write_lm_dataset(root, splits: dict, groups: dict | None = None):
    """The prepared-dataset format (lm_dataset.py) written directly: {split: [(prompt, target), ...]};
    groups {split: [group index per example]} adds <split>/groups.npy and meta reasoning.groups."""
    root.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        d = root / split
        d.mkdir(exist_ok=True)
        for side, k in (("prompt", 0), ("target", 1)):
            seqs = [np.asarray(r[k], np.uint16) for r in rows]
            np.save(d / f"{side}_tokens.npy", np.concatenate(seqs) if seqs else np.zeros(0, np.uint16))
            np.save(d / f"{side}_offsets.npy", np.concatenate([[0], np.cumsum([len(s) for s in seqs])]).astype(np.int64))
        if groups and split in groups:
            np.save(d / "groups.npy", np.asarray(groups[split], np.int32))
    meta = {"vocab_size": V, "pad_id": PAD, "bos_id": BOS, "eos_id": EOS, "unk_id": 3, "token_dtype": "uint16",
            "splits": {s: len(r) for s, r in splits.items()}}
    if groups:
        meta["reasoning"] = {"task": "reverse", "groups": GROUPS, "settings": {}}
    (root / "meta.json").write_text(json.dumps(meta))
    return root


def reverse_task(n, lengths, seed):
    """Prompt: a random list of symbols 4..11; answer: the list reversed. Group = its length."""
    g = np.random.default_rng(seed)
    rows, grp = [], []
    for _ in range(n):
        k = int(g.choice(lengths))
        p = g.integers(4, 12, size=k).tolist()
        rows.append((p, p[::-1]))
        grp.append(GROUPS.index(f"len_{k}"))
    return rows, grp


def batch_of(rows):
    B, Lp, Lt = len(rows), max(len(p) for p, _ in rows), max(len(t) for _, t in rows) + 1
    enc, emask = torch.zeros(B, Lp, dtype=torch.long), torch.zeros(B, Lp, dtype=torch.bool)
    dec, labels = torch.zeros(B, Lt, dtype=torch.long), torch.full((B, Lt), -100)
    for r, (p, t) in enumerate(rows):
        enc[r, :len(p)], emask[r, :len(p)] = torch.tensor(p), True
        dec[r, 0], dec[r, 1:len(t) + 1] = BOS, torch.tensor(t)
        labels[r, :len(t)], labels[r, len(t)] = torch.tensor(t), EOS
    return dict(encoder_ids=enc, encoder_mask=emask, decoder_input_ids=dec, labels=labels)


@pytest.fixture(scope="module")
def reverse_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("reverse")
    train, _ = reverse_task(512, [2, 3, 4], seed=0)
    val, val_g = reverse_task(48, [2, 3, 4], seed=1)
    test, test_g = reverse_task(24, [5], seed=2)  # longer lists than train: the extrapolation split
    write_lm_dataset(root, {"train": train, "validation": val, "test": test},
                     groups={"validation": val_g, "test": test_g})
    return root, train


@pytest.fixture(scope="module", params=["hrm_lm", "lm_transformer"])
def half_trained(request, reverse_data):
    """A model trained just long enough to get some answers right and others wrong: the hybrid, and the
    plain decoder-only baseline (the answer eval serves every LM through models/lm_generation.py)."""
    _, train = reverse_data
    if request.param == "hrm_lm":
        model = tiny(seed=0).train()
    else:
        model = LMTransformer(dict(vocab_size=V, hidden_size=32, num_heads=2, n_layers=2, expansion=2.0)).train()
    head = LMLossHead(model)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    order = np.random.default_rng(0)
    for _ in range(150):
        idx = order.choice(len(train), 32, replace=False)
        _, loss, *_ = head(carry={}, batch=batch_of([train[i] for i in idx]))
        (loss / 32).backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def reference_answer(model, prompt, limit):
    """Greedy, one example, no KV cache: the full decoder pass over BOS + everything generated so far."""
    enc = torch.tensor([prompt])
    out = []
    for _ in range(limit):
        dec = torch.tensor([[BOS] + out])
        out.append(int(model(enc, torch.ones_like(enc, dtype=torch.bool), dec)["logits"][0, -1].argmax()))
        if out[-1] == EOS:
            break
    return out


def test_batched_answers_equal_the_token_by_token_reference(reverse_data, half_trained):
    root, _ = reverse_data
    from lm_dataset import LMSplit
    for split, prefix in (("validation", "eval"), ("test", "eval_extrap")):
        data = LMSplit(root, split)
        groups = np.load(root / split / "groups.npy")
        right = np.zeros(len(data), bool)
        for i in range(len(data)):
            p, t = (x.tolist() for x in data.example(i))
            right[i] = reference_answer(half_trained, p, len(t) + 1) == t + [EOS]
        # batch 7: ragged prompt lengths inside a batch and a short last batch
        m = answer_eval(half_trained, str(root), split, CPU, device=torch.device("cpu"), batch_size=7, prefix=prefix)
        assert m[f"{prefix}/answer_count"] == len(data)
        assert m[f"{prefix}/answer_exact"] == pytest.approx(right.mean(), abs=1e-12)
        for j, name in enumerate(GROUPS):
            key = f"{prefix}/answer_exact/{name}"
            if (groups == j).any():
                assert m[key] == pytest.approx(right[groups == j].mean(), abs=1e-12), key
            else:
                assert key not in m  # a length this split does not hold has no accuracy
        if isinstance(half_trained, HRMLanguageModel):
            assert 0 < m[f"{prefix}/halt/steps"] <= 2 and 0 <= m[f"{prefix}/gate/min"] <= m[f"{prefix}/gate/mean"]
            assert m[f"{prefix}/gate/mean"] <= m[f"{prefix}/gate/max"] <= 1
        else:  # a plain LM has no core: no gate or halting diagnostics to report
            assert not any("/gate/" in k or "/halt/sum_p" in k for k in m) and m[f"{prefix}/halt/steps"] == 0
        if split == "validation":
            assert 0 < right.mean() < 1, right.mean()  # both right and wrong answers are compared


def test_exact_answer_rule():
    gen = torch.tensor([[5, 6, EOS, 9], [5, 6, 7, EOS], [5, EOS, EOS, EOS], [5, 6, 9, 9]])
    targets = [np.array([5, 6]), np.array([5, 6]), np.array([5]), np.array([5, 6])]
    # right; no EOS after the answer; right (shorter target); no EOS
    assert exact_answers(gen, targets, EOS).tolist() == [True, False, True, False]


def test_bits_per_char_by_hand(tmp_path):
    """A model with uniform next-token logits spends ln V nats on every target token, so bits per character
    = (target tokens) * log2(V) / (characters of the targets): counted here from the text itself."""
    from dataset.build_lm_dataset import BuildConfig, build
    from dataset.lm_tokenizer import LMTokenizer
    from lm_dataset import LMSplit
    from utils.data import make_dataset, make_loader
    from utils.evaluation import evaluate
    corpus = tmp_path / "c.txt"
    corpus.write_text(("Café — naïve tea, déjà vu.\n\nThe quick brown fox jumps.\n\n" * 30))
    data = tmp_path / "d"
    build(BuildConfig(source=str(corpus), output_dir=str(data), vocab_size=300, max_seq_len=24, val_ratio=0.3,
                      doc_chars=120, seed=0))
    tok = LMTokenizer.from_dataset(data)
    model = tiny(vocab_size=tok.vocab_size)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # logits 0 everywhere: uniform over the vocabulary
    head = LMLossHead(model)
    ds = make_dataset(str(data), "validation", seed=0, global_batch_size=8, test_set_mode=True, epochs_per_iter=1,
                      rank=0, world_size=1)
    metrics, _ = evaluate(head, make_loader(ds, num_workers=0), CPU, device=torch.device("cpu"), global_batch_size=8)
    split = LMSplit(data, "validation")
    n_tokens = int(split.t_off[-1])
    texts = [tok.decode(split.example(i)[1].tolist()) for i in range(len(split))]
    chars = sum(len(t) for t in texts)
    assert chars < sum(len(t.encode()) for t in texts)  # multi-byte characters: chars, not bytes
    assert target_chars(str(data), "validation", len(split)) == chars
    out = lm_eval(model, str(data), "validation", metrics, CPU, device=torch.device("cpu"), batch_size=8,
                  settings=LMEvalSettings(answers=False), rows_evaluated=len(split))
    assert out["eval/bits_per_char"] == pytest.approx(n_tokens * math.log2(tok.vocab_size) / chars, rel=1e-6)  # float32 CE
    assert "eval/answer_exact" not in out  # text windows are no prompt -> answer data


def _perturb_core(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mod in (model.L_level, model.H_level, model.hrm_in, model.hrm_out, model.gate_proj, model.halt_head):
            for p in mod.parameters():
                p.add_(torch.randn(p.shape, generator=g))
        model.H_init.add_(1.0)
        model.L_init.add_(1.0)


@pytest.mark.parametrize("training", [True, False])
def test_gate_off_logits_do_not_depend_on_the_core(training):
    rows, _ = reverse_task(6, [2, 3, 4], seed=3)
    batch = batch_of(rows)
    off = tiny(gate_mode="off").train(training)
    # the gated model with its gate held at 0 (warmup) decodes the same memory, from the same initial weights
    held = tiny(gate_mode="token", hrm_gate_warmup_steps=10 ** 9).train(training)
    for (n, a), b in zip(off.state_dict().items(), held.state_dict().values()):
        assert torch.equal(a, b), n
    args = (batch["encoder_ids"], batch["encoder_mask"], batch["decoder_input_ids"])
    before = off(*args)
    assert torch.equal(before["logits"], held(*args)["logits"])
    _perturb_core(off)
    after = off(*args)
    assert torch.equal(before["logits"], after["logits"])
    assert off.num_segment_calls == 0 and float(after["gate/max"]) == 0.0
    if training:
        _, loss, m, _, _ = LMLossHead(off)(carry={}, batch=batch)
        loss.backward()
        assert all(p.grad is None for p in off.L_level.parameters())  # no core ran, so none learns
        assert "halt_loss" not in m and float(m["halt/steps"]) == 0.0
    else:
        state = off.prepare_generation(batch["encoder_ids"], batch["encoder_mask"])
        assert state["steps"].tolist() == [0] * 6 and float(state["gate_stats"]["gate/max"]) == 0.0


def test_gate_floor_ramp_and_segment_weights():
    m = tiny(hrm_gate_warmup_steps=4, hrm_gate_ramp_steps=2, gate_floor=0.5, gate_floor_steps=10, gate_init_bias=-3.0)
    assert [m.gate_scale_at(s) for s in (3, 4, 5, 9)] == [0.0, 0.5, 1.0, 1.0]
    assert [m.gate_floor_at(s) for s in (0, 4, 9, 14, 99)] == [0.5, 0.5, 0.25, 0.0, 0.0]
    rows, _ = reverse_task(4, [3], seed=4)
    batch = batch_of(rows)
    m.train()
    m.set_gate_schedule(6)  # floor 0.4: every training gate >= 0.4; eval uses the learned gate
    out = m(batch["encoder_ids"], batch["encoder_mask"], batch["decoder_input_ids"])
    assert float(out["gate/min"]) >= 0.4 - 1e-6
    m.eval()
    assert float(m(batch["encoder_ids"], batch["encoder_mask"], batch["decoder_input_ids"])["gate/min"]) < 0.1  # sigmoid(-3) ~ 0.05

    # per-segment deep supervision: the loss is sum_s w_s * CE_s (the segments' decoder CE, row means)
    w = [0.3, 2.0]
    model = tiny(ds_segment_weights=w, halting_weight=0.0).train()
    _, loss, metrics, _, _ = LMLossHead(model)(carry={}, batch=batch)
    out = model(batch["encoder_ids"], batch["encoder_mask"], batch["decoder_input_ids"])
    ce = [torch.nn.functional.cross_entropy(lg.transpose(1, 2), batch["labels"], ignore_index=-100, reduction="none")
          .sum(-1) / (batch["labels"] != -100).sum(-1) for lg in out["segment_logits"]]
    assert float(loss.detach()) == pytest.approx(float(w[0] * ce[0].sum() + w[1] * ce[1].sum()), rel=1e-5)
    assert model.segment_loss_weights() == w and tiny(ds_weight=0.2).segment_loss_weights() == [0.2, 1.0]


@pytest.mark.parametrize("over, key", [
    (dict(gate_mode="none"), "arch.gate_mode"),
    (dict(gate_floor=1.0), "arch.gate_floor"),
    (dict(gate_floor_steps=-1), "arch.gate_floor_steps"),
    (dict(ds_segment_weights=[1.0]), "arch.ds_segment_weights"),
    (dict(ds_segment_weights=[0.5, 0.0]), "arch.ds_segment_weights"),
    (dict(ds_weight=-0.1), "arch.ds_weight"),
    (dict(hrm_gate_ramp_steps=-5), "arch.hrm_gate_ramp_steps"),
])
def test_bad_arch_values_are_one_line(over, key):
    with pytest.raises(ConfigError) as e:
        tiny(**over)
    assert key in str(e.value) and "\n" not in str(e.value)


def test_bad_eval_settings_are_one_line(reverse_data, repo_root):
    root, _ = reverse_data
    model = tiny()
    with pytest.raises(ConfigError, match="eval_extrap_split.*no split 'extrap'"):
        check_settings(LMEvalSettings(extrap_split="extrap"), model, str(root))
    with pytest.raises(ConfigError, match="eval_answers must|'eval_answers' must be true, false or auto"):
        check_settings(LMEvalSettings(answers="yes"), model, str(root))
    with pytest.raises(ConfigError, match="eval_answers=false"):
        check_settings(LMEvalSettings(answers=False, extrap_split="test"), model, str(root))

    class NoGeneration(torch.nn.Module):
        pass
    with pytest.raises(ConfigError, match="does not generate"):
        check_settings(LMEvalSettings(), NoGeneration(), str(root))
    # and from the command line: one line on stderr, exit 2, before any training
    r = subprocess.run([sys.executable, "pretrain.py", "arch=hrm_lm_transformer", f"data_path={root}",
                        "eval_extrap_split=tset", "logger=none", f"checkpoint_path={root}/ck", "global_batch_size=8"],
                       cwd=repo_root, capture_output=True, text=True, timeout=300,
                       env={"OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PATH": "/usr/bin:/bin"})
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "eval_extrap_split" in errors[0], r.stderr
    r = subprocess.run([sys.executable, "pretrain.py", "arch=hrm_lm_transformer", f"data_path={root}",
                        "eval_answer_max_examples=0", "logger=none"], cwd=repo_root, capture_output=True, text=True,
                       timeout=300, env={"OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2 and r.stderr.startswith("error:") and "eval_answer_max_examples" in r.stderr, r.stderr
    assert r.stderr.strip().count("\n") == 0, r.stderr  # refused before torch is even imported


def test_pretrain_logs_answers_keeps_the_best_and_evaluate_agrees(reverse_data, tmp_path, repo_root):
    """The training eval logs answer accuracy (validation + extrapolation split, per group) and bits per
    character stays absent without a tokenizer; save_best tracks eval/answer_exact; evaluate.py reports the
    same numbers from the best checkpoint."""
    from tests.trainer_helpers import run_cli, train
    root, _ = reverse_data
    ck = tmp_path / "ck"
    arch = ["arch=hrm_lm_transformer", "arch.hidden_size=32", "arch.num_heads=2", "arch.encoder_layers=1",
            "arch.H_layers=1", "arch.L_layers=1", "arch.H_cycles=1", "arch.L_cycles=1", "arch.decoder_layers=1",
            "arch.expansion=2"]
    summary = train(arch + [f"data_path={root}", f"checkpoint_path={ck}", "run_name=t", "project_name=p",
                            "global_batch_size=32", "epochs=2", "eval_interval=1", "eval_split=validation",
                            "eval_extrap_split=test", "optimizer.name=adamw", "lr=3e-3", "lr_warmup_steps=2",
                            "logger=jsonl", "loader_workers=0", "save_best.metric=eval/answer_exact"])
    rows = [json.loads(line) for line in (ck / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/answer_exact" in r]
    assert len(evals) == 2
    for r in evals:
        assert r["eval/answer_count"] == 48 and r["eval_extrap/answer_count"] == 24
        assert {"eval/answer_exact/len_2", "eval/answer_exact/len_4", "eval_extrap/answer_exact/len_5",
                "eval_extrap/gate/mean", "eval_extrap/halt/steps", "eval/gate/mean", "eval/halt/steps"} <= set(r)
        assert "eval/answer_exact/len_5" not in r and "eval/bits_per_char" not in r
    best = json.loads((ck / "best" / "best.json").read_text())
    assert best["metric"] == "eval/answer_exact" and best["value"] == max(r["eval/answer_exact"] for r in evals)
    assert summary["eval/answer_exact"] == evals[-1]["eval/answer_exact"]
    r = run_cli(["evaluate.py", f"checkpoint={ck / 'best'}", "split=validation", f"output_dir={tmp_path / 'ev'}"])
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    want = next(e for e in evals if e["eval/answer_exact"] == best["value"])
    assert got["eval/answer_exact"] == want["eval/answer_exact"]
    assert got["eval/answer_exact/len_3"] == want["eval/answer_exact/len_3"]
