"""Seeded reasoning tasks (prompt -> answer text) for the HRM language model, written as an LM dataset.

    python -m dataset.build_lm_dataset reasoning --task addition --train-digits 1..3 --extrap-digits 4..5 \\
        --train-items 20000 --val-items 500 --test-items 500 --output-dir data/lm-addition --seed 0

Every task has one difficulty axis (operand digits, operations, list length, blanks, maze side, rewrite
steps). Levels of the train range make the train and validation splits (disjoint: both are cut from one pool
of distinct items); the test split is the extrapolation range, whose lowest level must lie above the train
range's highest, so it holds only harder items. Items are spread evenly over the levels of a range; a level
with fewer distinct items than its share gives all it has and the others take the rest.

Beside the ordinary LM dataset files (see dataset/build_lm_dataset.py):
    meta.json "reasoning": {"task", "groups": ["len_1", ...], "settings": {...}, "group_counts": {...}}
    <split>/groups.npy     int32 [N], example i's index into meta["reasoning"]["groups"]

Tokenizer: by default a byte-level vocabulary with no merges (vocab 260 = 4 specials + 256 bytes), so
every digit is its own token; a BPE that merged "12" into one token would hide the carries from the model.
"""
from __future__ import annotations

import argparse
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from dataset.build_lm_dataset import (SPLITS, AtomicOutputDir, _largest_remainder, load_tokenizer,
                                      write_examples)
from dataset.build_maze_dataset import CHARSET as MAZE_CHARSET, generate_mazes
from dataset.build_sudoku_dataset import generate_puzzles
from dataset.common import DatasetError
from dataset.lm_tokenizer import LMDataError, LMTokenizer, train_bpe_tokenizer

Item = tuple[str, str]  # (prompt, answer)
BYTE_VOCAB = 260        # 4 specials + 256 bytes: a BPE of this size learns no merges


# ----------------------------------------------------------------------------------------------------
# Drawing distinct items
# ----------------------------------------------------------------------------------------------------

def randbelow(rng: np.random.Generator, n: int) -> int:
    """Uniform integer in [0, n) for any Python int n (counts of long operand pairs pass 2**63)."""
    if n <= 1 << 62:
        return int(rng.integers(n))
    nbytes = (n.bit_length() + 7) // 8 + 8  # 64 spare bits: the modulo bias is below 2**-64
    return int.from_bytes(rng.bytes(nbytes), "little") % n


def distinct_indices(capacity: int, count: int, rng: np.random.Generator) -> list[int]:
    """`count` distinct indices of [0, capacity), in draw order."""
    if 4 * count >= capacity:  # dense: a permutation, as rejection would spend long on the last few
        return [int(i) for i in rng.permutation(capacity)[:count]]
    seen: set[int] = set()
    out = []
    while len(out) < count:
        i = randbelow(rng, capacity)
        if i not in seen:
            seen.add(i)
            out.append(i)
    return out


def enumerable(unrank: Callable[[int, int, dict], Item]):
    """A task's draw() from its unrank(level, index, knobs): distinct indices give distinct prompts."""
    def draw(task: "Task", level: int, count: int, rng: np.random.Generator, knobs: dict) -> list[Item]:
        indices = distinct_indices(task.capacity(level, knobs), count, rng)
        return [unrank(level, i, knobs) for i in indices]
    return draw


def base_digits(index: int, base: int, n: int) -> list[int]:
    """The n base-`base` digits of index, least significant first (a mixed-radix unrank)."""
    out = []
    for _ in range(n):
        index, d = divmod(index, base)
        out.append(d)
    return out


# ----------------------------------------------------------------------------------------------------
# Tasks
# ----------------------------------------------------------------------------------------------------

def numbers_with_digits(d: int) -> tuple[int, int]:
    """(first, count) of the d-digit numbers; 0 counts as a 1-digit number."""
    first = 0 if d == 1 else 10 ** (d - 1)
    return first, 10 ** d - first


def _operand_pair_unrank(op: str, fn: Callable[[int, int], int]):
    def unrank(level: int, index: int, knobs: dict) -> Item:
        first, count = numbers_with_digits(level)
        a, b = first + index // count, first + index % count
        answer = str(fn(a, b))
        return f"{a}{op}{b}=", answer[::-1] if knobs["reverse_answer"] else answer
    return unrank


def _pair_capacity(level: int, knobs: dict) -> int:
    return numbers_with_digits(level)[1] ** 2


ARITH_OPS = "+-*"


def arithmetic_steps(terms: list) -> list[list]:
    """The reductions of [n0, op1, n1, ...] to one number: each step evaluates the leftmost '*', and once
    none is left the leftmost '+'/'-' (school precedence, left to right). Returns every intermediate."""
    out = [terms]
    while len(terms) > 1:
        i = terms.index("*") if "*" in terms else 1
        a, op, b = terms[i - 1], terms[i], terms[i + 1]
        value = a * b if op == "*" else a + b if op == "+" else a - b
        terms = terms[:i - 1] + [value] + terms[i + 2:]
        out.append(terms)
    return out


def _arith_capacity(level: int, knobs: dict) -> int:
    return (knobs["operand_max"] + 1) ** (level + 1) * len(ARITH_OPS) ** level


def _arith_unrank(level: int, index: int, knobs: dict) -> Item:
    index, op_index = divmod(index, len(ARITH_OPS) ** level)
    numbers = base_digits(index, knobs["operand_max"] + 1, level + 1)
    ops = [ARITH_OPS[d] for d in base_digits(op_index, len(ARITH_OPS), level)]
    terms = [numbers[0]] + [x for pair in zip(ops, numbers[1:]) for x in pair]
    steps = ["".join(str(t) for t in s) for s in arithmetic_steps(terms)]
    # worked: every intermediate expression, each equal in value to the question, the last one the result
    return steps[0] + "=", "=".join(steps[1:]) if knobs["worked_steps"] else steps[-1]


def _list_capacity(level: int, knobs: dict) -> int:
    return knobs["values"] ** level


def _list_unrank(name: str, fn: Callable[[list[int]], list[int]]):
    def unrank(level: int, index: int, knobs: dict) -> Item:
        xs = base_digits(index, knobs["values"], level)
        return f"{name} {' '.join(map(str, xs))}=", " ".join(map(str, fn(xs)))
    return unrank


def dedup(xs: list[int]) -> list[int]:
    """First occurrences, in order."""
    seen, out = set(), []
    for x in xs:
        if x not in seen:
            seen.add(x)
            out.append(x)
    return out


def _strings_count(knobs: dict) -> int:
    lo, hi = knobs["string_len"]
    return sum(knobs["alphabet"] ** n for n in range(lo, hi + 1))


def _rewrite_capacity(level: int, knobs: dict) -> int:
    return knobs["alphabet"] ** knobs["alphabet"] * _strings_count(knobs)


def _rewrite_unrank(level: int, index: int, knobs: dict) -> Item:
    """A rule maps every letter to a letter (any function, so letters may merge); the answer is the
    string with the rule applied `level` times. Prompt: 'a>b b>d c>a d>a x3 cabd='."""
    k = knobs["alphabet"]
    letters = "abcdefghijklmnopqrstuvwxyz"[:k]
    index, rule_index = divmod(index, k ** k)
    rule = dict(zip(letters, (letters[d] for d in base_digits(rule_index, k, k))))
    n = knobs["string_len"][0]
    while index >= k ** n:  # strings of the shortest length first, then the next
        index -= k ** n
        n += 1
    s = "".join(letters[d] for d in base_digits(index, k, n))
    out = s
    for _ in range(level):
        out = "".join(rule[c] for c in out)
    return f"{' '.join(f'{a}>{b}' for a, b in rule.items())} x{level} {s}=", out


def grid_text(values, side: int, chars: str) -> str:
    """Rows of a flat grid, one per line, value v written as chars[v]."""
    flat = "".join(chars[v] for v in np.asarray(values).reshape(-1))
    return "\n".join(flat[r * side:(r + 1) * side] for r in range(side))


SUDOKU_CHARS = ".123456789"  # value 0 = blank


def _sudoku_draw(task: "Task", level: int, count: int, rng: np.random.Generator, knobs: dict) -> list[Item]:
    grid = knobs["grid"]
    q, a = generate_puzzles(count, grid, (level, level), rng, set(), desc=f"sudoku blanks_{level}")
    return [(f"sudoku\n{grid_text(qi, grid, SUDOKU_CHARS)}\n", grid_text(ai, grid, SUDOKU_CHARS)) for qi, ai in zip(q, a)]


MAZE_CHARS = "?" + MAZE_CHARSET  # maze token t is MAZE_CHARSET[t - 1]; 0 is PAD and never occurs


def _maze_draw(task: "Task", level: int, count: int, rng: np.random.Generator, knobs: dict) -> list[Item]:
    q, a = generate_mazes(count, level, rng, knobs["braid"], set(), desc=f"maze size_{level}")
    return [(f"maze\n{grid_text(qi, level, MAZE_CHARS)}\n", grid_text(ai, level, MAZE_CHARS)) for qi, ai in zip(q, a)]


@dataclass(frozen=True)
class Task:
    name: str
    about: str
    axis: str                   # difficulty flags --train-<axis> / --extrap-<axis>
    group: str                  # group names "<group>_<level>"
    min_level: int
    train: tuple[int, int]      # default ranges
    extrap: tuple[int, int]
    draw: Callable              # (task, level, count, rng, knobs) -> count distinct items
    capacity: Callable[[int, dict], int | None] = lambda level, knobs: None  # None: not countable
    knobs: tuple[str, ...] = ()
    max_level: Callable[[dict], int | None] = lambda knobs: None
    odd_only: bool = False      # levels of a range that are even are skipped (maze sides)

    def levels(self, lo: int, hi: int) -> list[int]:
        return [lv for lv in range(lo, hi + 1) if lv % 2 or not self.odd_only]


TASKS = {t.name: t for t in (
    Task("addition", "a+b= with both operands of exactly D digits", "digits", "len", 1, (1, 3), (4, 5),
         enumerable(_operand_pair_unrank("+", lambda a, b: a + b)), _pair_capacity, ("reverse_answer",)),
    Task("multiplication", "a*b= with both operands of exactly D digits", "digits", "len", 1, (1, 2), (3, 3),
         enumerable(_operand_pair_unrank("*", lambda a, b: a * b)), _pair_capacity, ("reverse_answer",)),
    Task("arithmetic", "K operations (+ - *, school precedence) on integers 0..--operand-max", "ops", "ops", 1,
         (1, 3), (4, 5), enumerable(_arith_unrank), _arith_capacity, ("operand_max", "worked_steps")),
    Task("sort", "sort a list of L integers 0..--values-1 ascending", "len", "len", 1, (2, 6), (7, 8),
         enumerable(_list_unrank("sort", sorted)), _list_capacity, ("values",)),
    Task("dedup", "keep the first occurrence of each of L integers 0..--values-1", "len", "len", 1, (2, 6), (7, 8),
         enumerable(_list_unrank("dedup", dedup)), _list_capacity, ("values",)),
    Task("sudoku", "solve a --grid Sudoku with B blanks (unique solution)", "blanks", "blanks", 1, (4, 8), (9, 10),
         _sudoku_draw, knobs=("grid",), max_level=lambda knobs: knobs["grid"] ** 2 - 1),
    # odd sides only: the maze is carved on odd coordinates, so an even side adds a second outer wall
    Task("maze", "mark a shortest S->G path with 'o' in an SxS maze (odd S)", "side", "size", 5, (7, 9), (11, 13),
         _maze_draw, knobs=("braid",), odd_only=True),
    Task("rewrite", "apply a letter-substitution rule K times to a string", "steps", "steps", 1, (1, 3), (4, 6),
         enumerable(_rewrite_unrank), _rewrite_capacity, ("alphabet", "string_len")),
)}


# ----------------------------------------------------------------------------------------------------
# Options
# ----------------------------------------------------------------------------------------------------

def parse_range(text: str, flag: str) -> tuple[int, int]:
    """'K' or 'LO..HI' -> (lo, hi); a malformed or reversed range is a one-line LMDataError."""
    try:
        lo, hi = (int(x) for x in text.split("..", 1)) if ".." in text else (int(text), int(text))
    except ValueError:
        raise LMDataError(f"{flag} expects K or LO..HI, got {text!r}") from None
    if hi < lo:
        raise LMDataError(f"{flag} {text}: empty range (LO {lo} > HI {hi})")
    return lo, hi


# name -> (argparse keywords, default, check(value) -> error text or None)
KNOBS: dict[str, tuple[dict, object, Callable]] = {
    "reverse_answer": ({"action": "store_true", "help": "addition/multiplication: answer digits least "
                        "significant first (the order a carry is computed in)"}, False, lambda v: None),
    "operand_max": ({"type": int, "help": "arithmetic: operands are 0..N (default 9)"}, 9,
                    lambda v: None if v >= 1 else "must be >= 1"),
    "worked_steps": ({"action": "store_true", "help": "arithmetic: the answer lists every reduced expression "
                      "('3+4*2=' -> '3+8=11'), the result last"}, False, lambda v: None),
    "values": ({"type": int, "help": "sort/dedup: list values are 0..N-1 (default 10)"}, 10,
               lambda v: None if v >= 2 else "must be >= 2"),
    "grid": ({"type": int, "help": "sudoku: grid side 4, 6 or 9 (default 4)"}, 4,
             lambda v: None if v in (4, 6, 9) else "must be 4, 6 or 9"),
    "braid": ({"type": float, "help": "maze: share of removable inner walls knocked out (default 0.1)"}, 0.1,
              lambda v: None if 0.0 <= v <= 1.0 else "must be in [0, 1]"),
    "alphabet": ({"type": int, "help": "rewrite: letters a.. in the rule and string (default 4)"}, 4,
                 lambda v: None if 2 <= v <= 26 else "must be in 2..26"),
    "string_len": ({"help": "rewrite: string length K or LO..HI (default 4..6)"}, "4..6",
                   lambda v: None if v[0] >= 1 else "must be >= 1"),
}
AXES = sorted({t.axis for t in TASKS.values()})


@dataclass
class ReasoningConfig:
    task: str
    output_dir: str
    train_range: str | None = None
    extrap_range: str | None = None
    train_items: int = 20000
    val_items: int = 500
    test_items: int = 500
    knobs: dict = field(default_factory=dict)  # only the knobs the user set
    tokenizer: str | None = None
    vocab_size: int = BYTE_VOCAB
    seed: int = 0
    overwrite: bool = False


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def resolve(cfg: ReasoningConfig) -> tuple[Task, tuple[int, int], tuple[int, int], dict]:
    """Check every option before any work: (task, train range, extrap range, all knobs of the task)."""
    task = TASKS.get(cfg.task)
    if task is None:
        close = difflib.get_close_matches(cfg.task, TASKS, n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise LMDataError(f"unknown --task '{cfg.task}'{hint} (tasks: {', '.join(TASKS)})")
    stray = [k for k in cfg.knobs if k not in task.knobs]
    if stray:
        users = [t.name for t in TASKS.values() if stray[0] in t.knobs]
        raise LMDataError(f"{_flag(stray[0])} is a knob of {', '.join(users)}, not of --task {task.name}"
                          + (f" (its knobs: {', '.join(map(_flag, task.knobs))})" if task.knobs else ""))
    knobs = {}
    for k in task.knobs:
        given = cfg.knobs.get(k, KNOBS[k][1])
        value = parse_range(given, _flag(k)) if k == "string_len" else given
        problem = KNOBS[k][2](value)
        if problem:
            raise LMDataError(f"{_flag(k)} {problem}, got {given}")
        knobs[k] = value
    flags = (f"--train-{task.axis}", f"--extrap-{task.axis}")
    train = parse_range(cfg.train_range, flags[0]) if cfg.train_range else task.train
    extrap = parse_range(cfg.extrap_range, flags[1]) if cfg.extrap_range else task.extrap
    top = task.max_level(knobs)
    for flag, (lo, hi) in zip(flags, (train, extrap)):
        if lo < task.min_level:
            raise LMDataError(f"{flag} {lo}..{hi}: {task.name} needs {task.axis} >= {task.min_level}")
        if top is not None and hi > top:
            raise LMDataError(f"{flag} {lo}..{hi}: {task.name} allows {task.axis} <= {top} with these knobs")
        if not task.levels(lo, hi):
            raise LMDataError(f"{flag} {lo}..{hi}: no level of {task.name} in this range (odd {task.axis} only)")
    if extrap[0] <= train[1]:
        raise LMDataError(f"{flags[1]} {extrap[0]}..{extrap[1]} must start above {flags[0]} {train[0]}..{train[1]} "
                          f"(the extrapolation split holds only harder items)")
    for name, n in (("--train-items", cfg.train_items), ("--val-items", cfg.val_items), ("--test-items", cfg.test_items)):
        if n < 1:
            raise LMDataError(f"{name} must be >= 1, got {n} (every split is used: train, validation, extrapolation)")
    return task, train, extrap, knobs


def level_quotas(total: int, capacities: list[int | None], what: str) -> list[int]:
    """Spread `total` items evenly over levels; a level with fewer distinct items than its share gives all
    it has and the others share the rest (so small levels, like 1-digit sums, come out complete)."""
    quota = [0] * len(capacities)
    open_levels, left = list(range(len(capacities))), total
    while left and open_levels:
        share = _largest_remainder(left, np.ones(len(open_levels)))
        full = [i for i, s in zip(open_levels, share) if capacities[i] is not None and s >= capacities[i]]
        if not full:
            for i, s in zip(open_levels, share):
                quota[i] = int(s)
            left = 0
        for i in full:
            quota[i] = capacities[i]
            left -= capacities[i]
        open_levels = [i for i in open_levels if i not in full]
    if left:
        raise LMDataError(f"{what} only has {sum(capacities)} distinct items, fewer than the {total} requested")
    return quota


def draw_range(task: Task, levels: list[int], total: int, knobs: dict, seed: int, phase: int,
               what: str) -> tuple[list[Item], list[int]]:
    """`total` distinct items over `levels` -> (items, level of each). Each level draws from its own
    generator ([seed, phase, level]), so the extrapolation items do not change with --train-items."""
    quotas = level_quotas(total, [task.capacity(lv, knobs) for lv in levels], what)
    items, item_levels = [], []
    for lv, q in zip(levels, quotas):
        if q:
            try:
                items += task.draw(task, lv, q, np.random.default_rng([seed, phase, lv]), knobs)
            except DatasetError as e:  # the puzzle generators' own message, told which request it fails
                raise LMDataError(f"{what}: {e}") from None
            item_levels += [lv] * q
    return items, item_levels


# ----------------------------------------------------------------------------------------------------
# Build
# ----------------------------------------------------------------------------------------------------

def build_reasoning(cfg: ReasoningConfig) -> dict:
    task, train, extrap, knobs = resolve(cfg)
    guard = AtomicOutputDir(Path(cfg.output_dir), cfg.overwrite)  # refuse an occupied output before any work
    tok = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else None
    flags = (f"--train-{task.axis}", f"--extrap-{task.axis}")

    pool, pool_levels = draw_range(task, task.levels(*train), cfg.train_items + cfg.val_items, knobs,
                                   cfg.seed, 0, f"{task.name} {flags[0]} {train[0]}..{train[1]} (--train-items "
                                   f"{cfg.train_items} + --val-items {cfg.val_items})")
    test, test_levels = draw_range(task, task.levels(*extrap), cfg.test_items, knobs, cfg.seed, 1,
                                   f"{task.name} {flags[1]} {extrap[0]}..{extrap[1]} (--test-items {cfg.test_items})")
    # validation = a random part of the one pool of distinct items, so it never repeats a train item
    order = np.random.default_rng([cfg.seed, 2]).permutation(len(pool))
    test_order = np.random.default_rng([cfg.seed, 3]).permutation(len(test))
    parts = {"validation": (pool, pool_levels, order[:cfg.val_items]), "train": (pool, pool_levels, order[cfg.val_items:]),
             "test": (test, test_levels, test_order)}

    levels = task.levels(*train) + task.levels(*extrap)
    groups = [f"{task.group}_{lv}" for lv in levels]
    examples, arrays, counts = {}, {}, {}
    for split in SPLITS:
        items, item_levels, idx = parts[split]
        examples[split] = ([items[i][0] for i in idx], [items[i][1] for i in idx])
        g = np.array([levels.index(item_levels[i]) for i in idx], dtype=np.int32)
        arrays[split] = {"groups.npy": g}
        counts[split] = {groups[j]: int(n) for j, n in enumerate(np.bincount(g, minlength=len(groups))) if n}

    if tok is None:
        prompts, answers = examples["train"]
        texts = (p + a for p, a in zip(prompts, answers))
        tok = LMTokenizer(train_bpe_tokenizer(texts, cfg.vocab_size), source="trained")
    settings = {"axis": task.axis, "train_range": list(train), "extrap_range": list(extrap),
                **{k: list(v) if isinstance(v, tuple) else v for k, v in knobs.items()}}
    build_info = {"mode": "reasoning", "task": task.name, "seed": cfg.seed, "tokenizer": cfg.tokenizer,
                  "vocab_size": cfg.vocab_size, "train_items": cfg.train_items, "val_items": cfg.val_items,
                  "test_items": cfg.test_items, **settings}
    reasoning = {"task": task.name, "groups": groups, "settings": settings, "group_counts": counts}
    return write_examples(guard, tok, examples, {"build": build_info, "reasoning": reasoning}, arrays)


def reasoning_parser() -> argparse.ArgumentParser:
    tasks = "\n".join(f"  {t.name:<15} {t.about}; --train-{t.axis} {t.train[0]}..{t.train[1]}, "
                      f"--extrap-{t.axis} {t.extrap[0]}..{t.extrap[1]} by default" for t in TASKS.values())
    p = argparse.ArgumentParser(
        prog="python -m dataset.build_lm_dataset reasoning", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Generate a seeded prompt -> answer reasoning dataset in the LM format: train and validation "
                    "(disjoint) from the train difficulty range, test from the harder extrapolation range, and "
                    "<split>/groups.npy tags (one group per difficulty level).",
        epilog=f"tasks:\n{tasks}")
    p.add_argument("--task", required=True, help=f"one of {', '.join(TASKS)}")
    p.add_argument("--output-dir", required=True)
    for axis in AXES:
        p.add_argument(f"--train-{axis}", dest=f"train_{axis}", metavar="LO..HI",
                       help=f"train/validation levels ({', '.join(t.name for t in TASKS.values() if t.axis == axis)})")
        p.add_argument(f"--extrap-{axis}", dest=f"extrap_{axis}", metavar="LO..HI", help="test levels, above the train range")
    p.add_argument("--train-items", type=int, default=20000, help="default 20000")
    p.add_argument("--val-items", type=int, default=500, help="held-out, same levels as train (default 500)")
    p.add_argument("--test-items", type=int, default=500, help="extrapolation levels (default 500)")
    for name, (kwargs, _, _) in KNOBS.items():
        p.add_argument(_flag(name), dest=name, default=None, **kwargs)
    p.add_argument("--tokenizer", help="reuse this tokenizer.json (e.g. a language dataset's, to mix with it)")
    p.add_argument("--vocab-size", type=int, default=BYTE_VOCAB,
                   help=f"when training a tokenizer: {BYTE_VOCAB} (default) = bytes only, no BPE merges, so each "
                        f"digit is one token; larger values train BPE merges on the train items")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    return p


def config_from_args(a: argparse.Namespace) -> ReasoningConfig:
    task = TASKS.get(a.task)
    given_axes = [x for x in AXES for side in ("train", "extrap") if getattr(a, f"{side}_{x}") is not None]
    if task is not None and any(x != task.axis for x in given_axes):
        other = next(x for x in given_axes if x != task.axis)
        raise LMDataError(f"--train-{other}/--extrap-{other} do not apply to --task {task.name}; "
                          f"its difficulty flags are --train-{task.axis} and --extrap-{task.axis}")
    axis = task.axis if task is not None else None
    return ReasoningConfig(
        task=a.task, output_dir=a.output_dir,
        train_range=getattr(a, f"train_{axis}") if axis else None,
        extrap_range=getattr(a, f"extrap_{axis}") if axis else None,
        train_items=a.train_items, val_items=a.val_items, test_items=a.test_items,
        knobs={k: getattr(a, k) for k in KNOBS if getattr(a, k) is not None},  # flags default to None: unset
        tokenizer=a.tokenizer, vocab_size=a.vocab_size, seed=a.seed, overwrite=a.overwrite)
