"""anita: the LLaMAntino-3-ANITA recipe (Llama 3 + NF4 + LoRA + SFT + DPO) as a readable library."""

__version__ = "0.1.0"
