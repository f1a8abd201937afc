"""An Ollama Modelfile for an exported GGUF: FROM, a Go-template TEMPLATE, stop tokens, the recipe's
sampling defaults and, on request, the recipe's system prompt.

Ollama renders `TEMPLATE` with Go's text/template (github.com/ollama/ollama docs/template.md):
`.Messages` lists the conversation, each with `.Role` and `.Content` (system messages included,
the Modelfile's SYSTEM among them when the user gives none). The template here only loops over
the messages and ends with the assistant's header, i.e. the generation prompt. Ollama adds the BOS
token itself (the GGUF's add_bos), so the template leaves it out. Two chat formats are known, found
by rendering probe conversations with the checkpoint's own template: Llama 3's headers and ChatML.
Llama 3's template strips each message's content; Go templates have no strip, so Ollama passes
content as given.
"""

from __future__ import annotations

from pathlib import Path

from anita.errors import AnitaError
from anita.model import Tokenizer
from anita.model.tokenizer import render_llama3
from anita.recipes import ANITA_SYSTEM_PROMPT

# The recipe's sampling (docs/recipe.md: temperature 0.6, top-p 0.9, and top-k 50 in the authors' Ollama file).
SAMPLING = {"temperature": 0.6, "top_p": 0.9, "top_k": 50}
GO_TEMPLATES = {
    "llama3": ("{{ range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
               "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"),
    "chatml": "{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n",
}
PROBES = [[{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
          [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"},
           {"role": "user", "content": "V"}]]


def render_chatml(messages: list[dict]) -> str:
    """ChatML with the generation prompt, as `GO_TEMPLATES["chatml"]` writes it."""
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + "<|im_start|>assistant\n"


def chat_format(tok: Tokenizer) -> tuple[str, str | None]:
    """("llama3" | "chatml", the system prompt the template adds when a chat has none)."""
    bos = tok.bos_token or ""
    render = lambda m: tok.render_chat(m, add_generation_prompt=True)  # noqa: E731
    if tok.chat_format is not None:
        if all(render(p) == render_llama3(p, True, bos) for p in PROBES):
            return "llama3", None
        if all(render(p) == render_chatml(p) for p in PROBES):
            text, bare = render([{"role": "user", "content": "U"}]), render_chatml([{"role": "user", "content": "U"}])
            if text == bare:
                return "chatml", None
            head = "<|im_start|>system\n"
            if text.startswith(head) and text.endswith(bare) and text[:-len(bare)].endswith("<|im_end|>\n"):
                return "chatml", text[len(head):-len(bare) - len("<|im_end|>\n")]
    raise AnitaError(f"{tok.source}: the chat template is neither Llama 3's nor ChatML; "
                     "cannot translate it into an Ollama TEMPLATE")


def modelfile_text(gguf_file, tok: Tokenizer, system: bool = False) -> str:
    """The Modelfile; `system=True` sets the recipe's system prompt (else the template's default, if any)."""
    fmt, default_system = chat_format(tok)
    lines = [f"FROM ./{Path(gguf_file).name}", f'TEMPLATE """{GO_TEMPLATES[fmt]}"""']
    lines += [f'PARAMETER stop "{tok.decode([i])}"' for i in tok.stop_ids]
    lines += [f"PARAMETER {k} {v}" for k, v in SAMPLING.items()]
    prompt = ANITA_SYSTEM_PROMPT if system else default_system
    if prompt:
        lines.append(f'SYSTEM """{prompt}"""')
    return "\n".join(lines) + "\n"
