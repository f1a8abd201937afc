"""Tests for anita/train/config.py and the `anita sft` flags: a TOML or YAML file and the flags
set the same fields, flags win over the file, and bad keys or values name the file and field."""

import argparse

import pytest
import torch

from anita import dtypes
from anita.errors import AnitaError
from anita.model.llama import PROJECTIONS
from anita.train.config import TrainConfig, add_config_arguments, config_from_args


def parse(argv):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return config_from_args(parser.parse_args(argv))


REQUIRED = ["--model", "m", "--data", "d.jsonl", "--output", "out"]
FLAGS = REQUIRED + ["--qlora", "--lora-r", "64", "--lora-alpha", "16", "--rslora", "--targets", "q_proj,v_proj",
                    "--lr", "5e-5", "--max-steps", "30", "--packing", "--warmup-ratio", "0.1", "--eval-data", "h.jsonl"]
TOML = """model = "m"
data = "d.jsonl"
output = "out"
qlora = true
lora-r = 64
lora_alpha = 16
rslora = true
targets = ["q_proj", "v_proj"]
lr = 5e-5
max_steps = 30
packing = true
warmup_ratio = 0.1
eval_data = "h.jsonl"
"""
YAML = """model: m
data: d.jsonl
output: out
qlora: true
lora_r: 64
lora_alpha: 16
rslora: true
targets: q_proj,v_proj
lr: 5.0e-5
max_steps: 30
packing: true
warmup_ratio: 0.1
eval_data: h.jsonl
"""


def test_flags_toml_and_yaml_give_the_same_config(tmp_path):
    (tmp_path / "c.toml").write_text(TOML)
    (tmp_path / "c.yaml").write_text(YAML)
    from_flags = parse(FLAGS)
    assert from_flags == parse(["--config", str(tmp_path / "c.toml")]) == parse(["--config", str(tmp_path / "c.yaml")])
    cfg = from_flags
    assert (cfg.lora_r, cfg.targets, cfg.max_steps, cfg.qlora) == (64, ["q_proj", "v_proj"], 30, True)
    assert from_flags.batch_size == 8 and from_flags.grad_accum == 1  # the defaults of what was not set stay
    assert TrainConfig().targets == list(PROJECTIONS)


def test_flags_override_the_file(tmp_path):
    (tmp_path / "c.toml").write_text(TOML)
    cfg = parse(["--config", str(tmp_path / "c.toml"), "--lora-r", "8", "--no-packing"])
    assert (cfg.lora_r, cfg.packing, cfg.lr) == (8, False, 5e-5)


@pytest.mark.parametrize("text,message", [
    ('model = "m"\nlearning_rate = 1e-4\n', "unknown key 'learning_rate'"),
    ('model = "m"\nlora_r = "sixteen"\n', "'lora_r' must be int"),
    ('model = "m"\npacking = 1\n', "'packing' must be bool"),
    ('model = "m\n', "not valid TOML"),
])
def test_bad_config_file_names_file_and_key(tmp_path, text, message):
    (tmp_path / "c.toml").write_text(text)
    with pytest.raises(AnitaError, match=rf"c\.toml: .*{message}"):
        parse(["--config", str(tmp_path / "c.toml")])


def test_missing_and_out_of_range_values():
    with pytest.raises(AnitaError, match="'data' is required"):
        parse(["--model", "m"])
    with pytest.raises(AnitaError, match="'grad_accum' must be at least 1"):
        parse(REQUIRED + ["--grad-accum", "0"])
    with pytest.raises(AnitaError, match="'lora_dropout' must be in"):
        parse(REQUIRED + ["--lora-dropout", "1.5"])
    with pytest.raises(SystemExit):  # argparse rejects an unknown choice itself
        parse(REQUIRED + ["--optimizer", "sgd"])


def test_recipe_defaults_qlora_and_the_targets():
    """`anita sft` does what its help says the recipe does: a 4-bit NF4 base, LoRA on the seven
    projections; --no-qlora is plain LoRA."""
    assert parse(REQUIRED).qlora is True and parse(REQUIRED).targets == list(PROJECTIONS)
    assert parse(REQUIRED + ["--no-qlora"]).qlora is False


@pytest.mark.parametrize("flags", [["--lora-r", "32"], ["--lora-r", "16"], ["--lora-alpha", "4"],
                                   ["--lora-dropout", "0.1"], ["--rslora"], ["--targets", "q_proj"]])
def test_fresh_adapter_settings_beside_adapter_are_refused(flags):
    """With --adapter the adapter keeps its own r, alpha, dropout, rsLoRA and targets, so setting
    them is refused rather than silently dropped; even a value equal to the default (--lora-r 16)."""
    with pytest.raises(AnitaError, match=rf"{flags[0][2:].replace('-', '_')}.*--adapter continues a.d"):
        parse(REQUIRED + ["--adapter", "a.d", *flags])
    assert parse(REQUIRED + ["--adapter", "a.d"]).adapter == "a.d"


def test_fresh_adapter_settings_beside_adapter_are_refused_from_python():
    with pytest.raises(AnitaError, match="lora_r: settings of a fresh adapter"):
        TrainConfig(model="m", data="d", output="o", adapter="a.d", lora_r=32).validate()
    TrainConfig(model="m", data="d", output="o", adapter="a.d").validate()


def test_bare_defaults_are_what_a_trl_user_expects():
    """The house rule for bare commands: micro-batch 8, no accumulation, no warm-up, torch AdamW, no weight decay,
    max_length 1024 (TRL 1.16's SFTConfig); the paper's values live in anita/recipes/."""
    cfg = parse(REQUIRED)
    assert (cfg.batch_size, cfg.grad_accum, cfg.warmup_steps, cfg.warmup_ratio, cfg.optimizer, cfg.weight_decay,
            cfg.max_length, cfg.checkpointing) == (8, 1, 0, None, "adamw", 0.0, 1024, "full")


SPELLED_OUT = ["--precision", "bf16", "--head-dtype", "bf16", "--adapter-dtype", "bf16"]


def test_bare_dtypes_are_trls_on_a_device_with_bf16(monkeypatch):
    """Where the device has bf16 (monkeypatched: this CPU may lack it), a bare command trains as TRL does: bf16
    autocast, the head's matmuls in bf16, the NF4 base's adapters cast to bf16; the full-precision base keeps
    fp32 adapters (TRL casts only a quantized model's). The bare config is the spelled-out one field for field,
    so it runs the same code. --precision fp32 alone is the exact reference mode."""
    monkeypatch.delenv(dtypes.PRECISION_ENV)  # the suite pins fp32 (tests/conftest.py)
    monkeypatch.setattr(dtypes, "bf16_native", lambda device: True)
    bare = parse(REQUIRED)
    assert (bare.precision, bare.head_dtype, bare.adapter_dtype) == ("bf16", "bf16", "bf16")
    assert bare.to_dict() == parse(REQUIRED + SPELLED_OUT).to_dict()
    full = parse(REQUIRED + ["--no-qlora"])
    assert (full.precision, full.head_dtype, full.adapter_dtype) == ("bf16", "bf16", "fp32")
    exact = parse(REQUIRED + ["--precision", "fp32"])
    assert (exact.precision, exact.head_dtype, exact.adapter_dtype) == ("fp32", "fp32", "fp32")
    mixed = parse(REQUIRED + ["--head-dtype", "fp32"])
    assert (mixed.precision, mixed.head_dtype, mixed.adapter_dtype) == ("bf16", "fp32", "bf16")


def test_bare_dtypes_without_bf16_are_fp32(monkeypatch):
    """A device without native bf16 (an AVX2 CPU, a V100) defaults to fp32 throughout; bf16 asked for on a CPU
    still runs (emulated), and its head and adapters follow it."""
    monkeypatch.delenv(dtypes.PRECISION_ENV)  # the suite pins fp32 (tests/conftest.py)
    monkeypatch.setattr(dtypes, "bf16_native", lambda device: False)
    bare = parse(REQUIRED)
    assert (bare.precision, bare.head_dtype, bare.adapter_dtype) == ("fp32", "fp32", "fp32")
    asked = parse(REQUIRED + ["--precision", "bf16"])
    assert asked.to_dict() == parse(REQUIRED + SPELLED_OUT).to_dict()


def test_this_machines_bare_dtypes_follow_its_capability(monkeypatch):
    monkeypatch.delenv(dtypes.PRECISION_ENV)
    expected = "bf16" if dtypes.bf16_native("cpu") else "fp32"
    assert parse(REQUIRED).precision == expected


def test_anita_precision_sets_a_bare_commands_precision(monkeypatch):
    """$ANITA_PRECISION is a site's default for a bare command; a flag still wins; a bad value is one error."""
    monkeypatch.setattr(dtypes, "bf16_native", lambda device: False)
    monkeypatch.setenv(dtypes.PRECISION_ENV, "bf16")
    assert (parse(REQUIRED).precision, parse(REQUIRED).adapter_dtype) == ("bf16", "bf16")
    assert parse(REQUIRED + ["--precision", "fp32"]).precision == "fp32"
    monkeypatch.setenv(dtypes.PRECISION_ENV, "fp16")
    with pytest.raises(AnitaError, match=r"\$ANITA_PRECISION: expected fp32 or bf16, got 'fp16'"):
        parse(REQUIRED)


def test_bf16_on_a_gpu_without_it_is_one_clear_error(monkeypatch):
    """A GPU of compute capability below 8.0 (a T4 here, faked) has no bf16: asking for it names the GPU and
    what to pass instead; its bare command trains in fp32."""
    monkeypatch.delenv(dtypes.PRECISION_ENV)  # the suite pins fp32 (tests/conftest.py)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dtypes, "bf16_native", lambda device: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    assert parse(REQUIRED + ["--device", "cuda"]).precision == "fp32"
    for flags in (["--precision", "bf16"], ["--head-dtype", "bf16"], ["--adapter-dtype", "bf16"]):
        with pytest.raises(AnitaError, match=r"command line: bf16 on device cuda: Tesla T4 \(compute capability "
                                             r"7\.5\) has no bf16 \(it needs 8\.0 or later\); train in fp32: --precision fp32"):
            parse(REQUIRED + ["--device", "cuda"] + flags)


def test_checkpointing_modes_and_the_older_switch(tmp_path):
    """--checkpointing full|selective|off; the older gradient_checkpointing true/false still works
    (full/off); the two set to disagree is one clear error."""
    assert parse(REQUIRED).checkpointing == "full"
    assert parse(REQUIRED + ["--no-gradient-checkpointing"]).checkpointing == "off"
    assert parse(REQUIRED + ["--checkpointing", "selective"]).checkpointing == "selective"
    assert parse(REQUIRED + ["--gradient-checkpointing", "--checkpointing", "selective"]).checkpointing == "selective"
    with pytest.raises(AnitaError, match="gradient_checkpointing = false contradicts checkpointing = selective"):
        parse(REQUIRED + ["--no-gradient-checkpointing", "--checkpointing", "selective"])
    old = tmp_path / "old.toml"
    old.write_text("gradient_checkpointing = false\n")
    assert parse(REQUIRED + ["--config", str(old)]).checkpointing == "off"
    with pytest.raises(SystemExit):
        parse(REQUIRED + ["--checkpointing", "some"])
    bad = tmp_path / "bad.toml"
    bad.write_text('checkpointing = "partial"\n')
    with pytest.raises(AnitaError, match="'checkpointing' must be one of"):
        parse(REQUIRED + ["--config", str(bad)])
    assert parse(REQUIRED + ["--head-dtype", "bf16", "--fused-projections"]).fused_projections


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("field, value, message", [
    ("lr", NAN, "'lr' must be a finite number, got nan"),  # torch's AdamW raised a traceback on it (issue 18)
    ("lr", INF, "'lr' must be a finite number, got inf"),
    ("lora_alpha", NAN, "'lora_alpha' must be a finite number"),  # trained nothing: loss NaN at step 1
    ("weight_decay", NAN, "'weight_decay' must be a finite number"),
    ("max_grad_norm", NAN, "'max_grad_norm' must be a finite number"),  # ran with no clipping at all
    ("max_grad_norm", INF, "'max_grad_norm' must be a finite number"),
    ("warmup_ratio", INF, "'warmup_ratio' must be a finite number"),
    ("lora_r", 2.5, "'lora_r' must be an integer, got 2.5"),
    ("max_steps", True, "'max_steps' must be an integer, got True"),
])
def test_non_finite_and_mistyped_numbers_are_refused_from_python(field, value, message):
    """`run_sft(TrainConfig(...))` validates the same as the flags do."""
    with pytest.raises(AnitaError, match=message.replace("(", r"\(")):
        TrainConfig(model="m", data="d", output="o", **{field: value}).validate()


@pytest.mark.parametrize("suffix, text, message", [
    (".toml", "lr = nan", "'lr' must be a finite number, got nan"),
    (".toml", "lr = 1e400", "'lr' must be a finite number, got inf"),  # TOML reads 1e400 as inf
    (".toml", "max_grad_norm = -inf", "'max_grad_norm' must be a finite number, got -inf"),
    (".yaml", "lora_alpha: .nan", "'lora_alpha' must be a finite number, got nan"),
    (".yaml", "lr: 1.0e+400", "'lr' must be a finite number, got inf"),
    (".yaml", "lr: fast", "'lr' must be float, got 'fast'"),
])
def test_non_finite_numbers_in_config_files_name_the_file(tmp_path, suffix, text, message):
    path = tmp_path / f"c{suffix}"
    path.write_text(text + "\n")
    with pytest.raises(AnitaError, match=f"c{suffix}: {message}"):
        parse(REQUIRED + ["--config", str(path)])


def test_yaml_reads_exponent_numbers_without_a_dot():
    """YAML 1.1 (PyYAML) reads `1e-4` as a string; a float field takes it as the number a user meant."""
    assert parse_file_text("lr: 1e-4\n").lr == 1e-4


def parse_file_text(text: str, suffix: str = ".yaml"):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"c{suffix}"
        path.write_text(text)
        return parse(REQUIRED + ["--config", str(path)])


SFT_RECIPE = str(__import__("pathlib").Path(__file__).parents[2] / "anita" / "recipes" / "anita_1_sft.toml")


@pytest.mark.parametrize("file_text, flags, expected", [
    # the recipe sets batch_size = 16 and gradient_checkpointing = true: a flag for the other field wins
    ("RECIPE", ["--max-tokens", "4096"], {"max_tokens": 4096, "batch_size": 8}),
    ("RECIPE", ["--checkpointing", "off"], {"checkpointing": "off"}),
    ("RECIPE", ["--checkpointing", "selective"], {"checkpointing": "selective"}),
    ("RECIPE", ["--no-gradient-checkpointing"], {"checkpointing": "off"}),
    ("gradient_checkpointing = false\n", ["--checkpointing", "selective"], {"checkpointing": "selective"}),
    ('max_tokens = 512\n', ["--batch-size", "4"], {"batch_size": 4, "max_tokens": None}),
    ('checkpointing = "selective"\n', ["--no-gradient-checkpointing"], {"checkpointing": "off"}),
    # a flag naming another source drops the file's split and config of its source
    ("RECIPE", ["--data", "local.jsonl"], {"data": "local.jsonl", "data_split": None}),
    ("RECIPE", ["--data", "HuggingFaceH4/ultrachat_200k"], {"data_split": "train_sft"}),
    ('eval_data = "org/set"\neval_split = "test"\neval_config = "c"\n', ["--eval-data", "h.jsonl"],
     {"eval_data": "h.jsonl", "eval_split": None, "eval_config": None}),
])
def test_a_flag_wins_over_the_files_value_of_a_field_it_excludes(tmp_path, file_text, flags, expected):
    config = SFT_RECIPE if file_text == "RECIPE" else tmp_path / "c.toml"
    if file_text != "RECIPE":
        config.write_text(file_text)
    data = [] if "--data" in flags else ["--data", "d.jsonl"]
    cfg = parse(["--config", str(config), "--model", "m", "--output", "out", *data, *flags])
    assert {k: getattr(cfg, k) for k in expected} == expected


@pytest.mark.parametrize("file_text, flags, message", [
    ("", ["--batch-size", "4", "--max-tokens", "512"], "either 'batch_size'"),
    ("batch_size = 4\nmax_tokens = 512\n", [], "either 'batch_size'"),
    ("", ["--no-gradient-checkpointing", "--checkpointing", "full"], "contradicts checkpointing = full"),
    ("gradient_checkpointing = false\ncheckpointing = \"full\"\n", [], "contradicts checkpointing = full"),
])
def test_exclusive_fields_both_given_the_same_way_are_refused(tmp_path, file_text, flags, message):
    (tmp_path / "c.toml").write_text(file_text)
    with pytest.raises(AnitaError, match=message):
        parse(["--config", str(tmp_path / "c.toml"), *REQUIRED, *flags])


@pytest.mark.parametrize("data, eval_flags, refused", [
    ("d.jsonl", ["--eval-data", "d.jsonl"], True),
    ("d.jsonl", ["--eval-data", "./sub/../d.jsonl"], True),
    ("d.jsonl", ["--eval-data", "h.jsonl"], False),
    ("org/set", ["--eval-data", "org/set"], True),  # both default to the train split
    ("org/set", ["--eval-data", "org/set", "--eval-split", "train"], True),
    ("org/set", ["--eval-data", "org/set", "--eval-split", "test"], False),
    ("org/set", ["--eval-data", "org/set", "--eval-config", "other"], False),
])
def test_eval_data_that_is_the_training_data_is_refused(data, eval_flags, refused):
    argv = ["--model", "m", "--data", data, "--output", "out", *eval_flags]
    if refused:
        with pytest.raises(AnitaError, match="eval_data .* is the training data itself"):
            parse(argv)
    else:
        assert parse(argv).eval_data == eval_flags[1]


@pytest.mark.parametrize("old, new", [
    (["--gradient-checkpointing"], ["--checkpointing", "full"]),
    (["--no-gradient-checkpointing"], ["--checkpointing", "off"]),
    ("gradient_checkpointing = true", 'checkpointing = "full"'),
    ("gradient-checkpointing: false", "checkpointing: 'off'"),
])
def test_older_names_are_aliases_of_checkpointing(tmp_path, old, new):
    """The older flags and config key give exactly the config the new ones do (one field, no twin)."""
    def config(given):
        if isinstance(given, list):
            return parse(REQUIRED + given)
        path = tmp_path / ("c.toml" if "=" in given else "c.yaml")
        path.write_text(given + "\n")
        return parse(REQUIRED + ["--config", str(path)])

    assert vars(config(old)) == vars(config(new))
    assert "gradient_checkpointing" not in vars(config(old))
    with pytest.raises(AnitaError, match="'gradient_checkpointing' must be true or false, got 'yes'"):
        config("gradient_checkpointing = \"yes\"")
