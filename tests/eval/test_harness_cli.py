"""`anita eval --tasks` / `--suite`: the harness run from anita's command line, the paper's table,
lm-eval's chat flags and results files (the same files lm-eval's own command line writes), and the
one-line refusals (no lm-eval, unknown task, data not available offline, flags lm-eval refuses or
anita cannot honour)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from anita.cli import main
from anita.errors import AnitaError
from anita.eval import harness, suite
from anita.eval.suite import SuiteTask, suite_scores, suite_table
from tests.eval.harness_oracle import SYSTEM, TASKS_DIR
from tests.eval.tiny import TINY_CHAT_TEMPLATE, save_tiny

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny-harness-cli"))


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny-chat-cli"), TINY_CHAT_TEMPLATE)


def run(capsys, *argv):
    code = main(["eval", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_without_lm_eval_one_line_says_what_to_install(tiny_dir, capsys, monkeypatch):
    monkeypatch.setattr(harness, "register_model", None)  # as when `import lm_eval` failed
    with pytest.raises(AnitaError, match=r'pip install "anita\[eval\]"'):
        harness.AnitaLM(pretrained=str(tiny_dir))
    code, out, err = run(capsys, "--model", str(tiny_dir), "--tasks", "arc_it")
    assert code == 2 and out == "" and err.count("\n") == 1 and 'pip install "anita[eval]"' in err


def test_paper_table():
    """The table puts the model's scores beside the published ones, averages included."""
    results = {"arc_it": {"acc,none": 0.3, "acc_norm,none": 0.5}, "hellaswag_it": {"acc_norm,none": 0.6},
               "m_mmlu_it": {"acc,none": 0.7}}
    scores = suite_scores(results, suite.SUITES["anita"])
    assert scores == {"arc_it": 0.5, "hellaswag_it": 0.6, "m_mmlu_it": 0.7}
    assert suite_table(scores, suite.SUITES["anita"], "mio").splitlines() == [
        "| task | metric | shots | mio | ANITA (paper) | Llama-3-8B-Instruct (paper) |",
        "|---|---|---:|---:|---:|---:|",
        "| arc_it | acc_norm | 0 | 0.5000 | 0.5714 | 0.4440 |",
        "| hellaswag_it | acc_norm | 0 | 0.6000 | 0.7093 | 0.5998 |",
        "| m_mmlu_it | acc | 5 | 0.7000 | 0.5672 | 0.5590 |",
        "| average | | | 0.6000 | 0.6160 | 0.5343 |"]
    with pytest.raises(AnitaError, match="lack m_mmlu_it acc"):
        suite_scores({k: v for k, v in results.items() if k != "m_mmlu_it"}, suite.SUITES["anita"])


def test_tasks_prints_the_harness_table_and_writes_results(tiny_dir, capsys, tmp_path):
    pytest.importorskip("lm_eval")
    output = tmp_path / "results.json"
    code, out, err = run(capsys, "--model", str(tiny_dir), "--tasks", "anita_mc_it,anita_cloze_it", "--include-path",
                         str(TASKS_DIR), "--limit", "2", "--output", str(output))
    assert code == 0, err
    assert "anita_mc_it" in out and "acc_norm" in out and "acc_bytes" in out
    results = json.loads(output.read_text())["results"]
    assert results["anita_mc_it"]["sample_len"] == 2 and "acc,none" in results["anita_cloze_it"]
    code, _, err = run(capsys, "--model", str(tiny_dir), "--tasks", "anita_mc_it", "--include-path", str(TASKS_DIR),
                       "--output", str(output))
    assert code == 2 and "exists" in err  # nothing is overwritten


def test_suite_runs_each_shot_count_and_prints_the_paper_table(tiny_dir, capsys, monkeypatch):
    """A suite of local tasks in place of the paper's (which need the Hub): one harness run per
    shot count, the paper's metric per task, one table."""
    pytest.importorskip("lm_eval")
    local = (SuiteTask("anita_mc_it", "acc_norm", 0, 0.5, 0.4), SuiteTask("anita_cloze_it", "acc", 1, 0.6, 0.5))
    monkeypatch.setitem(suite.SUITES, "local", local)
    code, out, err = run(capsys, "--model", str(tiny_dir), "--suite", "local", "--include-path", str(TASKS_DIR),
                         "--limit", "2")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].startswith("| task | metric | shots |") and len(lines) == 5
    assert lines[2].startswith("| anita_mc_it | acc_norm | 0 |") and lines[3].startswith("| anita_cloze_it | acc | 1 |")


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "anita_nessuno", "--include-path", str(TASKS_DIR)], "unknown lm-eval task(s) anita_nessuno"),
    (["--tasks", "anita_mc_it", "--window", "8"], "--window: not for --tasks/--suite"),
    (["--suite", "anita", "--num-fewshot", "5"], "--num-fewshot: not for --tasks/--suite"),
    (["--suite", "nessuna"], "unknown suite 'nessuna'"),
    (["--tasks", "anita_mc_it", "--include-path", "/nessuna/cartella"], "no such task directory"),
    (["--tasks", "anita_mc_it", "--batch-size", "foo"], "--batch-size must be a whole number >= 1, auto or auto:N"),
    (["--tasks", "anita_mc_it", "--batch_size", "auto:x"], "--batch-size must be a whole number >= 1, auto or auto:N"),
    (["--tasks", "anita_mc_it", "--max_batch_size", "8"], "--max-batch-size: only with --batch-size auto"),
    (["--task", "q.jsonl", "--batch-size", "auto"], "--batch-size auto: only for --tasks and --suite"),
    (["--tasks", "anita_mc_it", "--fewshot_as_multiturn"], "--fewshot_as_multiturn needs --apply_chat_template"),
    (["--tasks", "anita_mc_it", "--apply_chat_template", "--fewshot_as_multiturn", "forse"],
     "--fewshot_as_multiturn 'forse': expected true or false"),
    (["--tasks", "anita_mc_it", "--apply_chat_template", "tool_use"], "named templates are not supported"),
    (["--tasks", "anita_mc_it", "--system_instruction", " "], "--system_instruction is empty"),
    (["--tasks", "anita_mc_it", "--log_samples"], "--log_samples needs --output_path"),
    (["--suite", "anita", "--apply_chat_template"], "--apply_chat_template: only for --tasks (--suite runs"),
    (["--perplexity", "t.txt", "--system_instruction", "x"], "--system_instruction: only for --tasks"),
    (["--tasks", "anita_mc_it", "--include-path", str(TASKS_DIR), "--apply_chat_template"],
     "ships no chat template and is not a Llama 3 vocabulary"),
])
def test_bad_flags(tiny_dir, capsys, argv, message):
    pytest.importorskip("lm_eval")
    code, out, err = run(capsys, "--model", str(tiny_dir), *argv)
    assert code == 2 and out == "" and message in err and err.count("\n") == 1


def test_paper_suite_offline_is_refused_in_one_line_before_the_model_loads(tmp_path):
    """arc_it's data come from the Hub; offline (HF_DATASETS_OFFLINE, HF_HUB_OFFLINE) and not cached,
    the suite stops with one line naming the task, before reading the model (which is not there)."""
    pytest.importorskip("lm_eval")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "ds"),
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "anita.cli", "eval", "--model", str(tmp_path / "nessun-modello"),
                           "--suite", "anita"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("anita: error: task arc_it: lm-eval cannot load its data") and "OFFLINE" in last


def lm_eval_files(root: Path) -> dict[str, Path]:
    """The files under `root`, by path with the time stamp lm-eval puts in their names taken out."""
    return {re.sub(r"_\d{4}-\d\d-\d\dT\d\d-\d\d-\d\d(\.\d+)?", "_TIME", str(f.relative_to(root))): f
            for f in root.rglob("*") if f.is_file()}


def test_output_path_is_what_lm_evals_command_line_writes(chat_dir, capsys, tmp_path):
    """`anita eval --tasks ... --apply_chat_template --system_instruction ... --log_samples
    --output_path DIR` and lm-eval's own command line (`python -m anita.eval run --model anita`,
    lm-eval's `run` with anita registered) on the same settings write the same files: the results
    JSON (same results, chat template, system instruction, few-shot setting) and one samples JSONL
    per task (same prompts and answers), in lm-eval's layout DIR/<model>/..._<time>.json(l)."""
    pytest.importorskip("lm_eval")
    settings = ["--tasks", "anita_mc_it,anita_gen_it", "--include_path", str(TASKS_DIR), "--limit", "2",
                "--num_fewshot", "1", "--apply_chat_template", "--system_instruction", SYSTEM, "--log_samples",
                "--batch_size", "auto:2"]
    code, out, err = run(capsys, "--model", str(chat_dir), *settings, "--output_path", str(tmp_path / "anita"))
    assert code == 0, err
    assert "anita_mc_it" in out and "exact_match" in out
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "anita.eval", "run", "--model", "anita", "--model_args",
                           f"pretrained={chat_dir}", "--device", "cpu", *settings, "--output_path",
                           str(tmp_path / "lm_eval")],
                          capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ours, theirs = lm_eval_files(tmp_path / "anita"), lm_eval_files(tmp_path / "lm_eval")
    model = str(chat_dir).replace("/", "__")
    assert sorted(ours) == sorted(theirs) == sorted(f"{model}/{name}_TIME.json{ext}" for name, ext in [
        ("results", ""), ("samples_anita_mc_it", "l"), ("samples_anita_gen_it", "l")])
    for name in ours:
        if name.endswith(".jsonl"):
            rows = [[json.loads(line) for line in files[name].read_text().splitlines()] for files in (ours, theirs)]
            keys = ("doc_id", "arguments", "resps", "filtered_resps", "prompt_hash")
            assert [[r[k] for k in keys] for r in rows[0]] == [[r[k] for k in keys] for r in rows[1]]
            assert rows[0][0]["arguments"]["gen_args_0"]["arg_0"].startswith(f"<|system|>\n{SYSTEM}\n<|user|>")
        else:
            got, want = (json.loads(files[name].read_text()) for files in (ours, theirs))
            assert got.keys() == want.keys() and got["results"] == want["results"]
            for key in ("chat_template", "chat_template_sha", "system_instruction", "fewshot_as_multiturn",
                        "task_hashes", "n-shot", "versions"):
                assert got[key] == want[key], key
            for task in got["configs"]:  # lm-eval's command line also copies its model_args into the metadata
                assert ({k: v for k, v in got["configs"][task].items() if k != "metadata"}
                        == {k: v for k, v in want["configs"][task].items() if k != "metadata"})
            for key in ("batch_size", "batch_sizes", "limit", "pretrained", "max_length"):
                assert got["config"][key] == want["config"][key], key
            assert got["chat_template"] == TINY_CHAT_TEMPLATE and got["fewshot_as_multiturn"] is True
            assert got["system_instruction"] == SYSTEM and got["config"]["batch_sizes"]


def test_output_path_that_is_a_file_is_refused(tiny_dir, capsys, tmp_path):
    pytest.importorskip("lm_eval")
    taken = tmp_path / "risultati"
    taken.write_text("mine")
    code, out, err = run(capsys, "--model", str(tiny_dir), "--tasks", "anita_mc_it", "--output_path", str(taken))
    assert code == 2 and out == "" and "exists and is not a folder" in err and err.count("\n") == 1
    assert taken.read_text() == "mine"


def test_lm_evals_command_line_with_anita_refuses_in_one_line(chat_dir):
    """`python -m anita.eval run --model anita`: what AnitaLM refuses ends it with one line, exit 2."""
    pytest.importorskip("lm_eval")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "anita.eval", "run", "--model", "anita", "--model_args",
                           f"pretrained={chat_dir}", "--device", "cpu", "--tasks", "anita_mc_it", "--include_path",
                           str(TASKS_DIR), "--batch_size", "auto:x"],
                          capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("anita: error: AnitaLM: batch_size must be a whole number")
