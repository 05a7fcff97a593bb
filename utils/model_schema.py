"""The config schema of a model class and of its loss head, read from their source files without importing
them. Model modules import torch (3 s on a quiet machine, 15-25 s on a busy one); reading the dataclass
fields with `ast` lets every config error - a misspelt arch key, a mistyped value - appear before torch is
imported. Anything the reader cannot follow (a dynamic base class, a star import) makes it return None,
and the caller imports the class instead: the answer is then slower, never different."""
from __future__ import annotations

import ast
import dataclasses
import typing
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
MISSING = dataclasses.MISSING


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    name: str
    annotation: str          # source text, e.g. "int", "Optional[str]"
    default: Any = MISSING   # a literal default, MISSING when required, or None for a non-literal one
    comment: str = ""        # the trailing `# ...` comment on the field's line

    @property
    def type(self) -> Any:
        """The annotation as a typing object (Any when it names something this reader does not know)."""
        namespace = {"int": int, "float": float, "str": str, "bool": bool, "list": list, "dict": dict,
                     "tuple": tuple, "Optional": Optional, "Any": Any, "typing": typing, "None": None}
        try:
            return eval(self.annotation, namespace)  # noqa: S307 - annotation text of our own source files
        except Exception:
            return Any


def _module_file(module: str) -> Optional[Path]:
    base = REPO.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


@lru_cache(maxsize=None)
def _parse(path: Path) -> tuple[ast.Module, list[str]]:
    text = path.read_text()
    return ast.parse(text), text.splitlines()


def _find_class(module: str, name: str, depth: int = 0) -> Optional[tuple[ast.ClassDef, str, list[str]]]:
    """The ClassDef `name` of `module` (following `from x import name` up to a few hops)."""
    path = _module_file(module)
    if path is None or depth > 4:
        return None
    tree, lines = _parse(path)
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return node, module, lines
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    return _find_class(node.module, alias.name, depth + 1)
    return None


def _literal(node: ast.AST) -> Any:
    try:
        return ast.literal_eval(node)
    except Exception:
        return None


def _dataclass_fields(cls: ast.ClassDef, module: str, lines: list[str]) -> Optional[list[FieldSpec]]:
    fields: dict[str, FieldSpec] = {}
    for base in cls.bases:  # dataclass inheritance: base fields first, in order
        if not isinstance(base, ast.Name):
            return None
        found = _find_class(module, base.id)
        if found is None:
            return None
        inherited = _dataclass_fields(*found)
        if inherited is None:
            return None
        fields.update({f.name: f for f in inherited})
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            annotation = ast.unparse(node.annotation)
            if annotation.startswith(("ClassVar", "typing.ClassVar")):
                continue
            default: Any = MISSING
            if node.value is not None:
                value = node.value
                if isinstance(value, ast.Call) and ast.unparse(value.func) in ("field", "dataclasses.field"):
                    kw = {k.arg: k.value for k in value.keywords}
                    default = _literal(kw["default"]) if "default" in kw else (
                        {} if "default_factory" in kw and ast.unparse(kw["default_factory"]) == "dict" else
                        [] if "default_factory" in kw and ast.unparse(kw["default_factory"]) == "list" else None)
                else:
                    default = _literal(value)
            rest = lines[node.end_lineno - 1][node.end_col_offset:]
            comment = rest.split("#", 1)[1].strip() if "#" in rest else ""
            fields[node.target.id] = FieldSpec(node.target.id, annotation, default, comment)
    return list(fields.values())


def _split(identifier: str, prefix: str = "models.") -> tuple[str, str]:
    module, _, name = identifier.partition("@")
    return prefix + module, name


@lru_cache(maxsize=None)
def model_config_fields(identifier: str) -> Optional[tuple[FieldSpec, ...]]:
    """Fields of `config_class` of the model named 'module@Class', or None when the source does not say."""
    if "@" not in identifier:
        return None
    found = _find_class(*_split(identifier))
    if found is None:
        return None
    cls, module, _ = found
    config_name = None
    for node in cls.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "config_class" for t in node.targets):
            if isinstance(node.value, ast.Name):
                config_name = node.value.id
    if config_name is None:
        return None
    config = _find_class(module, config_name)
    if config is None:
        return None
    fields = _dataclass_fields(*config)
    return tuple(fields) if fields is not None else None


@lru_cache(maxsize=None)
def loss_head_keys(identifier: str) -> Optional[tuple[tuple[str, ...], bool]]:
    """(keyword names of the loss head's __init__ except self/model, whether it takes **kwargs), or None."""
    if "@" not in identifier:
        return None
    found = _find_class(*_split(identifier))
    if found is None:
        return None
    cls = found[0]
    init = next((n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
    if init is None:
        return None
    args = init.args
    names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs if a.arg not in ("self", "model")]
    return tuple(names), args.kwarg is not None
