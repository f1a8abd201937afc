"""LoRA (with rsLoRA and DoRA) over plain and 4-bit linears: apply, disable, merge, and PEFT-format files.

`layer.py` holds the layer and its config, `model.py` what is done to a whole model, `peft_format.py`
the adapter files, `pretrained.py` a base checkpoint with an adapter (load for inference, merge to a
directory), `cli.py` the `anita merge` command. See docs/lora.md.
"""

from anita.lora.layer import LoraConfig, LoraLinear
from anita.lora.model import (LoraReport, apply_lora, disable_lora, load_lora_state_dict, lora_layers, lora_parameters,
                              lora_state_dict, merge_lora)
from anita.lora.peft_format import load_adapter, load_adapter_weights, save_adapter
from anita.lora.pretrained import load_for_inference, merge_to_directory

__all__ = ["LoraConfig", "LoraLinear", "LoraReport", "apply_lora", "disable_lora", "merge_lora",
           "save_adapter", "load_adapter", "lora_parameters", "lora_state_dict", "load_lora_state_dict",
           "lora_layers", "load_adapter_weights", "load_for_inference", "merge_to_directory"]
