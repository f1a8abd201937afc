"""Llama 3 / 3.1 / 3.2 written out: the model, its checkpoints, tokenizer, chat format and generation."""

from anita.model.checkpoint import check_finite, from_pretrained, model_skeleton, save_pretrained
from anita.model.config import LlamaConfig
from anita.model.generate import generate, sample_next, stream_generate
from anita.model.llama import KVCache, Llama
from anita.model.tokenizer import Tokenizer

__all__ = ["Llama", "LlamaConfig", "KVCache", "Tokenizer", "from_pretrained", "save_pretrained", "model_skeleton",
           "check_finite", "generate", "stream_generate", "sample_next"]
