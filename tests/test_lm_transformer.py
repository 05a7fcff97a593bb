"""arch=lm_transformer, the plain decoder-only baseline: causality and padding, cached = uncached generation,
it learns, the hybrid's loss head and trainer/evaluate/generate path, checkpoints, config errors, sizing."""
import io
import json
import math

import pytest
import torch
from trainer_helpers import build_tiny_text_lm, run_cli

from models.hrm_lm.losses import LMLossHead
from models.lm_transformer.lm_transformer import LMTransformer
from models.lm_transformer.sizing import comparison, size_like
from utils.schema import ConfigError

V = 40
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**over):
    return LMTransformer(dict(dict(vocab_size=V, hidden_size=32, num_heads=2, n_layers=2, expansion=2.0), **over))


def make_batch(B=3, Lp=7, Lt=6, seed=0):
    """Row 0 has a 4-token prompt, row 2 an empty one; row 1's target is shorter (labels -100 after 4)."""
    g = torch.Generator().manual_seed(seed)
    enc = torch.randint(3, V, (B, Lp), generator=g)
    emask = torch.ones(B, Lp, dtype=torch.bool)
    emask[0, 4:] = False
    emask[2] = False
    enc[~emask] = 0
    dec = torch.randint(3, V, (B, Lt), generator=g)
    dec[:, 0] = 1
    labels = torch.cat([dec[:, 1:], torch.full((B, 1), 2)], 1)
    labels[1, 4:] = -100
    return dict(encoder_ids=enc, encoder_mask=emask, decoder_input_ids=dec, decoder_mask=labels != -100, labels=labels)


def logits(model, batch, **changes):
    b = dict(batch, **changes)
    return model(b["encoder_ids"], b["encoder_mask"], b["decoder_input_ids"])["logits"]


@pytest.mark.parametrize("training", [True, False])
def test_causal_and_padding_free(training):
    model = tiny().train(training)
    batch = make_batch()
    base = logits(model, batch)
    assert base.shape == (3, 6, V) and base.dtype == torch.float32
    t = 2  # change decoder inputs after position t: logits up to t must not move
    dec = batch["decoder_input_ids"].clone()
    dec[:, t + 1:] = (dec[:, t + 1:] + 7) % V
    torch.testing.assert_close(logits(model, batch, decoder_input_ids=dec)[:, :t + 1], base[:, :t + 1], rtol=0, atol=0)
    assert not torch.allclose(logits(model, batch, decoder_input_ids=dec)[:, t + 1:], base[:, t + 1:])
    # the prompt's padding tokens are never read
    enc = batch["encoder_ids"].clone()
    enc[~batch["encoder_mask"]] = 17
    torch.testing.assert_close(logits(model, batch, encoder_ids=enc), base, rtol=0, atol=0)
    # a padded row equals the same row alone, unpadded (its 4 prompt tokens, then BOS + target)
    alone = model(batch["encoder_ids"][:1, :4], batch["encoder_mask"][:1, :4], batch["decoder_input_ids"][:1])["logits"]
    torch.testing.assert_close(alone, base[:1], rtol=1e-5, atol=1e-5)
    # and the prompt matters: every decoder position sees it
    enc = batch["encoder_ids"].clone()
    enc[1, 0] = (enc[1, 0] + 1) % V
    assert not torch.allclose(logits(model, batch, encoder_ids=enc)[1, 0], base[1, 0])


def test_cached_generation_equals_uncached_token_by_token():
    model = tiny(n_layers=3).eval()
    batch = make_batch()
    enc, mask = batch["encoder_ids"], batch["encoder_mask"]
    cached = torch.stack(list(model.generate(enc, mask, 12, greedy=True)), 1)
    uncached = torch.stack(list(model.generate(enc, mask, 12, greedy=True, use_cache=False)), 1)
    assert cached.shape == (3, 12) and torch.equal(cached, uncached)
    # step logits from the cache equal one full forward over BOS + the generated tokens
    dec_in = torch.cat([torch.ones(3, 1, dtype=torch.long), cached[:, :-1]], 1)
    full = model(enc, mask, dec_in)["logits"]
    state = model.prepare_generation(enc, mask)
    steps = torch.stack([model.decode_step(dec_in[:, i], state) for i in range(dec_in.shape[1])], 1)
    torch.testing.assert_close(steps, full, rtol=1e-5, atol=1e-5)
    assert torch.equal(full.argmax(-1), cached)
    # sampling draws the same tokens from the same seed with and without the cache
    draw = lambda use_cache: torch.stack(list(model.generate(  # noqa: E731
        enc, mask, 10, temperature=0.9, top_k=20, top_p=0.95, generator=torch.Generator().manual_seed(4),
        use_cache=use_cache)), 1)
    assert torch.equal(draw(True), draw(False))


def test_generation_stops_once_every_row_emitted_eos():
    model = tiny().eval()
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: argmax is token 0, which this model calls EOS
    model.config.eos_id = 0
    batch = make_batch()
    out = list(model.generate(batch["encoder_ids"], batch["encoder_mask"], 10, greedy=True))
    assert len(out) == 1 and out[0].tolist() == [0, 0, 0]


def test_same_loss_head_and_metrics_as_the_hybrid():
    model = tiny().train()
    head = LMLossHead(model)
    batch = make_batch()
    _, loss, m, _, all_halted = head(carry={}, batch=batch)
    mask = batch["labels"] != -100
    ce = torch.nn.functional.cross_entropy(logits(model, batch).detach().transpose(1, 2), batch["labels"], reduction="none")
    per_row = ce.sum(-1) / mask.sum(-1)
    assert abs(float(loss.detach()) - float(per_row.sum())) < 1e-5 and bool(all_halted)
    assert not any(k.startswith(("gate/", "halt/", "moe/")) for k in m)
    red = head.reduce_metrics({k: float(v) for k, v in m.items()}, "eval", 3)
    assert abs(red["ce"] - float(ce.sum() / mask.sum())) < 1e-5 and abs(red["ppl"] - math.exp(red["ce"])) < 1e-9
    head.on_train_step(5)  # no gate schedule here: a no-op, not an AttributeError


def test_trains_on_a_tiny_repeated_corpus():
    """Predicting 'abcdefgh' continuations from their first letters: CE must drop far below uniform (ln 40)."""
    model = tiny(n_layers=2, hidden_size=32, expansion=2.0).train()
    head = LMLossHead(model)
    seq = torch.arange(3, 3 + 16)
    enc = torch.stack([seq[i:i + 4] for i in range(8)])
    dec = torch.stack([torch.cat([torch.tensor([1]), seq[i + 4:i + 8]]) for i in range(8)])
    labels = torch.stack([torch.cat([seq[i + 4:i + 8], torch.tensor([2])]) for i in range(8)])
    batch = dict(encoder_ids=enc, encoder_mask=torch.ones_like(enc, dtype=torch.bool), decoder_input_ids=dec,
                 labels=labels)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ces = []
    for _ in range(60):
        _, loss, m, _, _ = head(carry={}, batch=batch)
        opt.zero_grad()
        (loss / 8).backward()
        opt.step()
        ces.append(float(m["ce_sum"]) / float(m["num_tokens"]))
    assert ces[0] > 3.0 and ces[-1] < 0.1 * ces[0], ces[::10]


def test_state_dict_round_trip_and_seeded_init():
    from models.common import load_state_dict_strict

    batch = make_batch()
    a, b = tiny().eval(), tiny(seed=1).eval()
    assert torch.equal(logits(a, batch), logits(tiny().eval(), batch))  # same seed, same weights
    assert not torch.allclose(logits(a, batch), logits(b, batch))
    state = torch.get_rng_state()
    tiny()
    assert torch.equal(torch.get_rng_state(), state)  # building a model leaves the global RNG alone
    load_state_dict_strict(b, a.state_dict())
    assert torch.equal(logits(a, batch), logits(b, batch))
    assert not any("rotary" in k for k in a.state_dict())  # RoPE tables are recomputed, never stored


def test_config_errors(repo_root):
    with pytest.raises(ConfigError, match="did you mean 'n_layers'"):
        tiny(n_layer=3)
    with pytest.raises(ConfigError, match="arch.num_heads"):
        tiny(num_heads=3)
    with pytest.raises(ConfigError, match="arch.n_layers"):
        tiny(n_layers=0)
    with pytest.raises(ConfigError, match="arch.attn_backend"):
        tiny(attn_backend="fast")
    from utils.config import check_arch, preflight_overrides
    with pytest.raises(ConfigError, match="unknown config key 'arch.n_layer' did you mean 'n_layers'"):
        preflight_overrides(["arch=lm_transformer", "arch.n_layer=3"])
    with pytest.raises(ConfigError, match="did you mean 'lm_transformer'"):
        preflight_overrides(["arch=lm_transformr"])
    from omegaconf import OmegaConf
    arch = OmegaConf.to_container(OmegaConf.load(repo_root / "config" / "arch" / "lm_transformer.yaml"))
    check_arch(arch)  # every key of the yaml is a field of the schema
    with pytest.raises(ConfigError, match="did you mean 'hidden_size'"):
        check_arch(dict(arch, hiden_size=64))


def test_sizing_matches_parameters_or_flops():
    """The rule of models/lm_transformer/sizing.py at the hrm_lm_mamba defaults (vocab 300, seq_len 64) and at a
    smaller width: the chosen n_layers is the nearest in its quantity (one block more or less is farther)."""
    from models.lm_transformer.sizing import baseline_config, count, _build_hybrid
    for over in ({}, dict(hidden_size=64, num_heads=2, encoder="transformer", H_cycles=3)):
        hrm = dict(dict(vocab_size=300, seq_len=64), **over)
        rows = comparison(hrm, batch_size=4)
        (_, _, p_hrm, f_hrm), (_, n_p, p_base, _), (_, n_f, _, f_base) = rows
        assert rows[1][0].endswith("params") and n_p >= 2 and abs(p_base / p_hrm - 1) < 0.15
        assert abs(f_base / f_hrm - 1) < 0.15 and n_f >= n_p  # the hybrid re-applies its core: more compute/param
        for n, i, target in ((n_p, 0, p_hrm), (n_f, 1, f_hrm)):
            err = lambda k: abs(count(LMTransformer(baseline_config(hrm, k)), 4)[i] - target)  # noqa: E731
            assert err(n) <= min(err(n - 1), err(n + 1))
        assert size_like(hrm)["hidden_size"] == _build_hybrid(hrm).config.hidden_size


def test_sizing_at_the_ablation_size():
    """Issue 12's ablation size (the hybrid arm, lm_ablation_hrm, on the addition data: vocab 260, seq_len 12):
    the plain arm's n_layers=6 is the parameter match, n_layers=7 the FLOPs match."""
    hrm = dict(vocab_size=260, seq_len=12, encoder="transformer", hidden_size=64, num_heads=2, expansion=2.0,
               encoder_layers=1, H_layers=1, L_layers=1, H_cycles=2, L_cycles=2, halt_max_steps=2, decoder_layers=2)
    (_, _, p_hrm, f_hrm), (_, n_p, p_base, f_p), (_, n_f, p_f, f_base) = comparison(hrm, batch_size=64)
    assert (p_hrm, n_p, p_base, n_f, p_f) == (249_218, 6, 243_008, 7, 277_952)
    assert round(f_p / f_hrm, 2) == 0.90 and round(f_base / f_hrm, 2) == 1.03


# ---- end to end: the trainer, evaluate.py and generate.py on a tiny text dataset --------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_transformer")
    data = build_tiny_text_lm(root)
    ck = root / "ck"
    r = run_cli(["pretrain.py", "arch=lm_transformer", f"data_path={data}", "logger=jsonl", "run_name=t",
            f"checkpoint_path={ck}", "global_batch_size=8", "epochs=1", "eval_interval=1", "eval_split=validation",
            "arch.hidden_size=32", "arch.num_heads=2", "arch.n_layers=2", "optimizer.name=adamw", "lr=1e-3",
            "lr_warmup_steps=1", "save_best.metric=eval/ce", "save_best.mode=min"])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return root, data, ck


def test_pretrain_evaluate_generate(trained):
    import generate
    from dataset.lm_tokenizer import LMTokenizer
    from utils.checkpoint import latest_checkpoint, load_model_from_checkpoint

    _, data, ck = trained
    rows = [json.loads(line) for line in (ck / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "eval/ce" in r][-1]
    assert 0 < last["eval/ce"] < math.log(300) + 1 and abs(last["eval/ppl"] - math.exp(last["eval/ce"])) < 1e-6 * last["eval/ppl"]
    assert any("train/ce" in r and "perf/tokens_per_s" in r for r in rows)
    assert not any(k.startswith("train/gate/") for r in rows for k in r)
    # checkpoint round trip: evaluate.py on the saved weights reproduces the trainer's own eval/ce
    step = latest_checkpoint(ck)
    r = run_cli(["evaluate.py", f"checkpoint={step}", "split=validation", f"output_dir={ck / 'ev'}"])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    ev = json.loads((ck / "ev" / "metrics.json").read_text())
    assert abs(ev["eval/ce"] - last["eval/ce"]) < 1e-5, (ev, last)
    # generate.py streams the model's own greedy tokens
    cfg, head = load_model_from_checkpoint(str(ck))
    assert isinstance(head.model, LMTransformer) and head.model.config.n_layers == 2
    out = io.StringIO()
    stats = generate.run(generate.parse_args([f"checkpoint={ck}", "prompt=First Citizen:", "max_new_tokens=12",
                                              "greedy=true", "echo_prompt=false", "stop_at_eos=true"]), out=out)
    tok = LMTokenizer.from_dataset(data)
    ids = tok.encode("First Citizen:")
    toks = [int(t[0]) for t in head.model.generate(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.bool),
                                                   12, greedy=True)]
    toks = toks[: toks.index(tok.eos_id)] if tok.eos_id in toks else toks
    assert stats["samples"][0] == tok.decode(toks) and stats["hrm_segments"] is None
    assert generate.main([f"checkpoint={ck}", "prompt=", "max_new_tokens=3", "seed=1"]) == 0  # empty prompt
