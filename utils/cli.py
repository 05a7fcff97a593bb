"""The part of `pretrain.py`'s command line that runs before torch is imported: `--help` built from the
schema, `--cfg job` (resolved), and the full config check - override names, then the composed config of
every job of a sweep - so that a config error costs a second, not the 3-25 s torch takes to import.

Descriptions come from one place: the trailing comments of `config/cfg_pretrain.yaml` (and of the chosen
`config/arch/*.yaml`); types from the dataclass schema (`utils/config.py`, the model's config class)."""
from __future__ import annotations

import dataclasses
import itertools
import re
import sys
import typing
from pathlib import Path
from typing import Any, Optional

from utils import model_schema
from utils.schema import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"
MAX_SWEEP_JOBS_CHECKED = 64  # composing one job takes ~50 ms; bigger sweeps are checked on their first 64 jobs
# Hydra's own flags and the ones that take a value (kept out of the key=value overrides).
HYDRA_VALUE_FLAGS = ("--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                     "--config-dir", "-cd", "--info", "-i", "--experimental-rerun", "--shell-completion", "-sc")
_KEY_LINE = re.compile(r"^(\s*)([A-Za-z_][\w]*)\s*:(.*)$")
_SECTION = re.compile(r"^#\s*---\s*(.+?)\s*-*\s*$")


def yaml_key_comments(path: Path) -> dict[str, tuple[str, str]]:
    """{dotted key: (section, trailing comment)} of a config YAML, from its text (OmegaConf drops comments).

    Sections are `# --- name ---` lines; nesting follows indentation."""
    out: dict[str, tuple[str, str]] = {}
    stack: list[tuple[int, str]] = []
    section = ""
    for line in path.read_text().splitlines():
        m = _SECTION.match(line)
        if m:
            section = m.group(1)
            continue
        m = _KEY_LINE.match(line)
        if not m or line.lstrip().startswith("#"):
            continue
        indent, key, rest = len(m.group(1)), m.group(2), m.group(3)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        dotted = ".".join([k for _, k in stack] + [key])
        comment = rest.split(" #", 1)[1].strip() if " #" in rest else ""
        if rest.lstrip().startswith("#"):
            comment = rest.lstrip()[1:].strip()
        out[dotted] = (section, comment)
        stack.append((indent, key))
    return out


def type_name(annotation: Any) -> str:
    if isinstance(annotation, str):
        return annotation.replace("Optional[", "").rstrip("]") + "|null" if annotation.startswith("Optional[") else annotation
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union:
        return "|".join("null" if a is type(None) else type_name(a) for a in args)
    return getattr(annotation, "__name__", str(annotation))


def _fmt(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value) if not isinstance(value, str) or value else "''"


def schema_rows() -> list[tuple[str, str, str, str, str]]:
    """(section, dotted key, type, default, description) for every key of PretrainConfig except arch."""
    from omegaconf import OmegaConf

    from utils.config import PretrainConfig
    comments = yaml_key_comments(CONFIG_DIR / "cfg_pretrain.yaml")
    defaults = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "cfg_pretrain.yaml"), resolve=False)
    rows = []

    def walk(cls: type, prefix: str, values: dict) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key = prefix + f.name
            if key == "arch":
                continue
            hint = hints[f.name]
            if dataclasses.is_dataclass(hint):
                walk(hint, key + ".", values.get(f.name) or {})
                continue
            section, comment = comments.get(key, ("", ""))
            rows.append((section or comments.get(prefix.rstrip("."), ("", ""))[0], key, type_name(hint),
                         _fmt(values.get(f.name)), comment))

    walk(PretrainConfig, "", defaults)
    order = {k: i for i, k in enumerate(comments)}
    return sorted(rows, key=lambda r: order.get(r[1], len(order)))  # the YAML's order and sections


def arch_rows(arch: str) -> tuple[str, list[tuple[str, str, str, str]]]:
    """(model identifier, [(key, type, default, description)]) of config/arch/<arch>.yaml."""
    from omegaconf import OmegaConf
    values = OmegaConf.to_container(compose([f"arch={arch}"]).arch, resolve=True)
    comments: dict[str, tuple[str, str]] = {}
    chain = [arch]
    while chain:  # this arch file and the arch files it extends (Hydra defaults)
        name = chain.pop()
        path = CONFIG_DIR / "arch" / f"{name}.yaml"
        if not path.is_file():
            continue
        for key, value in yaml_key_comments(path).items():
            if value[1] or key not in comments:
                comments[key] = value
        chain += [d.split("@")[0] for d in (OmegaConf.load(path).get("defaults") or [])
                  if isinstance(d, str) and d != "_self_"]
    fields = model_schema.model_config_fields(values.get("name", "")) or ()
    loss = model_schema.loss_head_keys(values.get("loss", {}).get("name", "")) or ((), False)
    rows = []
    for f in fields:
        default = _fmt(values[f.name]) if f.name in values else ("(from the dataset)" if f.default is model_schema.MISSING
                                                                 or f.name in _injected() else _fmt(f.default))
        desc = comments.get(f.name, ("", ""))[1] or f.comment or (
            "set by the trainer from the dataset metadata" if f.name in _injected() else "")
        rows.append((f.name, type_name(f.annotation), default, desc))
    for key in loss[0]:
        if key in values.get("loss", {}):
            rows.append((f"loss.{key}", "", _fmt(values["loss"][key]), comments.get(f"loss.{key}", ("", ""))[1]))
    return values.get("name", "?"), rows


def _injected() -> tuple[str, ...]:
    from utils.config import INJECTED_ARCH_KEYS
    return INJECTED_ARCH_KEYS


def _choice(overrides: list[str], group: str, default: Optional[str]) -> Optional[str]:
    for ov in overrides:
        key, _, value = ov.partition("=")
        if key == group:
            return value.split(",")[0]
    return default


def help_text(argv: list[str], doc: str) -> str:
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    arch = _choice(overrides, "arch", "hrm_v1")
    if not (CONFIG_DIR / "arch" / f"{arch}.yaml").is_file():
        arch = "hrm_v1"
    lines = [doc.strip(), "",
             "usage: python pretrain.py [key=value ...] [--multirun] [--cfg job] [--hydra-help]",
             "Keys (config/cfg_pretrain.yaml; schema utils/config.py PretrainConfig). Lists and mappings use Hydra",
             "syntax: eval_save_outputs=[preds] +optimizer.kwargs.eps=1e-6. A sweep: key=a,b with --multirun.", ""]
    rows = schema_rows()
    width = max(len(r[1]) for r in rows)
    twidth = max(len(r[2]) for r in rows)
    section = None
    for sec, key, typ, default, desc in rows:
        if sec != section:
            lines.append(f"{sec or 'other'}:")
            section = sec
        lines.append(f"  {key:<{width}}  {typ:<{twidth}}  {default:<18} {desc}")
    name, arows = arch_rows(arch)
    others = ", ".join(sorted(p.stem for p in (CONFIG_DIR / "arch").glob("*.yaml") if p.stem != arch))
    lines += ["", f"arch keys of arch={arch} ({name}; config/arch/{arch}.yaml; others: {others};",
              f"`python pretrain.py --help arch=NAME` lists theirs). Set them as arch.KEY=value:"]
    if arows:
        aw = max(len(r[0]) for r in arows)
        at = max(len(r[1]) for r in arows)
        lines += [f"  {k:<{aw}}  {t:<{at}}  {d:<18} {desc}" for k, t, d, desc in arows]
    experiments = ", ".join(sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml")))
    lines += ["", f"experiment=NAME applies a recipe from config/experiment/: {experiments}", ""]
    return "\n".join(lines)


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(key=value overrides, Hydra flags with their values)."""
    overrides, flags, i = [], [], 0
    while i < len(argv):
        a = argv[i]
        if a in HYDRA_VALUE_FLAGS and i + 1 < len(argv):
            flags += [a, argv[i + 1]]
            i += 2
            continue
        (flags if a.startswith("-") else overrides).append(a)
        i += 1
    return overrides, flags


def sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """The override lists of every job of a --multirun sweep (Hydra's own parser; the first 64 jobs)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = []
    for ov in parsed:
        key = ov.get_key_element()
        if ov.is_sweep_override():
            choices.append([f"{key}={v}" for v in ov.sweep_string_iterator()])
        else:
            choices.append([ov.input_line])
    return [list(job) for job in itertools.islice(itertools.product(*choices), MAX_SWEEP_JOBS_CHECKED)]


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose("cfg_pretrain", overrides=overrides)


def check_composed(overrides: list[str], multirun: bool) -> Optional[dict]:
    """Compose and validate each job; return the first job's resolved config (for --cfg job)."""
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from utils.config import build_config
    plain = [o for o in overrides if not o.split("=", 1)[0].lstrip("+~").startswith("hydra")]
    first = None
    try:
        for job in (sweep_jobs(plain) if multirun else [plain]):
            resolved = OmegaConf.to_container(compose(job), resolve=True)
            build_config(resolved)
            first = first or resolved
    except (HydraException, OmegaConfBaseException) as e:
        msg = " ".join(str(e).split())
        raise ConfigError(msg) from None
    return first


_CHECKED: set[tuple[str, ...]] = set()  # argvs already checked in this process (the script and main() both call)


def preflight(argv: list[str], doc: str) -> list[str]:
    """Run before the heavy imports of pretrain.py. Exits on --help, --cfg job and config errors; returns
    the argv Hydra should see."""
    if tuple(argv) in _CHECKED:
        return argv
    argv = _preflight(argv, doc)
    _CHECKED.add(tuple(argv))
    return argv


def _preflight(argv: list[str], doc: str) -> list[str]:
    args = argv[1:]
    if any(a in ("-h", "--help") for a in args):
        print(help_text(args, doc))
        sys.exit(0)
    overrides, flags = split_argv(args)
    custom_config = any(f in flags for f in ("--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd"))
    try:
        from utils.config import preflight_overrides
        preflight_overrides(overrides)
        if not custom_config and not any(f in flags for f in ("--hydra-help", "--info", "-i", "--shell-completion", "-sc")):
            cfg = check_composed(overrides, multirun=any(f in ("-m", "--multirun") for f in flags))
            if cfg is not None and _cfg_job_only(flags):
                from omegaconf import OmegaConf
                print(OmegaConf.to_yaml(OmegaConf.create(cfg)), end="")
                sys.exit(0)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if any(f in ("--cfg", "-c") for f in flags) and "--resolve" not in flags:
        argv = argv + ["--resolve"]  # Hydra prints interpolations such as ${.hidden_size} unresolved otherwise
    return argv


def _cfg_job_only(flags: list[str]) -> bool:
    for i, f in enumerate(flags):
        if f in ("--cfg", "-c"):
            return flags[i + 1:i + 2] == ["job"] and not any(p in flags for p in ("--package", "-p"))
    return False
