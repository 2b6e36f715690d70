"""Perplexity, zero-shot multiple choice and greedy generation of saved or in-memory models, following
lm-evaluation-harness conventions (the ``evaluate`` command; ``replaceme_jax.evaluate`` is the API
function).

One module a job; this package re-exports their public names, so ``from replaceme_jax.evaluation
import X`` works for all of them:

- ``scoring``: token-level log-likelihoods with the LM head streamed over vocabulary chunks
  (``score_requests``, ``loglikelihoods``, ``target_logprobs``), and the comparison with a reference
  model on the same tokens (``Reference``, ``reference_divergence``).
- ``metrics``: task metrics on those scores (``perplexity``, ``multiple_choice``, ``lambada``,
  ``generation_exact_match``) and their conventions.
- ``generation``: greedy continuations and exact match.
- ``tasks``: the task table, task files, per-task limits, ``run_task``.
- ``report``: ``run_evaluation`` over saved models, the markdown tables and the chart.

Dependencies run one way: scoring, generation <- metrics <- tasks <- report.
"""

from replaceme_jax.evaluation.generation import (EXACT_MATCH_NEW_TOKENS, GENERATE_ROWS, Generations, exact_match,
                                                 greedy_continuations, normalize_answer, prompt_ids)
from replaceme_jax.evaluation.metrics import (MultipleChoiceItem, TaskResult, accuracy, binomial_stderr,
                                              generation_exact_match, lambada, multiple_choice, norm_length,
                                              paired_difference, perplexity, perplexity_of_tokens, perplexity_windows)
from replaceme_jax.evaluation.report import (generation_table, markdown_cell, markdown_table, paired_table,
                                             plot_report, run_evaluation)
from replaceme_jax.evaluation.scoring import (BOS_MODEL_TYPES, LOGITS_CHUNK_BYTES, MIN_BUCKET, MIN_VOCAB_CHUNK, Reference, Scores,
                                              bucket_length, encode, head_chunks, loglikelihoods, reference_divergence,
                                              score_requests, scoring_bos_id, target_logprobs, tokenize_pairs,
                                              vocab_chunk_size)
from replaceme_jax.evaluation.tasks import (BUNDLED_DIR, PREFIX_KINDS, REPO_ROOT, TASK_HELP, TASKS, Task, TaskSpec,
                                            bundled_task_file, default_data_dir, load_task, parse_limits,
                                            parse_task_list, read_prompts, run_task)

__all__ = [
    # scoring
    "LOGITS_CHUNK_BYTES", "MIN_BUCKET", "MIN_VOCAB_CHUNK", "Reference", "Scores", "bucket_length", "encode",
    "BOS_MODEL_TYPES", "head_chunks", "loglikelihoods", "reference_divergence", "score_requests", "scoring_bos_id",
    "target_logprobs", "tokenize_pairs",
    "vocab_chunk_size",
    # metrics
    "MultipleChoiceItem", "TaskResult", "accuracy", "binomial_stderr", "generation_exact_match", "lambada",
    "multiple_choice", "norm_length", "paired_difference", "perplexity", "perplexity_of_tokens", "perplexity_windows",
    # generation
    "EXACT_MATCH_NEW_TOKENS", "GENERATE_ROWS", "Generations", "exact_match", "greedy_continuations",
    "normalize_answer", "prompt_ids",
    # tasks
    "BUNDLED_DIR", "PREFIX_KINDS", "REPO_ROOT", "TASK_HELP", "TASKS", "Task", "TaskSpec", "bundled_task_file",
    "default_data_dir", "load_task", "parse_limits", "parse_task_list", "read_prompts", "run_task",
    # report
    "generation_table", "markdown_cell", "markdown_table", "paired_table", "plot_report", "run_evaluation",
]
