"""HRM-LM end to end: build a tiny dataset, train a few steps with pretrain.py (arch=hrm_lm_mamba), check the
eval metrics (decoder CE and perplexity), then generate from the checkpoint and exercise the bad inputs."""
import io
import json
import math
import subprocess
import sys

import pytest
import torch
from trainer_helpers import LM_TEXT, build_tiny_text_lm

import generate
from utils.schema import ConfigError

TEXT = LM_TEXT


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, repo_root):
    root = tmp_path_factory.mktemp("hrm_lm")
    data = build_tiny_text_lm(root)
    run = lambda *a: subprocess.run([sys.executable, *a], cwd=repo_root, capture_output=True, text=True,  # noqa: E731
                                    env={"OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PATH": "/usr/bin:/bin"})
    ck = root / "ck"
    r = run("pretrain.py", "arch=hrm_lm_mamba", f"data_path={data}", "logger=jsonl", "run_name=t", f"checkpoint_path={ck}",
            "global_batch_size=8", "epochs=1", "eval_interval=1", "eval_split=validation",
            "arch.hidden_size=32", "arch.num_heads=1", "arch.encoder_layers=1", "arch.H_layers=1", "arch.L_layers=1",
            "arch.decoder_layers=1", "arch.mamba_d_state=16", "arch.mamba_chunk_size=16",
            "optimizer.name=adamw", "lr=1e-3", "lr_warmup_steps=1", "save_best.metric=eval/ce", "save_best.mode=min")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return root, data, ck


def test_pretrain_reports_decoder_ce_and_ppl(trained):
    _, data, ck = trained
    rows = [json.loads(line) for line in (ck / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/ce" in r]
    assert evals, rows[-1]
    last = evals[-1]
    assert abs(last["eval/ppl"] - math.exp(last["eval/ce"])) < 1e-6 * last["eval/ppl"]
    assert 0 < last["eval/ce"] < math.log(300) + 1  # near-uniform at worst after 4 steps
    # bits per character: the target nats over the decoded targets' characters (utils/lm_eval.py); text windows
    # are no prompt -> answer data, so no answer decoding
    assert 0 < last["eval/bits_per_char"] < last["eval/target_nats"] and "eval/answer_exact" not in last
    train = [r for r in rows if "train/ce" in r]
    assert train and "perf/tokens_per_s" in train[-1] and "train/gate/mean" in train[-1]
    assert (ck / "best").is_dir()
    # the tokenizer travels with every checkpoint, so generation does not need the dataset
    assert (ck / "best" / "tokenizer.json").read_text() == (data / "tokenizer.json").read_text()


def test_generate_streams_and_matches_model(trained):
    _, data, ck = trained
    out = io.StringIO()
    cfg = generate.parse_args([f"checkpoint={ck}", "prompt=First Citizen:", "max_new_tokens=12", "greedy=true",
                               "echo_prompt=false", "stop_at_eos=true"])
    stats = generate.run(cfg, out=out)
    printed = out.getvalue()[:-1]  # streamed text + final newline
    assert printed == stats["samples"][0][: len(printed)]  # streamed pieces add up to the decoded sample
    # same tokens as the model's own greedy decode
    from dataset.lm_tokenizer import LMTokenizer
    from utils.checkpoint import load_model_from_checkpoint
    _, head = load_model_from_checkpoint(str(ck))
    tok = LMTokenizer.from_dataset(data)
    ids = tok.encode("First Citizen:")
    toks = [int(t[0]) for t in head.model.generate(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.bool),
                                                   12, greedy=True)]
    toks = toks[: toks.index(tok.eos_id)] if tok.eos_id in toks else toks
    assert stats["samples"][0] == tok.decode(toks)
    # sampling is reproducible from the seed
    a = generate.run(generate.parse_args([f"checkpoint={ck}", "prompt=All:", "seed=3", "top_p=0.9", "top_k=20",
                                          "temperature=0.8", "max_new_tokens=8"]), out=io.StringIO())
    b = generate.run(generate.parse_args([f"checkpoint={ck}", "prompt=All:", "seed=3", "top_p=0.9", "top_k=20",
                                          "temperature=0.8", "max_new_tokens=8"]), out=io.StringIO())
    assert a["samples"] == b["samples"]


def test_generate_bad_inputs(trained, tmp_path, capsys):
    root, data, ck = trained
    long_prompt = "Speak, speak. " * 200
    assert generate.main([f"checkpoint={ck}", f"prompt={long_prompt}", "prompt_overflow=error"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: prompt has ") and "accepts at most" in err and err.count("\n") == 1
    assert generate.main([f"checkpoint={ck}", f"prompt={long_prompt}", "max_new_tokens=2", "echo_prompt=false"]) == 0
    assert "warning: prompt has" in capsys.readouterr().err

    from dataset.lm_tokenizer import train_bpe_tokenizer
    other = train_bpe_tokenizer([TEXT], vocab_size=280)
    other.save(str(tmp_path / "other.json"))
    assert generate.main([f"checkpoint={ck}", "prompt=x", f"tokenizer={tmp_path / 'other.json'}"]) == 2
    assert "tokenizer vocabulary has" in capsys.readouterr().err
    assert generate.main([f"checkpoint={tmp_path / 'nope'}", "prompt=x"]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="did you mean 'temperature'"):
        generate.parse_args([f"checkpoint={ck}", "temprature=0.5"])
    with pytest.raises(ConfigError, match="expects true/false"):
        generate.parse_args([f"checkpoint={ck}", "greedy=maybe"])
    assert generate.parse_args(["--checkpoint", str(ck), "--top_k", "5"]).top_k == 5


def test_generate_goes_past_the_training_window_and_checks_sampling_keys(trained, capsys, monkeypatch):
    """A trained model ends each continuation with EOS after about one training window (64 tokens for the
    README's tinyshakespeare run); asked for 100 tokens it must still write 100, window after window. The
    4-step model here has not learnt EOS yet, so its generate() is made to end every window at 16 tokens."""
    _, _, ck = trained
    from models.hrm_lm.hrm_lm_v1 import HRMLanguageModel
    original = HRMLanguageModel.generate

    def eos_after_16(self, *args, **kwargs):
        for i, tok in enumerate(original(self, *args, **kwargs)):
            if i == 16:
                yield torch.full_like(tok, self.config.eos_id)
                return
            yield tok

    monkeypatch.setattr(HRMLanguageModel, "generate", eos_after_16)
    assert generate.main([f"checkpoint={ck}", "prompt=First Citizen:", "max_new_tokens=100", "greedy=true"]) == 0
    err = capsys.readouterr().err
    assert "generated 100 tokens" in err and "window(s)" in err
    stats = generate.run(generate.parse_args([f"checkpoint={ck}", "prompt=First Citizen:", "max_new_tokens=100",
                                              "greedy=true"]), out=io.StringIO())
    assert stats["tokens"] == 100 and stats["windows"] == 7  # 6 x 16 + 4
    short = generate.run(generate.parse_args([f"checkpoint={ck}", "prompt=First Citizen:", "max_new_tokens=100",
                                              "greedy=true", "stop_at_eos=true"]), out=io.StringIO())
    assert short["tokens"] == 16 and short["windows"] == 1
    assert generate.main([f"checkpoint={ck}", "prompt=x", "max_new_tokens=100", "greedy=true", "stop_at_eos=true"]) == 0
    assert "stopped at the model's end-of-text" in capsys.readouterr().err
    for bad, message in (("top_p=1.5", "'top_p' must be in (0, 1]"), ("top_p=0", "'top_p' must be in (0, 1]"),
                         ("top_k=-1", "'top_k' must be >= 0"), ("temperature=-0.5", "'temperature' must be >= 0")):
        assert generate.main([f"checkpoint={ck}", "prompt=x", bad]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
