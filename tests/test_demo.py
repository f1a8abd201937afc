"""`anita demo --quick` end to end: every stage runs on a tiny model, the report is written, and
a directory the demo did not make is never touched."""

import json
import subprocess
import sys


def run_demo(*args):
    return subprocess.run([sys.executable, "-m", "anita.cli", "demo", "--quick", *args],
                          capture_output=True, text=True, timeout=900)


def test_quick_demo_runs_every_stage_and_writes_the_report(tmp_path):
    out = tmp_path / "demo"
    result = run_demo("--output", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    report = (out / "report.md").read_text()
    for section in ("## Metrics", "## Answers", "## Training curves", "SFT held-out loss",
                    "DPO held-out reward accuracy", "continued pre-training held-out loss"):
        assert section in report, section
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["before"]) == {"mc_acc", "mc_acc_norm", "mc_n", "perplexity"}
    for stage in ("1-sft", "2-dpo", "3-cpt"):
        assert (out / stage / "adapter" / "adapter_model.safetensors").is_file(), stage
        assert (out / stage / "metrics.jsonl").is_file(), stage
    assert (out / "merged" / "model.safetensors").is_file() and (out / "merged" / "tokenizer.json").is_file()
    # DPO really trained: the held-out log-probs moved away from the reference's.
    evals = [json.loads(line) for line in (out / "2-dpo" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if "eval_loss" in r]
    assert evals[0]["eval_rewards/margins"] == 0.0 and evals[-1]["eval_rewards/margins"] != 0.0
    # A re-run replaces a directory the demo made.
    assert run_demo("--output", str(out)).returncode == 0


def test_demo_never_touches_a_directory_it_did_not_make(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    result = run_demo("--output", str(tmp_path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "was not made by `anita demo`" in result.stderr
    assert (tmp_path / "mine.txt").read_text() == "keep me"
