"""Generate text from a language model checkpoint (arch=hrm_lm_* or lm_transformer), streaming tokens as they
are produced.

    python generate.py checkpoint=checkpoints/<project>/<run>/step_N prompt="ROMEO:" \
        max_new_tokens=200 temperature=0.8 top_k=50 top_p=0.95 seed=0 greedy=false

Every key can also be given as `--key value`. The tokenizer is the `tokenizer.json` written with the
dataset (LMDATA): `tokenizer=PATH`, else one next to the checkpoint, else `<data_path>/tokenizer.json`
from the checkpoint's config. A prompt longer than the model accepts (arch.max_prompt_len; 0 = the
training seq_len, -1 = no limit) is truncated to its last tokens with a warning
(`prompt_overflow=truncate`, default) or refused (`prompt_overflow=error`).
The generated text goes to stdout as it comes; a summary line (tokens, seconds, and HRM segments for the hybrid) to stderr.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path

import torch

from utils.schema import ConfigError, from_dict


class GenerateError(ValueError):
    """A user error of this command (bad checkpoint, tokenizer, prompt); one-line message."""


@dataclass
class GenerateConfig:
    checkpoint: str
    prompt: str = ""
    prompt_file: str = ""  # read the prompt from this file instead (UTF-8)
    max_new_tokens: int = 200
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    greedy: bool = False
    seed: int = 0
    num_samples: int = 1
    tokenizer: str = ""
    prompt_overflow: str = "truncate"  # truncate | error
    device: str = "cpu"
    echo_prompt: bool = True  # print the prompt before the continuation
    stop_at_eos: bool = False  # stop at the first end-of-text instead of continuing in a new window


HELP = {
    "checkpoint": "step dir (or run dir: its newest step) of a run with arch=hrm_lm_* or lm_transformer",
    "prompt": "text the encoder reads; the model writes its continuation",
    "prompt_file": "read the prompt from this UTF-8 file instead",
    "max_new_tokens": "stop after this many tokens (earlier at EOS)",
    "temperature": "softmax temperature (<= 0 means greedy)",
    "top_k": "sample among the k most likely tokens (0 = off)",
    "top_p": "nucleus sampling mass (1.0 = off)",
    "greedy": "argmax decoding (true/false)",
    "seed": "seed of the sampling generator",
    "num_samples": "number of continuations to draw",
    "tokenizer": "tokenizer.json (default: next to the checkpoint, else <data_path>/tokenizer.json)",
    "prompt_overflow": "prompt longer than the model accepts: truncate (keep the end, warn) or error",
    "device": "cpu, cuda, cuda:1, ...",
    "echo_prompt": "print the prompt before the continuation (true/false)",
    "stop_at_eos": "stop at the model's first end-of-text; by default generation goes on in a new window "
                   "(the model was trained on windows, each ending in EOS) until max_new_tokens",
}


def _convert(key: str, raw: str, annotation) -> object:
    if annotation is bool:
        low = raw.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ConfigError(f"config key '{key}' expects true/false, got {raw!r}")
    if annotation in (int, float):
        try:
            return annotation(raw)
        except ValueError:
            raise ConfigError(f"config key '{key}' expects {annotation.__name__}, got {raw!r}") from None
    return raw


def parse_args(argv: list[str]) -> GenerateConfig:
    hints = typing.get_type_hints(GenerateConfig)
    parser = argparse.ArgumentParser(
        prog="python generate.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="keys (key=value or --key value):\n" + "\n".join(
            f"  {f.name:<16} {HELP[f.name]}" + ("" if f.default is dataclasses.MISSING else f" [default: {f.default!r}]")
            for f in dataclasses.fields(GenerateConfig)))
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    for f in dataclasses.fields(GenerateConfig):
        parser.add_argument(f"--{f.name}", dest=f"opt_{f.name}", default=None, help=argparse.SUPPRESS)
    ns = parser.parse_args(argv)
    given: dict[str, str] = {}
    for item in ns.overrides:
        if "=" not in item:
            raise ConfigError(f"argument '{item}' must look like key=value (see --help)")
        key, value = item.split("=", 1)
        given[key.strip()] = value
    for f in dataclasses.fields(GenerateConfig):
        value = getattr(ns, f"opt_{f.name}")
        if value is not None:
            given[f.name] = value
    typed = {k: _convert(k, v, hints.get(k)) if k in hints else v for k, v in given.items()}
    cfg = from_dict(GenerateConfig, typed)
    if cfg.prompt_overflow not in ("truncate", "error"):
        raise ConfigError(f"config key 'prompt_overflow' must be 'truncate' or 'error', got {cfg.prompt_overflow!r}")
    if cfg.max_new_tokens < 1 or cfg.num_samples < 1:
        raise ConfigError("config keys 'max_new_tokens' and 'num_samples' must be >= 1")
    if not 0.0 < cfg.top_p <= 1.0:
        raise ConfigError(f"config key 'top_p' must be in (0, 1] (1.0 = off), got {cfg.top_p}")
    if cfg.top_k < 0:
        raise ConfigError(f"config key 'top_k' must be >= 0 (0 = off), got {cfg.top_k}")
    if cfg.temperature < 0:
        raise ConfigError(f"config key 'temperature' must be >= 0 (0 = greedy), got {cfg.temperature}")
    return cfg


def _cfg_get(cfg, key: str):
    if cfg is None:
        return None
    if isinstance(cfg, dict):
        return cfg.get(key)
    return getattr(cfg, key, None)


def find_tokenizer(explicit: str, checkpoint: Path, run_cfg) -> Path:
    if explicit:
        return Path(explicit)
    step_dir = checkpoint if checkpoint.is_dir() else checkpoint.parent
    candidates = [step_dir / "tokenizer.json", step_dir.parent / "tokenizer.json"]
    data_path = _cfg_get(run_cfg, "data_path")
    if data_path:
        candidates.append(Path(str(data_path)) / "tokenizer.json")
    for c in candidates:
        if c.is_file():
            return c
    raise GenerateError(f"no tokenizer.json found (looked at {', '.join(map(str, candidates))}); pass tokenizer=PATH")


def prepare_prompt(ids: list[int], max_prompt_len: int, overflow: str) -> list[int]:
    """Apply the model's prompt limit: keep the last max_prompt_len tokens (with a warning) or refuse."""
    if max_prompt_len and len(ids) > max_prompt_len:
        if overflow == "error":
            raise GenerateError(f"prompt has {len(ids)} tokens but the model accepts at most {max_prompt_len} "
                                "(arch.max_prompt_len, default the training seq_len); shorten it or pass prompt_overflow=truncate")
        print(f"warning: prompt has {len(ids)} tokens; keeping the last {max_prompt_len} (arch.max_prompt_len)",
              file=sys.stderr)
        ids = ids[-max_prompt_len:]
    return ids


def run(cfg: GenerateConfig, out=sys.stdout) -> dict:
    from dataset.lm_tokenizer import LMTokenizer
    from models.lm_generation import LMGeneration
    from utils.checkpoint import load_model_from_checkpoint

    device = torch.device(cfg.device)
    run_cfg, head = load_model_from_checkpoint(cfg.checkpoint, device=str(device))
    model = getattr(head, "model", head)
    if not isinstance(model, LMGeneration):
        raise GenerateError(f"checkpoint '{cfg.checkpoint}' holds a {type(model).__name__}, not a language model "
                            "(arch=hrm_lm_* or lm_transformer)")
    model.eval()
    tok = LMTokenizer.from_file(find_tokenizer(cfg.tokenizer, Path(cfg.checkpoint), run_cfg))
    mc = model.config
    if tok.vocab_size != mc.vocab_size:
        raise GenerateError(f"{tok.source}: tokenizer vocabulary has {tok.vocab_size} tokens but the checkpoint's "
                            f"model has vocab_size={mc.vocab_size}")
    if (tok.bos_id, tok.eos_id) != (mc.bos_id, mc.eos_id):
        raise GenerateError(f"{tok.source}: tokenizer bos/eos ids {tok.bos_id}/{tok.eos_id} differ from the model's "
                            f"{mc.bos_id}/{mc.eos_id}")

    text = Path(cfg.prompt_file).read_text(encoding="utf-8") if cfg.prompt_file else cfg.prompt
    ids = prepare_prompt(tok.encode(text), model.prompt_limit, cfg.prompt_overflow)

    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    total, windows, t0 = 0, 0, time.perf_counter()
    samples = []
    for s in range(cfg.num_samples):
        if cfg.num_samples > 1:
            out.write(f"\n--- sample {s + 1} ---\n")
        if cfg.echo_prompt:
            out.write(tok.decode(ids))
        out.flush()
        stream = tok.stream_decoder()
        new_ids: list[int] = []
        prompt = ids
        while len(new_ids) < cfg.max_new_tokens:
            window = []
            windows += 1
            for tid in generate_window(model, prompt, cfg, gen, cfg.max_new_tokens - len(new_ids), device):
                window.append(tid)
                new_ids.append(tid)
                out.write(stream.push(tid))
                out.flush()
            if cfg.stop_at_eos or not window or len(new_ids) >= cfg.max_new_tokens:
                break
            # The model ended its window with EOS (it was trained on fixed-length windows, so it does this
            # after about one training continuation). Go on like a sliding window: the newest text - as many
            # tokens as that window wrote, within the prompt limit - is the next prompt.
            keep = min(len(window), model.prompt_limit or len(window))
            prompt = (ids + new_ids)[-keep:]
        total += len(new_ids)
        samples.append(tok.decode(new_ids))
        out.write("\n")
        out.flush()
    seconds = time.perf_counter() - t0
    return {"samples": samples, "tokens": total, "seconds": seconds, "prompt_tokens": len(ids),
            "hrm_segments": getattr(model, "num_segment_calls", None), "windows": windows}


def generate_window(model, prompt: list[int], cfg: GenerateConfig, gen: torch.Generator, limit: int,
                    device: torch.device) -> typing.Iterator[int]:
    """One encoder pass over `prompt`, then decoder tokens as they come, until EOS or `limit` (EOS not
    included)."""
    mc = model.config
    # An empty prompt is one padding position with mask False (the model handles prompts with no tokens).
    enc = torch.tensor([prompt or [mc.pad_id]], dtype=torch.long, device=device)
    mask = torch.tensor([[True] * len(prompt) or [False]], dtype=torch.bool, device=device)
    for t in model.generate(enc, mask, limit, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                            greedy=cfg.greedy, generator=gen):
        tid = int(t[0])
        if tid == mc.eos_id:
            return
        yield tid


def main(argv: list[str] | None = None) -> int:
    from dataset.lm_tokenizer import LMDataError

    try:
        cfg = parse_args(sys.argv[1:] if argv is None else argv)
        stats = run(cfg)
    except (ConfigError, GenerateError, LMDataError, FileNotFoundError, IsADirectoryError, UnicodeDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # the checkpoint loader's errors (CheckpointError is a ValueError)
        print(f"error: {e}", file=sys.stderr)
        return 2
    rate = stats["tokens"] / max(stats["seconds"], 1e-9)
    why = ""
    if stats["tokens"] < cfg.max_new_tokens * cfg.num_samples:
        why = (" (stopped at the model's end-of-text; stop_at_eos=false continues in new windows)" if cfg.stop_at_eos
               else " (the model ended a window with end-of-text at once, so nothing more came)")
    print(f"generated {stats['tokens']} tokens from a {stats['prompt_tokens']}-token prompt in {stats['seconds']:.2f} s "
          f"({rate:.1f} tok/s) in {stats['windows']} window(s)"
          + ("" if stats["hrm_segments"] is None else f", {stats['hrm_segments']} HRM segments") + why, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
