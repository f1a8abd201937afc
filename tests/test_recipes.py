"""The shipped recipe files parse with the CLI's own reader and carry the authors' numbers
(shared/RECIPE.md, "Hyper-parameters in the authors' scripts")."""

from importlib.resources import files

from anita.dpo.cli import DPOConfig
from anita.train.config import TrainConfig, read_config_file

RECIPES = files("anita") / "recipes"


def test_sft_recipe():
    cfg = TrainConfig(**read_config_file(RECIPES / "anita_1_sft.toml", TrainConfig))
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.rslora) == (16, 8.0, 0.0, False)
    assert (cfg.batch_size, cfg.grad_accum, cfg.lr, cfg.warmup_steps) == (16, 8, 2e-4, 100)
    assert (cfg.optimizer, cfg.weight_decay, cfg.max_length, cfg.packing) == ("paged_adamw_8bit", 0.01, 8192, False)
    assert cfg.qlora and cfg.gradient_checkpointing and len(cfg.targets) == 7


def test_dpo_recipe():
    cfg = DPOConfig(**read_config_file(RECIPES / "anita_2_dpo.toml", DPOConfig))
    assert (cfg.lora_r, cfg.lora_alpha, cfg.rslora, cfg.beta, cfg.loss) == (64, 16.0, True, 0.1, "sigmoid")
    assert (cfg.batch_size, cfg.grad_accum, cfg.lr, cfg.warmup_ratio) == (8, 12, 5e-5, 0.1)
    assert (cfg.optimizer, cfg.weight_decay, cfg.max_length, cfg.max_prompt_length) == ("adamw_8bit", 0.0, 1024, 512)
    assert cfg.reference == "adapters-off" and cfg.label_smoothing == 0.0


def test_italian_adaptation_recipe():
    cfg = TrainConfig(**read_config_file(RECIPES / "anita_3_italian.toml", TrainConfig))
    assert cfg.lr == 2e-5 and cfg.qlora
