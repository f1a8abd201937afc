"""examples/: each script runs to the end on the real SmolLM2, and the README shows it verbatim."""

import re
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_readme_tour_is_the_example_script():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert (ROOT / "examples" / "tour.py").read_text() in blocks


@pytest.mark.slow
def test_the_tour_runs_on_smollm2(tmp_path, monkeypatch, capsys, smollm2_dir):
    """load in NF4, LoRA, one SFT step, DPO's four log-probs and loss, save, merge, generate."""
    monkeypatch.setattr(sys, "argv", ["tour.py", str(tmp_path)])
    runpy.run_path(str(ROOT / "examples" / "tour.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "LoRA on 210 linears" in out and "SFT step: loss" in out
    dpo = float(re.search(r"DPO loss (\S+)", out).group(1))
    assert 0.0 < dpo < 5.0  # finite, and the SFT step moved the policy off the reference (not exactly ln 2)
    assert abs(dpo - 0.6931) > 1e-4
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert out.strip().splitlines()[-1].strip()  # the merged model answered something
