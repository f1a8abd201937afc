"""The Modelfile's TEMPLATE, rendered by a tiny interpreter of the Go text/template constructs it uses
(`{{ range .Messages }}...{{ end }}`, `{{ .Role }}`, `{{ .Content }}`; Ollama's docs/template.md),
equals the checkpoint's own chat template rendered by anita (Jinja) for the same conversation."""

import re

import pytest

from anita.errors import AnitaError
from anita.export import modelfile_text
from anita.model import Tokenizer
from anita.recipes import ANITA_SYSTEM_PROMPT

CHAT = [{"role": "system", "content": "Sei un assistente."}, {"role": "user", "content": "Ciao!"},
        {"role": "assistant", "content": "Ciao, come posso aiutarti?"}, {"role": "user", "content": "Roma?"}]


def render_go(template: str, messages: list[dict]) -> str:
    """Go text/template for exactly: text, {{ range .Messages }} body {{ end }}, {{ .Role }}, {{ .Content }}."""
    def fill(text, m):
        return re.sub(r"\{\{ \.(Role|Content) \}\}", lambda g: m[g.group(1).lower()], text)
    head, rest = template.split("{{ range .Messages }}")
    body, tail = rest.split("{{ end }}")
    assert "{{" not in head + tail, "construct the test's interpreter does not know"
    return head + "".join(fill(body, m) for m in messages) + tail


def parse(modelfile: str) -> dict:
    out = {"stop": []}
    for key, value in re.findall(r'^(FROM|TEMPLATE|SYSTEM|PARAMETER) (.*?)(?=^\w+ |\Z)', modelfile, re.S | re.M):
        value = value.strip()
        if key == "PARAMETER":
            name, v = value.split(" ", 1)
            out["stop"].append(v.strip('"')) if name == "stop" else out.setdefault(name, float(v))
        else:
            out[key] = value.removeprefix('"""').removesuffix('"""')
    return out


@pytest.mark.parametrize("which", ["smollm2", "llama3"])
def test_template_renders_the_chat_templates_text(which, smollm2_tokenizer, llama3_tokenizer_dir):
    tok = smollm2_tokenizer if which == "smollm2" else Tokenizer.from_pretrained(llama3_tokenizer_dir)
    mf = parse(modelfile_text("m.gguf", tok))
    assert mf["FROM"] == "./m.gguf" and (mf["temperature"], mf["top_p"], mf["top_k"]) == (0.6, 0.9, 50)
    assert sorted(tok.token_to_id(s) for s in mf["stop"]) == tok.stop_ids
    want = tok.render_chat(CHAT, add_generation_prompt=True)
    if which == "llama3":
        want = want.removeprefix(tok.bos_token)  # llama.cpp/Ollama add the BOS (add_bos_token)
    assert render_go(mf["TEMPLATE"], CHAT) == want
    if which == "smollm2":  # no system message: the template's default system prompt, via SYSTEM
        alone = [{"role": "user", "content": "Ciao!"}]
        assert render_go(mf["TEMPLATE"], [{"role": "system", "content": mf["SYSTEM"]}] + alone) == \
            tok.render_chat(alone, add_generation_prompt=True)


def test_system_flag_sets_the_recipe_prompt(smollm2_tokenizer):
    assert parse(modelfile_text("m.gguf", smollm2_tokenizer, system=True))["SYSTEM"] == ANITA_SYSTEM_PROMPT


def test_untranslatable_template_is_refused(smollm2_tokenizer):
    tok = Tokenizer(smollm2_tokenizer.backend, {"eos_token": "<|im_end|>"},
                    chat_template="{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")
    with pytest.raises(AnitaError, match="neither Llama 3's nor ChatML"):
        modelfile_text("m.gguf", tok)
