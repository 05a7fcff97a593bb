"""Inference at evaluation (utils/inference.py, utils/eval_metrics.py): eval halting really ends compute,
K=1/sigma=0 is the deterministic eval bit for bit, the three selectors, Wilson intervals, the maze
optimal-path metric, and the new config keys' one-line errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from utils.eval_metrics import format_interval, maze_optimal_path, wilson_interval
from utils.inference import InferenceSettings, infer_batch, run_trajectories, select_trajectories
from utils.modeling import build_head
from utils.schema import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

ARCH = {"name": "hrm.hrm_act_v1@HierarchicalReasoningModel_ACTV1",
        "loss": {"name": "losses@ACTLossHead", "loss_type": "stablemax_cross_entropy"},
        "hidden_size": 32, "num_heads": 2, "H_layers": 1, "L_layers": 1, "H_cycles": 2, "L_cycles": 2,
        "halt_max_steps": 3, "forward_dtype": "float32", "expansion": 2, "puzzle_emb_ndim": 32}
TRM = {**ARCH, "name": "recursive_reasoning.trm@TinyRecursiveReasoningModel_ACTV1", "H_layers": 0, "L_layers": 2,
       "H_cycles": 2, "L_cycles": 3, "puzzle_emb_len": 2, "no_ACT_continue": True}
ROWS, SEQ, VOCAB = 8, 16, 6


def tiny_head(base=ARCH, **arch):
    head = build_head({**base, **arch}, {"batch_size": ROWS, "seq_len": SEQ, "vocab_size": VOCAB,
                                         "num_puzzle_identifiers": 3}, seed=0)
    return head.eval()


def tiny_batch(seed=1, rows=ROWS):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(1, VOCAB, (rows, SEQ), generator=g)
    labels[-1] = -100  # a padding row: no labels, must not count
    return {"inputs": torch.randint(1, VOCAB, (rows, SEQ), generator=g), "labels": labels,
            "puzzle_identifiers": torch.randint(0, 3, (rows,), generator=g)}


def reference_eval(head, batch):
    """The ACT wrapper's own eval loop (what evaluate() ran before eval halting existed)."""
    carry = head.initial_carry(batch)
    while True:
        carry, _, metrics, outputs, all_halted = head(return_keys=["logits", "q_halt_logits"], carry=carry, batch=batch)
        if bool(all_halted):
            return metrics, outputs


def randomise_q_head(head, batch, seed=3):
    """Untrained Q-heads never halt (weight 0, bias -5 for both logits): give rows different Q values,
    centred so that about half the rows halt after the first segment."""
    q_head = head.model.inner.q_head
    g = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        q_head.weight.copy_(torch.randn(q_head.weight.shape, generator=g))
        q_head.bias.zero_()
        first = run_trajectories(head.model, batch, max_segments=1, halting="all")
        # HRM halts when q_halt > q_continue, TRM (no_ACT_continue) when q_halt > 0
        margin = first.q_halt - (0 if getattr(head.model.config, "no_ACT_continue", False) else first.q_continue)
        q_head.bias[0] = -torch.median(margin) + 1e-3


class CallCounter:
    """Rows that went through the H module (one count per row per H call)."""

    def __init__(self, module):
        self.rows = 0
        module.register_forward_hook(lambda _m, args, _out: setattr(self, "rows", self.rows + args[0].shape[0]))


# ---------------------------------------------------------------------------------------------------
# bit-exactness and halting

@pytest.mark.parametrize("arch", ["hrm", "hrm_gated", "trm"])
def test_k1_sigma0_equals_deterministic_eval_bit_for_bit(arch):
    head = tiny_head(TRM) if arch == "trm" else tiny_head(use_gating=arch == "hrm_gated")
    batch = tiny_batch()
    with torch.inference_mode():
        ref_metrics, ref_out = reference_eval(head, batch)
        metrics, out = infer_batch(head, batch, InferenceSettings())
    for key, value in ref_metrics.items():
        assert torch.equal(metrics[key], value), key
    assert torch.equal(out["logits"], ref_out["logits"])
    assert torch.equal(out["q_halt_logits"], ref_out["q_halt_logits"])
    assert int(metrics["count"]) == ROWS - 1 and int(metrics["segments"]) == 3 * (ROWS - 1)


@pytest.mark.parametrize("arch", ["hrm", "trm"])
def test_q_halting_equals_all_when_the_criterion_never_fires(arch):
    # untrained Q-heads: q_halt == q_continue == -5, so neither q_halt > q_continue (HRM) nor q_halt > 0 (TRM)
    head = tiny_head(TRM) if arch == "trm" else tiny_head()
    batch = tiny_batch()
    with torch.inference_mode():
        m_all, o_all = infer_batch(head, batch, InferenceSettings(halting="all"))
        m_q, o_q = infer_batch(head, batch, InferenceSettings(halting="q"))
    assert all(torch.equal(m_all[k], m_q[k]) for k in m_all)
    assert torch.equal(o_all["logits"], o_q["logits"])


@pytest.mark.parametrize("arch", ["hrm", "trm"])
def test_q_halting_stops_compute_for_halted_rows(arch):
    head = tiny_head(TRM) if arch == "trm" else tiny_head()
    batch = tiny_batch()
    randomise_q_head(head, batch)
    counter = CallCounter(head.model.inner.L_level)
    with torch.inference_mode():
        traj_all = run_trajectories(head.model, batch, max_segments=3, halting="all")
        rows_all = counter.rows
        counter.rows = 0
        traj_q = run_trajectories(head.model, batch, max_segments=3, halting="q")
    cfg = head.model.config
    calls = cfg.H_cycles * (cfg.L_cycles if arch == "hrm" else cfg.L_cycles + 1)  # L-module calls per segment
    assert rows_all == calls * ROWS * 3 and traj_all.steps.tolist() == [3] * ROWS
    steps = traj_q.steps.tolist()
    assert min(steps) < 3 and max(steps) > 1, steps  # some rows stopped early, some ran on
    assert counter.rows == calls * sum(steps) < rows_all  # compute ran only for rows still running
    # a row that stopped at segment s holds the answer it had after s segments of the full run
    with torch.inference_mode():
        for s in sorted(set(steps)):
            capped = run_trajectories(head.model, batch, max_segments=s, halting="all")
            rows = [i for i in range(ROWS) if steps[i] == s]
            torch.testing.assert_close(traj_q.logits[rows], capped.logits[rows], rtol=1e-5, atol=1e-5)


def test_eval_max_segments_caps_the_budget():
    head = tiny_head()
    batch = tiny_batch()
    counter = CallCounter(head.model.inner.H_level)
    with torch.inference_mode():
        metrics, _ = infer_batch(head, batch, InferenceSettings(max_segments=5))
    assert int(metrics["steps"]) == 5 * (ROWS - 1) and counter.rows == ARCH["H_cycles"] * ROWS * 5


def test_k_samples_without_noise_are_identical_and_batched():
    head = tiny_head()
    batch = tiny_batch()
    counter = CallCounter(head.model.inner.H_level)
    with torch.inference_mode():
        m1, o1 = infer_batch(head, batch, InferenceSettings())
        calls_1 = counter.rows
        counter.rows = 0
        m4, o4 = infer_batch(head, batch, InferenceSettings(samples=4, select="vote"))
    assert counter.rows == 4 * calls_1  # one batched run of 4x the rows
    torch.testing.assert_close(o4["logits"], o1["logits"], rtol=1e-5, atol=1e-5)
    assert int(m4["segments"]) == 4 * int(m1["segments"])
    assert int(m4["oracle_exact_accuracy"]) == int(m1["exact_accuracy"])


# ---------------------------------------------------------------------------------------------------
# selectors on hand-made trajectories (2 puzzles x 3 samples)

def test_selectors_on_hand_made_trajectories():
    preds = torch.tensor([[1, 1], [2, 2], [2, 2],     # puzzle 0: answers A, B, B
                          [3, 3], [4, 4], [5, 5]])    # puzzle 1: three different answers
    q = torch.tensor([3.0, 0.0, -1.0, -2.0, 1.0, 0.5])
    steps = torch.tensor([3, 1, 2, 2, 3, 2], dtype=torch.int32)
    assert select_trajectories(preds, q, steps, 3, "q").tolist() == [0, 4]          # highest q
    assert select_trajectories(preds, q, steps, 3, "first_halt").tolist() == [1, 5]  # fewest segments; tie -> q
    assert select_trajectories(preds, q, steps, 3, "vote").tolist() == [1, 4]       # majority B; 3-way tie -> q
    # a vote tie between two answers goes to the answer whose voters are more confident
    preds = torch.tensor([[1], [1], [2], [2]])
    q = torch.tensor([0.0, 0.2, -3.0, 2.0])  # mean sigmoid: answer 1 ~0.52, answer 2 ~0.45
    assert select_trajectories(preds, q, torch.ones(4, dtype=torch.int32), 4, "vote").tolist() == [0]


# ---------------------------------------------------------------------------------------------------
# metrics

def test_wilson_interval_known_values():
    # reference values of the Wilson score interval (z = 1.96)
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert format_interval(0.874, 0.869, 0.879) == "87.4 % [86.9, 87.9]"


def maze(rows: list[str]) -> np.ndarray:
    from dataset.build_maze_dataset import CHARSET
    return np.array([[CHARSET.index(c) + 1 for c in r] for r in rows], dtype=np.uint8).reshape(1, -1)


# Two shortest S->G routes (over the top and under the bottom, 6 steps each) and a longer detour.
QUESTION = ["#######",
            "#     #",
            "#S# #G#",
            "#     #",
            "#     #",
            "#######",
            "#######"]


def test_maze_metric_accepts_an_alternative_shortest_path_and_rejects_longer_or_broken():
    q = maze(QUESTION)
    top = maze(["#######", "#ooooo#", "#S# #G#", "#     #", "#     #", "#######", "#######"])
    bottom = maze(["#######", "#     #", "#S# #G#", "#ooooo#", "#     #", "#######", "#######"])
    longer = maze(["#######", "#     #", "#S# #G#", "#o   o#", "#ooooo#", "#######", "#######"])
    broken = maze(["#######", "#oo oo#", "#S# #G#", "#     #", "#     #", "#######", "#######"])
    extra = maze(["#######", "#ooooo#", "#S# #G#", "#o    #", "#     #", "#######", "#######"])
    wall_moved = maze(["#######", "#ooooo#", "#S  #G#", "#     #", "#     #", "#######", "#######"])
    preds = np.concatenate([top, bottom, longer, broken, extra, wall_moved])
    ok = maze_optimal_path(np.repeat(q, len(preds), axis=0), preds)
    assert ok.tolist() == [True, True, False, False, False, False]


# ---------------------------------------------------------------------------------------------------
# bad input: one line each

@pytest.mark.parametrize("override, message", [
    ("eval_samples=0", "'eval_samples' must be an integer >= 1"),
    ("eval_noise_std=-0.1", "'eval_noise_std' must be a finite number >= 0"),
    ("eval_select=best", "'eval_select' must be one of q, first_halt, vote"),
    ("eval_halting=sometimes", "'eval_halting' must be one of all, q"),
    ("eval_max_segments=0", "'eval_max_segments' must be an integer >= 1 or null"),
])
def test_bad_inference_keys_fail_before_any_work(override, message):
    from trainer_helpers import compose
    with pytest.raises(ConfigError, match=message) as err:
        compose(["data_path=/nonexistent", override])
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("word, message", [
    ("eval_samples=0", "'eval_samples' must be an integer >= 1"),
    ("eval_samples=two", "'eval_samples' expects an integer"),
    ("eval_noise_std=-1", "'eval_noise_std' must be a finite number >= 0"),
    ("eval_noise_std=nan", "'eval_noise_std' must be a finite number >= 0"),
    ("eval_select=mean", "'eval_select' must be one of q, first_halt, vote"),
    ("eval_halting=never", "'eval_halting' must be one of all, q"),
])
def test_bad_inference_keys_in_evaluate_cli(word, message):
    import evaluate
    with pytest.raises(ConfigError, match=message):
        evaluate.parse_args(["checkpoint=/x", word])


# ---------------------------------------------------------------------------------------------------
# noisy trajectories

def noisy(head, batch, seed, samples=4, std=0.5):
    from utils.inference import noise_hook, repeat_rows
    gen = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        return run_trajectories(head.model, repeat_rows(batch, samples), max_segments=3, halting="all",
                                hook=noise_hook(std, gen))


@pytest.mark.parametrize("arch", ["hrm", "trm"])
def test_sampling_is_seeded_and_samples_differ(arch):
    head = tiny_head(TRM) if arch == "trm" else tiny_head()
    batch = tiny_batch()
    a, b, c = noisy(head, batch, 7), noisy(head, batch, 7), noisy(head, batch, 8)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.q_halt, b.q_halt)  # same seed, same trajectories
    assert not torch.allclose(a.logits, c.logits)  # another seed, other trajectories
    per_puzzle = a.logits.view(ROWS, 4, SEQ, VOCAB)
    assert not torch.allclose(per_puzzle[:, 0], per_puzzle[:, 1])  # the K samples of one puzzle differ
    with torch.inference_mode():
        clean = run_trajectories(head.model, batch, max_segments=3, halting="all")
    assert not torch.allclose(per_puzzle[:, 0], clean.logits)


def test_noise_is_relative_to_the_state_rms():
    from utils.inference import noise_hook
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(64, 16, 256, generator=gen) * 3.0
    noisy_z = noise_hook(0.1, torch.Generator().manual_seed(1))(None, z)
    ratio = (noisy_z - z).pow(2).mean().sqrt() / z.pow(2).mean().sqrt()
    assert float(ratio) == pytest.approx(0.1, rel=0.02)


def test_evaluate_sampling_is_reproducible_and_k1_sigma0_matches(tmp_path):
    """Through utils.evaluation.evaluate (what pretrain.py and evaluate.py call): K=1/sigma=0 gives the same
    metrics as the default, the same seed the same numbers, and the interval keys exist."""
    from utils.evaluation import evaluate
    from utils.distributed import DistInfo
    head = tiny_head()
    batches = [tiny_batch(seed=s) for s in (1, 2)]

    class Loader:
        def __iter__(self):
            return iter([("all", b, ROWS - 1) for b in batches])

        def state_dict(self):
            return {}

        def load_state_dict(self, _):
            pass

    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    run = lambda s: evaluate(head, Loader(), info, device=info.device, settings=s)[0]  # noqa: E731
    base = run(None)
    assert run(InferenceSettings(samples=1, noise_std=0.0)) == base
    assert base["eval/samples"] == 1 and base["eval/segments_mean"] == 3
    assert base["eval/exact_accuracy_ci_low"] <= base["eval/exact_accuracy"] <= base["eval/exact_accuracy_ci_high"]
    assert base["eval/flops_per_puzzle"] == pytest.approx(3 * head.model.segment_flops(1))
    s1 = run(InferenceSettings(samples=4, noise_std=0.3, select="vote", seed=5))
    assert s1 == run(InferenceSettings(samples=4, noise_std=0.3, select="vote", seed=5))
    assert s1["eval/samples"] == 4 and s1["eval/segments_mean"] == 3
    assert s1["eval/flops_per_puzzle"] == pytest.approx(4 * base["eval/flops_per_puzzle"])


def test_maze_metric_inside_the_eval():
    """task='maze': eval/maze_optimal_path counts the rows whose answer is a shortest path. A stub model answers
    the reference path for row 0 and a broken path for row 1."""
    q = maze(QUESTION)
    top = maze(["#######", "#ooooo#", "#S# #G#", "#     #", "#     #", "#######", "#######"])
    broken = maze(["#######", "#oo oo#", "#S# #G#", "#     #", "#     #", "#######", "#######"])
    batch = {"inputs": torch.from_numpy(np.concatenate([q, q])).int(),
             "labels": torch.from_numpy(np.concatenate([top, top])).int(),
             "puzzle_identifiers": torch.zeros(2, dtype=torch.int32)}
    answers = torch.from_numpy(np.concatenate([top, broken])).long()

    class Inner(torch.nn.Module):
        def empty_carry(self, rows, device=None):
            from models.act import InnerCarry
            return InnerCarry(z_H=torch.zeros(rows, 1), z_L=torch.zeros(rows, 1))

        def reset_carry(self, flag, carry):
            return carry

        def forward(self, carry, data):
            rows = data["inputs"].shape[0]
            logits = torch.nn.functional.one_hot(answers[:rows], 6).float()
            return carry, logits, (torch.zeros(rows), torch.zeros(rows)), {}

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Inner()
            self.config = type("C", (), {"halt_max_steps": 1})()

    from models.losses import ACTLossHead
    head = ACTLossHead(Model(), "softmax_cross_entropy")
    with torch.inference_mode():
        metrics, _ = infer_batch(head, batch, InferenceSettings(), task="maze")
    assert int(metrics["maze_optimal_path"]) == 1 and int(metrics["exact_accuracy"]) == 1


def test_summary_line_and_table():
    from utils.eval_metrics import metrics_table, summary_line
    m = {"eval/exact_accuracy": 0.874, "eval/exact_accuracy_ci_low": 0.869, "eval/exact_accuracy_ci_high": 0.879,
         "eval/segments_mean": 2.5, "eval/samples": 4.0, "arc/pass@1": 0.5, "arc/num_tasks": 10.0}
    assert summary_line(m) == "exact 87.4 % [86.9, 87.9], 2.50 segments x 4 samples"
    table = metrics_table(m, "data/x/test", "ckpt/step_1").splitlines()
    assert table[0].split() == ["metric", "value", "95", "%", "interval", "segments", "samples", "dataset", "checkpoint"]
    assert table[2].split() == ["exact", "accuracy", "87.4", "%", "[86.9,", "87.9]", "2.50", "4", "data/x/test",
                                "ckpt/step_1"]
    lo, hi = wilson_interval(5, 10)
    assert f"[{100 * lo:.1f}, {100 * hi:.1f}]" in table[3]  # ARC pass@1: Wilson over tasks


def test_heads_without_act_segments_refuse_inference_keys():
    """An LM-style head (no ACT segment protocol) evaluates as before by default, and refuses the new keys
    in one line (pretrain.py checks this before training)."""
    from utils.evaluation import check_inference_support
    head = torch.nn.Linear(2, 2)
    assert check_inference_support(head, InferenceSettings()) is False
    with pytest.raises(ConfigError, match="does not support eval_halting/eval_max_segments/eval_samples"):
        check_inference_support(head, InferenceSettings(samples=2))
    assert check_inference_support(tiny_head(), InferenceSettings(samples=2, noise_std=0.1)) is True
