"""The shipped recipe files parse with the CLI's own reader, validate, and state the authors'
numbers themselves (docs/recipe.md, "Hyper-parameters in the authors' scripts") rather than
leaning on defaults that could change."""

from importlib.resources import files

from anita.dpo import DPOConfig
from anita.train.config import TrainConfig, read_config_file

RECIPES = files("anita") / "recipes"
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
COMMON = {"qlora": True, "precision": "bf16", "lora_dropout": 0.0, "targets": SEVEN, "checkpointing": "full",
          "epochs": 1, "scheduler": "linear"}


def check(name: str, cls, expected: dict):
    raw = read_config_file(RECIPES / name, cls)
    for key, value in expected.items():
        assert raw.get(key) == value, (name, key)
    cls(**raw).validate(name)


def test_sft_recipe():
    check("anita_1_sft.toml", TrainConfig, COMMON | {
        "model": "meta-llama/Meta-Llama-3-8B-Instruct", "lora_r": 16, "lora_alpha": 8.0, "rslora": False,
        "batch_size": 16, "grad_accum": 8, "lr": 2e-4, "warmup_steps": 100, "optimizer": "paged_adamw_8bit",
        "weight_decay": 0.01, "max_length": 8192, "packing": False})


def test_dpo_recipe():
    check("anita_2_dpo.toml", DPOConfig, COMMON | {
        "lora_r": 64, "lora_alpha": 16.0, "rslora": True, "beta": 0.1, "loss": "sigmoid", "label_smoothing": 0.0,
        "reference": "adapters-off", "batch_size": 8, "grad_accum": 12, "lr": 5e-5, "warmup_ratio": 0.1,
        "optimizer": "adamw_8bit", "weight_decay": 0.0, "max_length": 1024, "max_prompt_length": 512})


def test_italian_adaptation_recipe():
    check("anita_3_italian.toml", TrainConfig, COMMON | {"lr": 2e-5})


STAGE_2 = {"qlora": True, "lora_r": 64, "lora_alpha": 16.0, "rslora": True, "batch_size": 8, "grad_accum": 12,
           "lr": 5e-5, "warmup_ratio": 0.1, "max_length": 1024, "max_prompt_length": 512}


def test_orpo_recipe():
    """ORPO replaces SFT + DPO: on the Instruct model, lambda = 0.1 (paper, TRL), NLL weight 1, no reference."""
    check("anita_2_orpo.toml", DPOConfig, COMMON | STAGE_2 | {
        "model": "meta-llama/Meta-Llama-3-8B-Instruct", "loss": "orpo", "beta": 0.1, "rpo_alpha": 1.0})
    assert "reference" not in read_config_file(RECIPES / "anita_2_orpo.toml", DPOConfig)


def test_simpo_recipe():
    """SimPO's Llama-3-8B-Instruct setting: beta 2.5, gamma = 0.55 beta."""
    check("anita_2_simpo.toml", DPOConfig, COMMON | STAGE_2 | {"loss": "simpo", "beta": 2.5, "simpo_gamma": 1.375})


def test_kto_recipe():
    check("anita_2_kto.toml", DPOConfig, COMMON | STAGE_2 | {
        "loss": "kto", "beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0, "reference": "adapters-off"})
