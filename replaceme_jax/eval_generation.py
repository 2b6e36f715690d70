"""Former home of the evaluator's generation helpers, kept so that existing imports work: they live in
``replaceme_jax.evaluation.generation`` (decoding, exact match), ``.tasks`` (bundled task files) and
``.report`` (the continuation table)."""

from replaceme_jax.evaluation.generation import (EXACT_MATCH_NEW_TOKENS, GENERATE_ROWS, Generations, exact_match,
                                                 greedy_continuations, normalize_answer, prompt_ids)
from replaceme_jax.evaluation.report import generation_table, markdown_cell
from replaceme_jax.evaluation.tasks import BUNDLED_DIR, bundled_task_file

__all__ = ["EXACT_MATCH_NEW_TOKENS", "GENERATE_ROWS", "Generations", "exact_match", "greedy_continuations",
           "normalize_answer", "prompt_ids", "generation_table", "markdown_cell", "BUNDLED_DIR", "bundled_task_file"]
