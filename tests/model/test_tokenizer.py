"""Tokenizer and chat formats on the two real tokenizers (Llama 3 and SmolLM2)."""

import pytest

from anita.errors import AnitaError
from anita.model import Tokenizer

# Llama 3's documented special and common token ids (Meta's model card / tokenizer.json).
BOT, SH, EH, EOT, USER, ASSISTANT, SYSTEM, NL2 = 128000, 128006, 128007, 128009, 882, 78191, 9125, 271
# Meta-Llama-3-8B-Instruct's own chat template, to check the native format against.
LLAMA3_TEMPLATE = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
                   "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
                   "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
                   "{{ content }}{% endfor %}{% if add_generation_prompt %}"
                   "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


@pytest.fixture(scope="module")
def llama3(llama3_tokenizer_dir):
    return Tokenizer.from_pretrained(llama3_tokenizer_dir)


def test_llama3_chat_ids_are_the_documented_ones(llama3):
    hello = llama3.encode("Hello", add_special_tokens=False)
    hi = llama3.encode("Hi there!", add_special_tokens=False)
    be = llama3.encode("Be brief.", add_special_tokens=False)
    assert hello == [9906]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": "Hi there!"}]
    assert llama3.chat_format == "llama3"
    assert llama3.apply_chat_template(messages) == (
        [BOT, SH, SYSTEM, EH, NL2] + be + [EOT] + [SH, USER, EH, NL2] + hello + [EOT]
        + [SH, ASSISTANT, EH, NL2] + hi + [EOT])
    assert llama3.apply_chat_template(messages[1:2], add_generation_prompt=True) == (
        [BOT, SH, USER, EH, NL2] + hello + [EOT, SH, ASSISTANT, EH, NL2])


def test_llama3_native_format_equals_metas_template(llama3_tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(llama3_tokenizer_dir)
    hf.chat_template = LLAMA3_TEMPLATE
    ours = Tokenizer.from_pretrained(llama3_tokenizer_dir)
    messages = [{"role": "system", "content": "Sei un assistente.  "}, {"role": "user", "content": "Ciao, come stai?\n"},
                {"role": "assistant", "content": "Bene, grazie! 123 456"}, {"role": "user", "content": "E tu?"}]
    for gen in (False, True):
        want = hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True, return_dict=False)
        assert ours.apply_chat_template(messages, add_generation_prompt=gen) == want


def test_encode_decode_and_special_ids(llama3):
    text = "L'Italia è bella: 12345 città, ümlaut, 日本語."
    ids = llama3.encode(text)
    assert ids[0] == BOT  # the checkpoint's post-processor adds <|begin_of_text|>
    assert llama3.decode(ids[1:]) == text
    assert llama3.stop_ids == [128001, 128008, 128009]  # end_of_text, eom, eot
    assert llama3.bos_id == BOT


def test_llama3_encode_equals_transformers(llama3_tokenizer_dir, llama3):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(llama3_tokenizer_dir)
    for text in ["Hello world", "  leading spaces\n\n\ttabs", "Perché? Così!", "<|eot_id|> inside text"]:
        assert llama3.encode(text) == hf.encode(text)


def test_assistant_mask_covers_answers_and_their_end_marker(llama3):
    messages = [{"role": "user", "content": "Quanto fa 2+2?"}, {"role": "assistant", "content": "Fa 4."},
                {"role": "user", "content": "E 3+3?"}, {"role": "assistant", "content": "Fa 6."}]
    ids, mask = llama3.apply_chat_template(messages, return_assistant_mask=True)
    assert len(ids) == len(mask)
    trained = [i for i, m in zip(ids, mask) if m]
    fa4, fa6 = llama3.encode("Fa 4.", add_special_tokens=False), llama3.encode("Fa 6.", add_special_tokens=False)
    assert trained == fa4 + [EOT] + fa6 + [EOT]


def test_smollm2_uses_its_shipped_template(smollm2_tokenizer, smollm2_dir):
    assert smollm2_tokenizer.chat_format == "template"
    messages = [{"role": "user", "content": "Ciao!"}]
    text = smollm2_tokenizer.render_chat(messages, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                    "<|im_start|>user\nCiao!<|im_end|>\n<|im_start|>assistant\n")
    ids, mask = smollm2_tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": "Salve."}],
                                                      return_assistant_mask=True)
    assert smollm2_tokenizer.decode([i for i, m in zip(ids, mask) if m]) == "Salve.<|im_end|>\n"
    assert smollm2_tokenizer.token_to_id("<|im_end|>") in smollm2_tokenizer.stop_ids


def test_smollm2_template_equals_transformers(smollm2_dir, smollm2_tokenizer):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    messages = [{"role": "system", "content": "Rispondi in italiano."}, {"role": "user", "content": "Chi era Dante?"}]
    want = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert smollm2_tokenizer.apply_chat_template(messages, add_generation_prompt=True) == want


@pytest.mark.parametrize("messages", [[], [{"role": "user"}], [{"role": "user", "content": 3}], "hello"])
def test_bad_messages_are_rejected(llama3, messages):
    with pytest.raises(AnitaError, match="chat"):
        llama3.apply_chat_template(messages)


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(AnitaError, match="no tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)


# The last message continued (transformers' continue_final_message; lm-eval asks for it when a task
# has a gen_prefix): a template that keeps the content's whitespace (SmolLM2's ChatML) is cut right
# after the content, one that trims it (Llama 3's) right after the stripped content.
CONTINUED = [[{"role": "user", "content": "Chi era Dante?"}, {"role": "assistant", "content": "Risposta:"}],
             [{"role": "system", "content": "Sii breve."}, {"role": "user", "content": "Chi?"},
              {"role": "assistant", "content": "La risposta è "}]]


@pytest.mark.parametrize("messages", CONTINUED)
@pytest.mark.parametrize("which", ["llama3-template", "llama3-native", "smollm2"])
def test_continue_final_message_equals_transformers(which, messages, llama3_tokenizer_dir, smollm2_dir):
    transformers = pytest.importorskip("transformers")
    path = smollm2_dir if which == "smollm2" else llama3_tokenizer_dir
    hf = transformers.AutoTokenizer.from_pretrained(path)
    if which.startswith("llama3"):
        hf.chat_template = LLAMA3_TEMPLATE
    ours = Tokenizer.from_pretrained(path)
    if which == "llama3-template":
        ours = Tokenizer(ours.backend, {"bos_token": ours.bos_token, "eos_token": ours.eos_token}, LLAMA3_TEMPLATE)
    want = hf.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    assert ours.render_chat(messages, continue_final_message=True) == want
    assert not want.endswith(("<|eot_id|>", "<|im_end|>\n"))
    with pytest.raises(AnitaError, match="exclude each other"):
        ours.render_chat(messages, add_generation_prompt=True, continue_final_message=True)
