"""The paper's Italian evaluation suite: the lm-evaluation-harness tasks, shot counts and metrics
behind LLaMAntino-3-ANITA's published numbers, and one table with a model's scores beside them.

Source: Polignano, Basile, Semeraro, arXiv 2405.07101 (2024), evaluation with lm-evaluation-harness
(docs/recipe.md): arc_it 0-shot acc_norm, hellaswag_it 0-shot acc_norm, m_mmlu_it 5-shot acc; the
task names are lm-eval's own (`lm_eval/tasks/okapi/`). acc_norm divides each choice's
log-likelihood by its length in characters (lm-eval `api/task.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

from anita.errors import AnitaError


@dataclass(frozen=True)
class SuiteTask:
    task: str  # lm-eval task name
    metric: str  # the metric the paper reports
    shots: int  # its few-shot count
    anita: float  # LLaMAntino-3-ANITA-8B-Inst-DPO-ITA, as published
    llama3: float  # Meta-Llama-3-8B-Instruct, as published


SUITES = {
    "anita": (
        SuiteTask("arc_it", "acc_norm", 0, 0.5714, 0.4440),
        SuiteTask("hellaswag_it", "acc_norm", 0, 0.7093, 0.5998),
        SuiteTask("m_mmlu_it", "acc", 5, 0.5672, 0.5590),
    ),
}


def get_suite(name: str) -> tuple[SuiteTask, ...]:
    if name not in SUITES:
        raise AnitaError(f"unknown suite {name!r}; known: {', '.join(SUITES)}")
    return SUITES[name]


def by_shots(suite) -> dict[int, list[str]]:
    """The suite's task names grouped by few-shot count (one harness run per group)."""
    groups: dict[int, list[str]] = {}
    for t in suite:
        groups.setdefault(t.shots, []).append(t.task)
    return groups


def suite_scores(results: dict, suite) -> dict[str, float]:
    """{task: the paper's metric} read from harness results dictionaries' "results" sections
    (metric keys are "<metric>,<filter>"; these tasks use the filter "none")."""
    scores = {}
    for t in suite:
        row = results.get(t.task)
        key = f"{t.metric},none"
        if row is None or key not in row:
            raise AnitaError(f"harness results lack {t.task} {t.metric}")
        scores[t.task] = float(row[key])
    return scores


def suite_table(scores: dict[str, float], suite, model: str) -> str:
    """A markdown table: task, metric, shots, the model's score, ANITA's and Llama 3's, and the averages."""
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    lines = [f"| task | metric | shots | {model} | ANITA (paper) | Llama-3-8B-Instruct (paper) |",
             "|---|---|---:|---:|---:|---:|"]
    for t in suite:
        lines.append(f"| {t.task} | {t.metric} | {t.shots} | {scores[t.task]:.4f} | {t.anita:.4f} | {t.llama3:.4f} |")
    lines.append(f"| average | | | {mean([scores[t.task] for t in suite]):.4f} | {mean([t.anita for t in suite]):.4f} "
                 f"| {mean([t.llama3 for t in suite]):.4f} |")
    return "\n".join(lines)
