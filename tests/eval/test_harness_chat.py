"""`AnitaLM` with lm-eval's chat settings (--apply_chat_template, --fewshot_as_multiturn,
--system_instruction) and batch_size=auto, against lm-eval's own `hf` model on the same checkpoint.

Cases (harness_oracle.CHAT_CASES): a tiny model over the real Llama 3 tokenizer with Meta's template
(multi-turn few-shot with a system message; single-turn few-shot), the tiny tokenizer with a
ChatML-like template that writes no BOS, and a system instruction without a chat template. The
tasks are multiple choice (the choices follow the assistant header: the harness drops the target
delimiter) and generate_until, plus a loglikelihood task. The `hf` side is saved in
fixtures/harness_chat_hf.json with every chat it rendered; the saved checks need neither lm-eval
nor transformers: anita renders the same chats to the same strings (also with the Llama 3 format
it writes out itself when the checkpoint ships no template) and answers the saved requests with
the saved answers. Live: anita through `lm_eval.simple_evaluate` builds the same requests and gets
the same numbers, with batch sizes fixed, auto and auto:N.
"""

import json
import shutil

import pytest

from anita.eval.harness import HarnessRequests
from anita.lora import load_for_inference
from anita.model import Tokenizer
from tests.eval.harness_oracle import (
    CHAT_CASES,
    CHAT_FIXTURE,
    checkpoint_dir,
    recorded_chats,
    run,
)
from tests.eval.test_harness import (
    anita_responses,
    assert_same_metrics,
    assert_same_responses,
)
from tests.eval.tiny import TINY_CHAT_TEMPLATE, save_tiny

# Live anita runs take these batch sizes in turn: the numbers may not depend on them.
BATCH_SIZES = dict(zip(CHAT_CASES, ["auto", "auto:2", 1, "auto:3"]))


@pytest.fixture(scope="module")
def saved():
    return json.loads(CHAT_FIXTURE.read_text())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Factory: the saved directory of a case's checkpoint (made once each)."""
    made = {}

    def get(name):
        if name not in made:
            made[name] = checkpoint_dir(name, tmp_path_factory.mktemp(f"chat-{name}"))
        return made[name]

    return get


def renderer(model_dir) -> HarnessRequests:
    model, tokenizer = load_for_inference(model_dir)
    return HarnessRequests(model, tokenizer, stop_ids=[])


@pytest.mark.parametrize("name", list(CHAT_CASES))
def test_chats_render_as_hf_renders_them(name, saved, checkpoints):
    """Every chat the harness gave the `hf` model (few-shot turns, system message, generation
    prompt) is rendered by anita to the very string transformers rendered."""
    chats = saved[name]["chats"]
    assert bool(chats) == bool(CHAT_CASES[name]["chat"].get("apply_chat_template"))
    requests = renderer(checkpoints(CHAT_CASES[name]["checkpoint"]))
    for chat, add_generation_prompt, want in chats:
        assert requests.apply_chat_template(chat, add_generation_prompt) == want


def test_llama3_format_written_out_renders_as_metas_template(saved, checkpoints, tmp_path):
    """A Llama 3 checkpoint that ships no template: anita's own Llama 3 format gives the strings
    transformers rendered with Meta's template."""
    model_dir = shutil.copytree(checkpoints("llama3"), tmp_path / "no-template")
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer.from_pretrained(model_dir).chat_format == "llama3"
    requests = renderer(model_dir)
    chats = saved["llama3-multiturn"]["chats"] + saved["llama3-singleturn"]["chats"]
    for chat, add_generation_prompt, want in chats:
        assert requests.apply_chat_template(chat, add_generation_prompt) == want


def test_a_template_that_refuses_the_system_role_gets_the_chat_without_it(tmp_path, capsys):
    """HFLM's fallback: a template raising on a system message (as Gemma's does) renders the chat
    without it, with a warning on stderr; transformers renders that shorter chat the same way."""
    refusing = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                "{% endif %}" + TINY_CHAT_TEMPLATE)
    requests = renderer(save_tiny(tmp_path, refusing))
    chat = [{"role": "system", "content": "Sii breve."}, {"role": "user", "content": "Chi?"}]
    got = requests.apply_chat_template(chat)
    assert got == "<|user|>\nChi?\n<|assistant|>\n" == requests.apply_chat_template(chat[1:])
    assert "System role not supported; the chat is rendered without its system message" in capsys.readouterr().err
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf.apply_chat_template(chat[1:], tokenize=False, add_generation_prompt=True) == got


@pytest.mark.parametrize("name", list(CHAT_CASES))
def test_answers_match_saved_hf_answers(name, saved, checkpoints):
    """The chat-formatted requests the harness made (saved), answered by anita: the `hf` answers."""
    case = CHAT_CASES[name]
    got = anita_responses(checkpoints(case["checkpoint"]), None, case, saved[name]["arguments"])
    assert_same_responses(got, saved[name]["responses"])


@pytest.mark.parametrize("name", list(CHAT_CASES))
def test_live_anita_equals_saved_hf(name, saved, checkpoints):
    """AnitaLM through simple_evaluate with the case's chat settings: the harness builds the same
    requests for it as for `hf` (so the chat prompts are the same), and every answer and metric
    agrees, whatever the batch size (auto included)."""
    pytest.importorskip("lm_eval")
    case = CHAT_CASES[name]
    anita = run("anita", checkpoints(case["checkpoint"]), case, batch_size=BATCH_SIZES[name])
    assert anita["arguments"] == saved[name]["arguments"]
    assert_same_responses(anita["responses"], saved[name]["responses"])
    assert_same_metrics(anita["metrics"], saved[name]["metrics"])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CHAT_CASES))
def test_live_hf_matches_saved(name, saved, checkpoints):
    """The saved `hf` runs are what lm-eval and transformers give now (the fixture is current)."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("transformers")
    case, chats = CHAT_CASES[name], []
    with recorded_chats(chats):
        hf = run("hf", checkpoints(case["checkpoint"]), case)
    assert hf["arguments"] == saved[name]["arguments"] and chats == saved[name]["chats"]
    assert_same_responses(hf["responses"], saved[name]["responses"])
    assert_same_metrics(hf["metrics"], saved[name]["metrics"])
