"""Name resolution kept compatible with the original HRM: `module@Class` names a class in `models.<module>`."""
from __future__ import annotations

import importlib
import inspect

from utils.schema import ConfigError


def load_model_class(identifier: str, prefix: str = "models."):
    """'hrm.hrm_act_v1@HierarchicalReasoningModel_ACTV1' -> models.hrm.hrm_act_v1.HierarchicalReasoningModel_ACTV1."""
    if "@" not in identifier:
        raise ConfigError(f"model name '{identifier}' must look like 'module.path@ClassName'")
    module_path, class_name = identifier.split("@", 1)
    try:
        module = importlib.import_module(prefix + module_path)
    except ModuleNotFoundError as e:
        raise ConfigError(f"model name '{identifier}': no module '{prefix + module_path}' ({e})") from e
    try:
        return getattr(module, class_name)
    except AttributeError:
        raise ConfigError(f"model name '{identifier}': module '{prefix + module_path}' has no class '{class_name}'") from None


def get_model_source_path(identifier: str, prefix: str = "models.") -> str:
    module_path, _ = identifier.split("@", 1)
    return inspect.getfile(importlib.import_module(prefix + module_path))
