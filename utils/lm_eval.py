"""LM-dataset evaluation beyond the loss: answer accuracy and bits per character, for pretrain.py's evals and
evaluate.py alike.

Answer accuracy (prompt -> answer datasets, e.g. `build_lm_dataset reasoning`): every example's answer is
decoded greedily from its prompt, a batch at a time, with the model's own KV cache (the generation protocol
below), for at most len(target) + 1 tokens. It is exact when the tokens before the first EOS equal the
target and EOS follows. Logged as `<prefix>/answer_exact` (+ its 95 % Wilson interval and the example
count), per group `<prefix>/answer_exact/<group>` where `<split>/groups.npy` exists (example i's index into
meta.json["reasoning"]["groups"]), and the diagnostics of the core on those prompts: gate mean/min/max/
saturation, halt sum and segments used (`<prefix>/gate/...`, `<prefix>/halt/sum_p`, `<prefix>/halt/steps`,
per group `<prefix>/halt/steps/<group>`). prefix = `eval` for the eval split; `eval_extrap` for
`eval_extrap_split` (a reasoning dataset's test split holds the harder, extrapolation items).

Bits per character (every LM dataset with a tokenizer): the loss head's `target_nats` (cross-entropy summed
over the target tokens of the evaluated rows, EOS excluded) / the number of characters of those targets
(decoded text) / ln 2, so that models with different tokenizers compare.

Answers are decoded by the generation loop every LM shares (models/lm_generation.py: arch=hrm_lm_* and
arch=lm_transformer), so a model needs its protocol (prepare_generation, decode_step, config.bos_id/eos_id).
Optional state keys read as diagnostics (the hybrid has them; a plain LM has none): steps [B],
halt_probs [B, S], gate_stats {gate/mean, gate/min, gate/max, gate/saturation} (batch values).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from utils.distributed import DistInfo, all_reduce_max, all_reduce_sum
from utils.eval_metrics import wilson_interval
from utils.modeling import autocast_context
from utils.schema import ConfigError

ANSWER_MODES = (True, False, "auto")
GATE_KEYS = ("gate/mean", "gate/min", "gate/max", "gate/saturation")


@dataclass
class LMEvalSettings:
    answers: Union[bool, str] = "auto"     # true | false | auto (prompt -> answer datasets)
    max_examples: Optional[int] = None     # answer-decode at most the first N examples of a split
    extrap_split: Optional[str] = None     # also answer-evaluate this split as eval_extrap/...

    @classmethod
    def from_config(cls, cfg) -> "LMEvalSettings":
        return cls(answers=cfg.eval_answers, max_examples=cfg.eval_answer_max_examples,
                   extrap_split=cfg.eval_extrap_split)


def is_answer_dataset(meta: dict) -> bool:
    """Prompt -> answer data (reasoning tasks, prompt/response records), not windows of running text."""
    return "reasoning" in meta or meta.get("build", {}).get("mode") in ("prompt_response", "triples")


def supports_answers(model) -> bool:
    from models.lm_generation import LMGeneration
    return isinstance(model, LMGeneration)


def wants_answers(settings: LMEvalSettings, meta: dict) -> bool:
    return settings.answers is True or (settings.answers == "auto" and is_answer_dataset(meta))


def check_settings(settings: LMEvalSettings, model, data_path: str) -> None:
    """Before any training: a bad combination is one ConfigError line, not a failure at the first eval."""
    from lm_dataset import load_lm_meta
    if settings.answers not in ANSWER_MODES:
        raise ConfigError(f"config key 'eval_answers' must be true, false or auto; got {settings.answers!r}")
    meta = load_lm_meta(data_path)
    if settings.extrap_split is not None:
        if settings.extrap_split not in meta["splits"]:
            raise ConfigError(f"config key 'eval_extrap_split': '{data_path}' has no split '{settings.extrap_split}' "
                              f"(have {', '.join(meta['splits'])})")
        if not meta["splits"][settings.extrap_split]:
            raise ConfigError(f"config key 'eval_extrap_split': split '{settings.extrap_split}' of '{data_path}' "
                              "is empty")
        if settings.answers is False:
            raise ConfigError("config key 'eval_extrap_split' needs answer decoding, but eval_answers=false")
    if (wants_answers(settings, meta) or settings.extrap_split) and not supports_answers(model):
        raise ConfigError(f"eval_answers/eval_extrap_split: {type(model).__name__} does not generate "
                          "(no LMGeneration, models/lm_generation.py); set eval_answers=false")


# ---------------------------------------------------------------------------------------------------
# data


def load_groups(data_path, split: str, meta: dict) -> Optional[tuple[list[str], np.ndarray]]:
    """(group names, int64 [N] index per example) from `<split>/groups.npy`, or None when absent."""
    from dataset.lm_tokenizer import LMDataError
    path = Path(data_path) / split / "groups.npy"
    if not path.is_file():
        return None
    names = meta.get("reasoning", {}).get("groups")
    if not isinstance(names, list) or not names:
        raise LMDataError(f"{path}: exists but {data_path}/meta.json has no reasoning.groups list to name its groups")
    try:
        ids = np.load(path, allow_pickle=False)
    except ValueError as e:
        raise LMDataError(f"{path}: not a numeric .npy array ({e})") from None
    n = int(meta["splits"][split])
    if ids.shape != (n,) or ids.dtype.kind not in "iu":
        raise LMDataError(f"{path}: expected int32[{n}] (one group per example), got {ids.dtype}{list(ids.shape)}")
    if n and (ids.min() < 0 or ids.max() >= len(names)):
        bad = int(np.argmax((ids < 0) | (ids >= len(names))))
        raise LMDataError(f"{path}: row {bad} has group {int(ids[bad])}, outside the {len(names)} names of "
                          "meta.json reasoning.groups")
    return [str(x) for x in names], ids.astype(np.int64)


def pad_prompts(prompts: list[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded encoder ids and mask [B, Lp] (the loader's layout; an empty prompt = one masked pad)."""
    Lp = max([len(p) for p in prompts] + [1])
    ids = np.full((len(prompts), Lp), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), Lp), dtype=bool)
    for r, p in enumerate(prompts):
        ids[r, :len(p)] = p
        mask[r, :len(p)] = True
    return torch.from_numpy(ids), torch.from_numpy(mask)


@functools.lru_cache(maxsize=16)
def target_chars(data_path: str, split: str, rows: int) -> int:
    """Characters of the decoded targets of the first `rows` examples (cached: a split's text is fixed)."""
    from dataset.lm_tokenizer import LMTokenizer
    from lm_dataset import LMSplit
    tok = LMTokenizer.from_dataset(data_path)
    data = LMSplit(data_path, split)
    ends = data.t_off[:min(rows, len(data)) + 1]
    tokens = np.asarray(data.target_tokens[:int(ends[-1])])
    return sum(len(tok.decode(tokens[a:b].tolist())) for a, b in zip(ends[:-1], ends[1:]))


def bits_per_char(target_nats: float, chars: int) -> float:
    return target_nats / max(chars, 1) / math.log(2)


# ---------------------------------------------------------------------------------------------------
# decoding


@torch.no_grad()
def greedy_decode(model, encoder_ids: torch.Tensor, encoder_mask: torch.Tensor, limits: torch.Tensor):
    """Greedy tokens [B, T] (T = max limit) from BOS with the model's KV cache, and the generation state,
    through the one generation loop (models/lm_generation.py). Row r is decided after limits[r] tokens or
    its first EOS; decoding stops once every row is decided, not only once every row emitted EOS (a wrong
    answer that never ends costs at most its own limit). Positions after a row's EOS hold EOS."""
    state = model.prepare_generation(encoder_ids, encoder_mask)
    B, T = encoder_ids.shape[0], int(limits.max())
    out = torch.full((B, T), model.config.eos_id, dtype=torch.long, device=encoder_ids.device)
    decided = torch.zeros(B, dtype=torch.bool, device=encoder_ids.device)
    for t, tok in enumerate(model.generate(encoder_ids, encoder_mask, T, greedy=True, state=state)):
        out[:, t] = tok
        decided |= (tok == model.config.eos_id) | (limits <= t + 1)
        if bool(decided.all()):  # one host sync per token: eval, not a training step
            break
    return out, state


def exact_answers(generated: torch.Tensor, targets: list[np.ndarray], eos_id: int) -> torch.Tensor:
    """bool [B]: row r's first len(t)+1 tokens are t followed by EOS."""
    B, T = generated.shape
    want = torch.full((B, T), -1, dtype=torch.long)
    for r, t in enumerate(targets):
        want[r, :len(t)] = torch.as_tensor(t.astype(np.int64))
        want[r, len(t)] = eos_id
    want = want.to(generated.device)
    return ((generated == want) | (want < 0)).all(-1)


@torch.inference_mode()
def answer_eval(model, data_path: str, split: str, info: DistInfo, *, device: torch.device, batch_size: int,
                max_examples: Optional[int] = None, prefix: str = "eval", mixed_precision: str = "none",
                progress: bool = False) -> dict[str, float]:
    """Answer accuracy (overall and per group) and core diagnostics of one split; every rank calls it and
    decodes rows rank, rank + world, ...; one all-reduce at the end."""
    from lm_dataset import LMSplit, load_lm_meta
    meta = load_lm_meta(data_path)
    data = LMSplit(data_path, split, meta)
    n = len(data) if max_examples is None else min(len(data), max_examples)
    grouped = load_groups(data_path, split, meta)
    names, group_of = grouped if grouped is not None else ([], np.zeros(len(data), np.int64))
    G = len(names)
    rows = np.arange(info.rank, n, info.world_size)
    was_training = model.training
    model.eval()
    # sums: [correct, count, gate mean*rows, gate saturation*rows, halt_sum, steps] + per group [correct, count, steps]
    sums = torch.zeros(6 + 3 * G, dtype=torch.float64)
    gmin, gmax = torch.full((1,), math.inf, dtype=torch.float64), torch.full((1,), -math.inf, dtype=torch.float64)
    bar = None
    if progress and info.is_main:
        from utils.progress import Progress
        bar = Progress(-(-len(rows) // batch_size), desc=f"{prefix} answers ({split})", unit="batch", leave=False)
    try:
        for start in range(0, len(rows), batch_size):
            idx = rows[start:start + batch_size]
            prompts, targets = zip(*(data.example(int(i)) for i in idx))
            enc, mask = pad_prompts(list(prompts), int(meta["pad_id"]))
            limits = torch.tensor([len(t) + 1 for t in targets], device=device)
            with autocast_context(device, mixed_precision):
                gen, state = greedy_decode(model, enc.to(device), mask.to(device), limits)
            exact = exact_answers(gen, list(targets), model.config.eos_id).cpu().double()
            B = float(len(idx))
            steps = state["steps"].double().cpu() if "steps" in state else torch.zeros(len(idx), dtype=torch.float64)
            part = torch.zeros_like(sums)
            part[0], part[1] = exact.sum(), B
            if "gate_stats" in state:
                gs = {k: float(v) for k, v in state["gate_stats"].items()}
                part[2], part[3] = gs["gate/mean"] * B, gs["gate/saturation"] * B
                gmin[0], gmax[0] = min(float(gmin[0]), gs["gate/min"]), max(float(gmax[0]), gs["gate/max"])
            if "halt_probs" in state:
                part[4] = state["halt_probs"].double().sum().cpu()
            part[5] = steps.sum()
            if G:
                g = torch.from_numpy(group_of[idx])
                part[6:6 + G] = torch.bincount(g, weights=exact, minlength=G)
                part[6 + G:6 + 2 * G] = torch.bincount(g, minlength=G).double()
                part[6 + 2 * G:] = torch.bincount(g, weights=steps, minlength=G)
            sums += part
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    if info.distributed:
        sums = all_reduce_sum(sums.to(device), info).cpu()
        gmin = -all_reduce_max(-gmin.to(device), info).cpu()
        gmax = all_reduce_max(gmax.to(device), info).cpu()
    s = sums.tolist()
    count = s[1]
    out = {f"{prefix}/answer_exact": s[0] / max(count, 1.0), f"{prefix}/answer_count": count}
    out[f"{prefix}/answer_exact_ci_low"], out[f"{prefix}/answer_exact_ci_high"] = wilson_interval(s[0], count)
    out[f"{prefix}/halt/steps"] = s[5] / max(count, 1.0)
    if "halt_probs" in state:
        out[f"{prefix}/halt/sum_p"] = s[4] / max(count, 1.0)
    if "gate_stats" in state:
        out[f"{prefix}/gate/mean"] = s[2] / max(count, 1.0)
        out[f"{prefix}/gate/saturation"] = s[3] / max(count, 1.0)
        out[f"{prefix}/gate/min"], out[f"{prefix}/gate/max"] = float(gmin[0]), float(gmax[0])
    for j, name in enumerate(names):
        c = s[6 + G + j]
        if c > 0:  # a group this split does not hold (train-only lengths) has no accuracy
            out[f"{prefix}/answer_exact/{name}"] = s[6 + j] / c
            out[f"{prefix}/halt/steps/{name}"] = s[6 + 2 * G + j] / c
    return out


# ---------------------------------------------------------------------------------------------------
# the eval hook


def loss_pass_rows(n: int, max_batches: Optional[int], global_batch_size: int) -> int:
    """Rows of an n-row split that a loss pass capped at `max_batches` global batches covers."""
    return min(n, max_batches * global_batch_size) if max_batches else n


def lm_eval(model, data_path: str, split: str, metrics: dict[str, float], info: DistInfo, *, device: torch.device,
            batch_size: int, settings: LMEvalSettings, rows_evaluated: int, mixed_precision: str = "none",
            progress: bool = False) -> dict[str, float]:
    """The metrics to add to an LM eval whose loss-pass metrics are `metrics` (over its first
    `rows_evaluated` rows): bits per character, then answer accuracy of `split` (+ the extrapolation split).
    Values the loss pass already has (the same core on the same prompts) are kept, not replaced."""
    from lm_dataset import load_lm_meta
    meta = load_lm_meta(data_path)
    out: dict[str, float] = {}
    nats = metrics.get("eval/target_nats")
    if nats is not None and (Path(data_path) / "tokenizer.json").is_file():
        out["eval/bits_per_char"] = bits_per_char(nats, target_chars(str(data_path), split, rows_evaluated))
    if wants_answers(settings, meta):
        answers = answer_eval(model, data_path, split, info, device=device, batch_size=batch_size,
                              max_examples=settings.max_examples, prefix="eval", mixed_precision=mixed_precision,
                              progress=progress)
        out.update({k: v for k, v in answers.items() if k not in metrics})
    if settings.extrap_split is not None:
        out.update(answer_eval(model, data_path, settings.extrap_split, info, device=device, batch_size=batch_size,
                               max_examples=settings.max_examples, prefix="eval_extrap",
                               mixed_precision=mixed_precision, progress=progress))
    return out
