"""`anita eval --tasks` / `--suite`: the harness run from anita's command line, the paper's table,
and the one-line refusals (no lm-eval, unknown task, data not available offline)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from anita.cli import main
from anita.errors import AnitaError
from anita.eval import harness, suite
from anita.eval.suite import SuiteTask, suite_scores, suite_table
from tests.eval.harness_oracle import TASKS_DIR
from tests.eval.tiny import save_tiny

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny-harness-cli"))


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
