"""anita/model/config.py: every number of a config.json is checked as it is read, and the error
names the file and the field. Python's json reads `NaN` and `Infinity`, and before issue 18 a
`"rms_norm_eps": NaN` or `"rope_theta": Infinity` loaded into a model whose every output was NaN."""

import json

import pytest

from anita.errors import AnitaError
from anita.model import LlamaConfig, from_pretrained

NAN, INF = float("nan"), float("inf")
SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 64}


@pytest.mark.parametrize("fields, message", [
    (dict(rms_norm_eps=NAN), "rms_norm_eps must be a finite number >= 0, got nan"),
    (dict(rms_norm_eps=-1e-5), "rms_norm_eps must be a finite number >= 0"),
    (dict(rope_theta=INF), "rope_theta must be a finite number > 0, got inf"),
    (dict(rope_theta=0), "rope_theta must be a finite number > 0, got 0"),
    (dict(hidden_size=0), "hidden_size must be an integer >= 1, got 0"),
    (dict(num_hidden_layers=2.0), "num_hidden_layers must be an integer >= 1, got 2.0"),
    (dict(vocab_size="256"), "vocab_size must be an integer >= 1, got '256'"),
    (dict(max_position_embeddings=-1), "max_position_embeddings must be an integer >= 1"),
    (dict(num_key_value_heads=0), "num_key_value_heads must be an integer >= 1"),
    (dict(head_dim=15), "head_dim must be even"),
    (dict(eos_token_id=[2, NAN]), "eos_token_id must be an integer, got nan"),
    (dict(tie_word_embeddings="yes"), "tie_word_embeddings must be true or false"),
    (dict(rope_scaling="llama3"), "rope_scaling must be an object or null"),
    (dict(rope_scaling=SCALING | {"factor": NAN}), "rope_scaling.factor must be a finite number > 0, got nan"),
    (dict(rope_scaling={k: v for k, v in SCALING.items() if k != "factor"}), "type 'llama3' needs 'factor'"),
    (dict(rope_scaling=SCALING | {"high_freq_factor": 1.0}), "low_freq_factor (1.0) must be below high_freq_factor"),
    (dict(rope_parameters=[1]), "rope_parameters must be an object"),
])
def test_bad_numbers_in_config_json_name_the_file_and_field(tiny_checkpoint, tmp_path, fields, message):
    path = tmp_path / "config.json"
    raw = json.loads((tiny_checkpoint("llama3") / "config.json").read_text())
    path.write_text(json.dumps(raw | fields))  # NaN and Infinity are written as Python's json writes them
    with pytest.raises(AnitaError) as error:
        LlamaConfig.from_json(path)
    assert str(error.value).startswith(f"{path}: ") and message in str(error.value), error.value


def test_a_config_json_that_is_not_an_object_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(AnitaError, match="expected a JSON object of model settings, got a list"):
        from_pretrained(tmp_path)


def test_the_presets_and_a_real_config_pass(smollm2_dir):
    for name in ("llama-3-8b", "llama-3.1-8b", "llama-3.2-1b", "llama-3.2-3b", "tiny"):
        LlamaConfig.preset(name)
    assert LlamaConfig.from_json(smollm2_dir / "config.json").rms_norm_eps > 0
