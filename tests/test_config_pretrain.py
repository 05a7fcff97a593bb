"""The training config: every original key declared (no `+` needed), strict validation with closest-key
messages before any work, `--cfg job`, the experiment recipes, and a Hydra multirun of two jobs."""
from __future__ import annotations

import dataclasses

import pytest
from omegaconf import OmegaConf

from trainer_helpers import REPO, build_tiny_sudoku, compose, run_cli, tiny_overrides
from utils.config import PretrainConfig, build_config, preflight_overrides
from utils.schema import ConfigError

ORIGINAL_KEYS = ["data_path", "global_batch_size", "epochs", "eval_interval", "checkpoint_every_eval", "lr",
                 "lr_min_ratio", "lr_warmup_steps", "beta1", "beta2", "weight_decay", "puzzle_emb_weight_decay",
                 "puzzle_emb_lr", "seed", "project_name", "run_name", "checkpoint_path", "eval_save_outputs"]
ADDED_KEYS = ["optimizer", "lr_scheduler", "grad_accum_steps", "grad_clip", "mixed_precision", "compile", "linear_backend", "device",
              "checkpoint_limit", "save_best", "eval_patience", "eval_patience_grace_steps", "reset_progress",
              "init_from", "log_every", "max_eval_batches", "eval_batch_size", "logger"]


def test_yaml_declares_every_schema_key_with_the_original_defaults():
    yaml = OmegaConf.load(REPO / "config" / "cfg_pretrain.yaml")
    fields = {f.name for f in dataclasses.fields(PretrainConfig)}
    assert set(ORIGINAL_KEYS + ADDED_KEYS) <= fields
    assert fields - {"arch"} <= set(yaml.keys())  # declared: overriding never needs `+`
    cfg = compose([])
    assert (cfg.global_batch_size, cfg.epochs, cfg.eval_interval, cfg.lr, cfg.lr_min_ratio, cfg.lr_warmup_steps,
            cfg.beta1, cfg.beta2, cfg.weight_decay, cfg.puzzle_emb_lr) == (768, 100000, 10000, 1e-4, 1.0, 2000,
                                                                            0.9, 0.95, 0.1, 1e-2)
    assert cfg.arch["name"] == "hrm.hrm_act_v1@HierarchicalReasoningModel_ACTV1" and cfg.arch["hidden_size"] == 512
    assert cfg.optimizer.name == "adam_atan2" and cfg.lr_scheduler.name == "cosine_warmup"


@pytest.mark.parametrize("override,message", [
    ("lr_warmup_step=3", "unknown config key 'lr_warmup_step' did you mean 'lr_warmup_steps'?"),
    ("arch.hiden_size=3", "unknown config key 'arch.hiden_size' did you mean 'hidden_size'?"),
    ("arch.loss.los_type=x", "unknown config key 'arch.loss.los_type' did you mean 'loss_type'?"),
    ("save_best.metrc=x", "unknown config key 'save_best.metrc' did you mean 'metric'?"),
    ("arch=hrm_v2", "unknown arch 'hrm_v2' (config/arch/hrm_v2.yaml) did you mean 'hrm_v1'?"),
])
def test_misspelt_keys_fail_before_hydra_with_the_closest_key(override, message):
    with pytest.raises(ConfigError) as e:
        preflight_overrides([override])
    assert str(e.value) == message


def test_composed_config_is_validated_too():
    # keys added with `+` bypass the command-line check but not the schema
    raw = OmegaConf.to_container(OmegaConf.create({"arch": compose([]).arch, "lr": 1e-4, "lr_warmpu_steps": 1}))
    with pytest.raises(ConfigError, match="did you mean 'lr_warmup_steps'"):
        build_config(raw)
    with pytest.raises(ConfigError, match="'global_batch_size' expects an int, got 'abc'"):
        compose(["global_batch_size=abc"])
    with pytest.raises(ConfigError, match="'arch.hidden_size' expects an int"):
        compose(["arch.hidden_size=1.5"])
    with pytest.raises(ConfigError, match="'mixed_precision' must be one of none, bf16"):
        compose(["mixed_precision=fp8"])
    with pytest.raises(ConfigError, match="fp16 needs loss scaling"):  # refused, not trained on underflowing grads
        compose(["mixed_precision=fp16"])
    with pytest.raises(ConfigError, match="unknown config key 'arch.hiden_size' did you mean 'hidden_size'"):
        compose(["+arch.hiden_size=3"])


def test_experiment_recipes_compose():
    cfg = compose(["experiment=sudoku_hard_full", "lr=2e-4"])
    assert (cfg.experiment, cfg.global_batch_size, cfg.lr, cfg.lr_min_ratio) == ("sudoku_hard_full", 2304, 2e-4, 0.1)
    assert (cfg.arch["L_cycles"], cfg.arch["halt_max_steps"], cfg.arch["pos_encodings"]) == (8, 8, "learned")
    assert cfg.arch["loss"]["loss_type"] == "softmax_cross_entropy"
    for name in ("sudoku_extreme_1k", "maze_30x30_hard_1k", "arc_1", "arc_2", "sudoku_cpu_demo"):
        assert compose([f"experiment={name}"]).experiment == name


def test_cli_cfg_job_and_one_line_errors():
    proc = run_cli(["pretrain.py", "--cfg", "job", "arch=hrm_v1_gated", "lr=3e-4"])
    assert proc.returncode == 0, proc.stderr
    assert "use_gating: true" in proc.stdout and "lr: 0.0003" in proc.stdout
    proc = run_cli(["pretrain.py", "arch.hiden_size=64"])
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: unknown config key 'arch.hiden_size' did you mean 'hidden_size'?"
    proc = run_cli(["pretrain.py", "data_path=/nonexistent/x", "global_batch_size=8"])
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "data_path '/nonexistent/x'" in proc.stderr


def test_bad_batch_split_is_refused_before_training(tmp_path):
    data = build_tiny_sudoku(tmp_path / "data")
    import pretrain
    with pytest.raises(ConfigError, match="global_batch_size 15 must be divisible by world_size 1 x grad_accum_steps 2"):
        pretrain.train(compose(tiny_overrides(data, tmp_path / "r", global_batch_size=15, grad_accum_steps=2)))
    (data / "train" / "dataset.json").write_text("{not json")
    from dataset.common import DatasetError
    with pytest.raises(DatasetError, match="not valid JSON"):
        pretrain.train(compose(tiny_overrides(data, tmp_path / "r")))


def test_multirun_of_two_jobs(tmp_path):
    data = build_tiny_sudoku(tmp_path / "data")
    overrides = [o for o in tiny_overrides(data, tmp_path / "unused", max_steps=2, epochs=1)
                 if not o.startswith(("checkpoint_path=", "run_name="))]
    proc = run_cli([str(REPO / "pretrain.py"), "--multirun", "arch=hrm_v1,hrm_v1_gated", *overrides,
                    f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=tmp_path, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted((tmp_path / "checkpoints" / "p").iterdir())
    assert len(runs) == 2
    gated = [r for r in runs if "gate/L/mean" in (r / "metrics.jsonl").read_text()]
    assert len(gated) == 1  # the hrm_v1_gated job logged its gate statistics
    for r in runs:
        assert (r / "step_2" / "model.safetensors").is_file()
        assert "group" not in r.name
