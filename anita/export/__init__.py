"""Export for the programs people run models in: a llama.cpp GGUF file and an Ollama Modelfile."""

from anita.export.gguf import GGUF_TYPES, export_gguf, permute_qk
from anita.export.ollama import modelfile_text

__all__ = ["export_gguf", "permute_qk", "GGUF_TYPES", "modelfile_text"]
