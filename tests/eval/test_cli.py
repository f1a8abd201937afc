"""`anita eval`: one JSON object on stdout; bad input is one line on stderr and exit code 2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from anita.cli import main
from anita.eval.mc import choice_loglikelihoods, evaluate_mc, read_questions
from anita.lora import LoraConfig, apply_lora, load_for_inference, lora_layers, save_adapter
from anita.model import Tokenizer, from_pretrained
from tests.eval.make_fixtures import SAMPLE
from tests.eval.tiny import save_tiny


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny-cli"))


def run(capsys, *argv):
    code = main(["eval", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_task_prints_the_metrics_as_json(tiny_dir, capsys):
    code, out, err = run(capsys, "--model", str(tiny_dir), "--task", str(SAMPLE), "--num-fewshot", "2",
                         "--batch-size", "2", "--limit", "4", "--seed", "5")
    assert code == 0 and "questions: 100%" in err  # the progress bar, on stderr; stdout is the JSON alone
    assert run(capsys, "--model", str(tiny_dir), "--task", str(SAMPLE), "--limit", "1", "--no-progress")[2] == ""
    result = json.loads(out)
    want = evaluate_mc(from_pretrained(tiny_dir), Tokenizer.from_pretrained(tiny_dir), read_questions(SAMPLE),
                       num_fewshot=2, seed=5, limit=4)
    assert result == pytest.approx(want)
    assert {"acc", "acc_norm", "acc_stderr", "acc_norm_stderr", "n"} <= result.keys() and result["n"] == 4


def test_fewshot_file_and_perplexity(tiny_dir, capsys, tmp_path):
    code, out, _ = run(capsys, "--model", str(tiny_dir), "--task", str(SAMPLE), "--fewshot-file", str(SAMPLE),
                       "--num-fewshot", "1", "--limit", "2")
    assert code == 0 and json.loads(out)["num_fewshot"] == 1
    text = tmp_path / "pagina.txt"
    text.write_text("Roma sa di sole e di sale.")
    code, out, _ = run(capsys, "--model", str(tiny_dir), "--perplexity", str(text), "--window", "8", "--stride", "4")
    assert code == 0 and json.loads(out)["perplexity"] > 1


@pytest.mark.parametrize("argv, message", [
    (["--num-fewshot", "-1"], "--num-fewshot must be at least 0"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--limit", "0"], "--limit must be at least 1"),
    (["--num-fewshot", "9"], "9-shot needs at least 10 examples, the task has 6"),
])
def test_bad_flags(tiny_dir, capsys, argv, message):
    code, out, err = run(capsys, "--model", str(tiny_dir), "--task", str(SAMPLE), *argv)
    assert code == 2 and out == "" and message in err


@pytest.mark.parametrize("kind, argv, message", [
    ("--task", ["--window", "8"], "--window: only for --perplexity"),
    ("--task", ["--window", "8", "--stride", "4"], "--window, --stride: only for --perplexity"),
    ("--perplexity", ["--add-bos"], "--add-bos: only for --task"),
    ("--perplexity", ["--num-fewshot", "1", "--limit", "2"], "--num-fewshot, --limit: only for --task"),
    ("--perplexity", ["--batch-size", "8", "--seed", "1234"], "--batch-size, --seed: only for --task"),
    ("--task", ["--fewshot-file", str(SAMPLE)], "--fewshot-file: examples are drawn from it only with --num-fewshot"),
])
def test_flags_the_evaluation_would_ignore_are_refused(tiny_dir, capsys, tmp_path, kind, argv, message):
    """A flag that the chosen evaluation would not read is an error naming it, before any loading."""
    data = SAMPLE if kind == "--task" else tmp_path / "pagina.txt"
    (tmp_path / "pagina.txt").write_text("Roma sa di sole e di sale.")
    code, out, err = run(capsys, "--model", str(tiny_dir), kind, str(data), *argv)
    assert code == 2 and out == "" and message in err and "Traceback" not in err


def test_bad_row_exits_2_naming_the_line_without_traceback(tmp_path):
    """Run as a real process: the message names file:line, and nothing reaches stdout."""
    task = tmp_path / "task.jsonl"
    good, bad = '{"context": "x", "choices": [" a", " b"], "gold": 0}', '{"context": "x", "choices": [" a"], "gold": 0}'
    task.write_text(f"{good}\n{bad}\n")
    proc = subprocess.run([sys.executable, "-m", "anita.cli", "eval", "--model", str(tmp_path / "unused"),
                           "--task", str(task)], capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert proc.returncode == 2 and proc.stdout == ""
    assert f"{task}:2: " in proc.stderr and "Traceback" not in proc.stderr


def test_missing_task_file(tiny_dir, capsys, tmp_path):
    code, _, err = run(capsys, "--model", str(tiny_dir), "--task", str(tmp_path / "none.jsonl"))
    assert code == 2 and "none.jsonl: no such task file" in err


def test_adapter_is_applied(tiny_dir, capsys, tmp_path):
    """A LoRA adapter with B ≠ 0 changes the scores; --adapter gives the in-memory adapted model's."""
    model = from_pretrained(tiny_dir)
    apply_lora(model, LoraConfig(r=4, alpha=8.0))
    torch.manual_seed(0)
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.5)
    save_adapter(model, tmp_path / "adapter")
    tok, questions = Tokenizer.from_pretrained(tiny_dir), read_questions(SAMPLE)[:2]
    code, out, _ = run(capsys, "--model", str(tiny_dir), "--adapter", str(tmp_path / "adapter"), "--task", str(SAMPLE),
                       "--limit", "2")
    assert code == 0
    contexts = [q.context for q in questions]
    adapted = choice_loglikelihoods(model.eval(), tok, questions, contexts)
    base = choice_loglikelihoods(from_pretrained(tiny_dir), tok, questions, contexts)
    loaded, _ = load_for_inference(tiny_dir, tmp_path / "adapter")  # what `anita eval --adapter` scores with
    assert abs(adapted[0][0] - base[0][0]) > 1e-3
    for a, b in zip(choice_loglikelihoods(loaded, tok, questions, contexts), adapted):
        assert a == pytest.approx(b, abs=1e-5)
    assert json.loads(out) == pytest.approx(evaluate_mc(model, tok, questions))
