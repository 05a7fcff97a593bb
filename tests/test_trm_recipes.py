"""The four TRM recipes (config/experiment/trm_*.yaml): their dataset build command parses with our builder
and writes the recipe's data_path, they name the paper's accuracy, compose into a valid TRM config with the
README's overrides, and the pre-Hydra check knows they select arch=trm."""
import re
import shlex

import pytest

from trainer_helpers import REPO, compose
from utils.config import preflight_overrides
from utils.schema import ConfigError

RECIPES = {  # name: (builder, paper accuracy %, arch keys the TRM README sets)
    "trm_sudoku_mlp": ("build_sudoku_dataset", 87.4, dict(L_cycles=6, mlp_t=True, pos_encodings="none")),
    "trm_sudoku_att": ("build_sudoku_dataset", 74.7, dict(L_cycles=6, mlp_t=False, pos_encodings="rope")),
    "trm_maze": ("build_maze_dataset", 85.3, dict(L_cycles=4, mlp_t=False, pos_encodings="rope")),
    "trm_arc1": ("build_arc_dataset", 44.6, dict(L_cycles=4, mlp_t=False, pos_encodings="rope")),
}


@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe_opens_with_a_build_command_that_parses_and_the_papers_accuracy(name):
    builder, accuracy, _ = RECIPES[name]
    text = (REPO / "config" / "experiment" / f"{name}.yaml").read_text()
    header = text.split("\ndefaults:")[0]
    command = next(line for line in header.splitlines() if "python -m dataset." in line)
    argv = shlex.split(re.sub(r"<[^>]*>", "/somewhere", command.lstrip("# ")))
    assert argv[:3] == ["python", "-m", f"dataset.{builder}"]
    module = __import__(f"dataset.{builder}", fromlist=["make_parser"])
    args = module.make_parser().parse_args(argv[3:])
    cfg = compose([f"experiment={name}"])
    assert args.output_dir == cfg.data_path
    assert f"{accuracy} %" in header and "Accuracy the paper reports" in header


@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe_composes_to_trm_with_the_readme_overrides(name):
    cfg = compose([f"experiment={name}"])
    assert cfg.arch["name"] == "recursive_reasoning.trm@TinyRecursiveReasoningModel_ACTV1"
    assert cfg.arch["H_cycles"] == 3 and cfg.arch["L_layers"] == 2
    for key, value in RECIPES[name][2].items():
        assert cfg.arch[key] == value, key
    sudoku_or_maze = not name.startswith("trm_arc")
    assert (cfg.lr, cfg.weight_decay) == ((1e-4, 1.0) if sudoku_or_maze else (1e-4, 0.1))
    assert cfg.puzzle_emb_lr == (1e-4 if sudoku_or_maze else 1e-2)
    assert cfg.epochs == (50000 if sudoku_or_maze else 100000)
    assert cfg.ema and cfg.ema_rate == 0.999  # every TRM README command sets ema=True


def test_trm_cpu_demo_is_the_hrm_demo_with_trm():
    hrm, trm = compose(["experiment=sudoku_cpu_demo"]), compose(["experiment=trm_cpu_demo"])
    assert trm.arch["name"] == "recursive_reasoning.trm@TinyRecursiveReasoningModel_ACTV1" and not trm.ema
    for key in ("data_path", "global_batch_size", "epochs", "lr", "lr_warmup_steps", "lr_min_ratio", "weight_decay"):
        assert getattr(trm, key) == getattr(hrm, key), key
    for key in ("hidden_size", "H_cycles", "L_cycles", "halt_max_steps", "forward_dtype"):
        assert trm.arch[key] == hrm.arch[key], key


def test_preflight_checks_arch_keys_against_the_recipes_arch():
    preflight_overrides(["experiment=trm_sudoku_att", "arch.mlp_t=true"])
    with pytest.raises(ConfigError, match="did you mean 'mlp_t'"):
        preflight_overrides(["experiment=trm_sudoku_att", "arch.mlp_tt=true"])
    with pytest.raises(ConfigError, match="unknown config key 'arch.mlp_t'"):
        preflight_overrides(["experiment=trm_maze", "arch=hrm_v1", "arch.mlp_t=true"])  # arch= wins
