"""The arch YAMLs: every model knob declared, the gated variant = hrm_v1 + the three gating keys only."""
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from models.hrm.hrm_act_v1 import HierarchicalReasoningModel_ACTV1, HierarchicalReasoningModel_ACTV1Config
from utils.functions import load_model_class
from utils.schema import field_names

INJECTED = {"batch_size", "seq_len", "vocab_size", "num_puzzle_identifiers"}


def _arch(repo_root, name):
    with initialize_config_dir(config_dir=str(repo_root / "config" / "arch"), version_base=None):
        return OmegaConf.to_container(compose(config_name=name), resolve=True)


def test_hrm_v1_yaml_declares_every_model_key(repo_root):
    arch = _arch(repo_root, "hrm_v1")
    assert arch["name"] == "hrm.hrm_act_v1@HierarchicalReasoningModel_ACTV1"
    assert arch["loss"] == {"name": "losses@ACTLossHead", "loss_type": "stablemax_cross_entropy"}
    model_keys = set(arch) - {"name", "loss"}
    assert model_keys == set(field_names(HierarchicalReasoningModel_ACTV1Config)) - INJECTED
    assert arch["puzzle_emb_ndim"] == arch["hidden_size"] == 512
    assert arch["use_gating"] is False


def test_gated_yaml_changes_only_gating(repo_root):
    base, gated = _arch(repo_root, "hrm_v1"), _arch(repo_root, "hrm_v1_gated")
    changed = {k for k in set(base) | set(gated) if base.get(k) != gated.get(k)}
    assert changed == {"use_gating"}
    assert gated["gate_hidden_ratio"] == 0.25 and gated["gate_init_bias"] == -2.2


def test_yaml_builds_the_model_class_it_names(repo_root):
    arch = _arch(repo_root, "hrm_v1_gated")
    cls = load_model_class(arch["name"])
    small = {k: v for k, v in arch.items() if k not in ("name", "loss")}
    small.update(hidden_size=64, num_heads=2, puzzle_emb_ndim=64, H_layers=1, L_layers=1, batch_size=2, seq_len=4,
                 vocab_size=5, num_puzzle_identifiers=1)
    with torch.device("meta"):
        model = cls(small)
    assert isinstance(model, HierarchicalReasoningModel_ACTV1) and model.inner.L_level.gate is not None
