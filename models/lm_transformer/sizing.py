"""Size arch=lm_transformer against a hybrid arch=hrm_lm_* config: the issue-12 ablation's plain-Transformer arm.

    python -m models.lm_transformer.sizing arch=hrm_lm_mamba arch.hidden_size=128 --vocab-size 20 --seq-len 16
    python -m models.lm_transformer.sizing experiment=NAME          # an LM recipe; data_path gives V and seq_len

The rule: keep the hybrid's hidden_size, num_heads, expansion, rope_theta and rms_norm_eps (same width, same
blocks) and choose n_layers, the one free knob, so that the baseline's parameter count (match=params) or its
estimated training FLOPs per step (match=flops; both models' estimate_flops, one convention: 6 FLOPs per
parameter per token, attention scores ignored, seq_len tokens per side) is nearest the hybrid's. Parameters
and FLOPs are both affine in n_layers, so two probe models give the exact answer without a search.

Both numbers cannot match at once: a plain stack spends its parameters once per token, the hybrid re-applies its
core H_cycles x L_cycles times per segment, so at equal parameters the hybrid does several times the compute. The
printout gives both choices and both ratios; say which one a comparison used.
"""
from __future__ import annotations

import argparse
import sys

from utils.schema import ConfigError

# The keys the baseline takes over unchanged from the hybrid (same width and blocks).
SHARED_KEYS = ("vocab_size", "seq_len", "pad_id", "bos_id", "eos_id", "hidden_size", "num_heads", "expansion",
               "rope_theta", "rms_norm_eps", "attn_backend", "max_prompt_len", "seed")
MATCHES = ("params", "flops")


def _model_config(arch: dict) -> dict:
    return {k: v for k, v in arch.items() if k not in ("name", "loss")}


def count(model, batch_size: int) -> tuple[int, float]:
    """(parameters, estimated training FLOPs per step at this batch size)."""
    return sum(p.numel() for p in model.parameters()), model.estimate_flops(batch_size)


def baseline_config(hrm_config: dict, n_layers: int) -> dict:
    """The lm_transformer model config with the hybrid's shared keys (its defaults where `hrm_config` omits
    them) and `n_layers` blocks."""
    import dataclasses
    from models.hrm_lm.hrm_lm_v1 import HRMLanguageModelConfig
    from utils.schema import from_dict

    resolved = dataclasses.asdict(from_dict(HRMLanguageModelConfig, dict(hrm_config), where="arch"))
    cfg = {k: resolved[k] for k in SHARED_KEYS}
    if cfg.get("attn_backend") == "flash":
        cfg["attn_backend"] = "auto"
    return {**cfg, "n_layers": n_layers}


def size_like(hrm_config: dict, match: str = "params", batch_size: int = 1) -> dict:
    """The lm_transformer model config (n_layers chosen by `match`) for the hybrid model config `hrm_config`
    (its model keys, vocab_size and seq_len included)."""
    from models.lm_transformer.lm_transformer import LMTransformer

    if match not in MATCHES:
        raise ConfigError(f"match must be one of {', '.join(MATCHES)}, got {match!r}")
    hybrid = _build_hybrid(hrm_config)
    target = count(hybrid, batch_size)[MATCHES.index(match)]
    one, two = (count(LMTransformer(baseline_config(hrm_config, n)), batch_size)[MATCHES.index(match)] for n in (1, 2))
    per_layer, fixed = two - one, one - (two - one)
    return baseline_config(hrm_config, max(1, round((target - fixed) / per_layer)))


def _build_hybrid(hrm_config: dict):
    from models.hrm_lm.hrm_lm_v1 import HRMLanguageModel
    return HRMLanguageModel(hrm_config)


def comparison(hrm_config: dict, batch_size: int) -> list[tuple[str, int, int, float]]:
    """Rows (label, n_layers or 0, parameters, FLOPs/step) for the hybrid and both sized baselines."""
    from models.lm_transformer.lm_transformer import LMTransformer

    rows = [("hrm_lm", 0, *count(_build_hybrid(hrm_config), batch_size))]
    for match in MATCHES:
        cfg = size_like(hrm_config, match, batch_size)
        rows.append((f"lm_transformer match={match}", cfg["n_layers"], *count(LMTransformer(cfg), batch_size)))
    return rows


def format_table(rows, batch_size: int) -> str:
    ref_p, ref_f = rows[0][2], rows[0][3]
    lines = [f"{'model':<28} {'n_layers':>8} {'params':>10} {'x hrm':>6} {'GFLOP/step':>11} {'x hrm':>6}",
             f"{'':<28} {'':>8} {'':>10} {'':>6} {f'(batch {batch_size})':>11} {'':>6}"]
    for label, n, p, f in rows:
        lines.append(f"{label:<28} {n or '-':>8} {p:>10,} {p / ref_p:>6.2f} {f / 1e9:>11.3f} {f / ref_f:>6.2f}")
    return "\n".join(lines)


def _compose(overrides: list[str]) -> tuple[dict, int, str]:
    """(arch dict, global_batch_size, data_path) of the training config these overrides compose."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from utils.config import CONFIG_DIR, preflight_overrides
    preflight_overrides(overrides)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = OmegaConf.to_container(compose("cfg_pretrain", overrides=overrides), resolve=True)
    return cfg["arch"], int(cfg["global_batch_size"]), cfg["data_path"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.lm_transformer.sizing",
                                description=__doc__.split("\n\n")[0],
                                epilog="The hybrid's vocab_size/seq_len/ids come from --vocab-size/--seq-len, else from "
                                       "the composed config's data_path (an LM dataset).")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="pretrain.py overrides selecting an hrm_lm arch")
    p.add_argument("--vocab-size", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="for FLOPs/step (default: global_batch_size)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        arch, gbs, data_path = _compose(args.overrides)
        if not arch.get("name", "").startswith("hrm_lm."):
            raise ConfigError(f"arch.name is {arch.get('name')!r}: choose an hrm_lm arch (arch=hrm_lm_mamba, ...)")
        hrm = _model_config(arch)
        if args.vocab_size is None or args.seq_len is None:
            from utils.data import make_dataset
            md = make_dataset(data_path, "train", seed=0, global_batch_size=1, test_set_mode=True, epochs_per_iter=1,
                              rank=0, world_size=1).metadata
            hrm.update(vocab_size=md.vocab_size, seq_len=md.seq_len, pad_id=md.pad_id, bos_id=md.bos_id,
                       eos_id=md.eos_id)
        if args.vocab_size is not None:
            hrm["vocab_size"] = args.vocab_size
        if args.seq_len is not None:
            hrm["seq_len"] = args.seq_len
        batch = args.batch_size or gbs
        rows = comparison(hrm, batch)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"hybrid: {arch['name']} hidden_size={hrm['hidden_size']} vocab_size={hrm['vocab_size']} "
          f"seq_len={hrm['seq_len']}")
    print(format_table(rows, batch))
    shared = " ".join(f"arch.{k}={hrm[k]}" for k in ("hidden_size", "num_heads", "expansion"))
    for label, n, _, _ in rows[1:]:
        print(f"{label}: arch=lm_transformer {shared} arch.n_layers={n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
