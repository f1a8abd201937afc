"""Evaluation: multiple-choice scoring as lm-evaluation-harness does it, and perplexity."""

from anita.eval.mc import Question, evaluate_mc, fewshot_contexts, read_questions
from anita.eval.perplexity import evaluate_perplexity, read_texts

__all__ = ["Question", "read_questions", "fewshot_contexts", "evaluate_mc", "evaluate_perplexity", "read_texts"]
