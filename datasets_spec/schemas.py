"""Arrow schemas and row rules of prefloop's core tables.

Each table is declared once, as a :class:`TableSpec`: its Arrow schema (``schema_id`` and
``schema_version`` in the schema metadata, so any Parquet file says what it is), which columns
are required, and the row rules of its data contract. The same rules drive the vectorised
quarantine of bad rows and the great-expectations suite run at every write
(:mod:`prefloop.datasets_spec.contracts`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import pyarrow as pa

RuleCheck = Literal["not_null", "non_empty", "finite", "in_set", "between", "columns_differ", "unique"]


@dataclass(frozen=True)
class RowRule:
    """One row-level expectation. A row that breaks it is quarantined with ``reason``."""

    reason: str
    check: RuleCheck
    column: str
    other: str | None = None  # second column, for columns_differ
    values: tuple[Any, ...] = ()  # allowed values, for in_set
    min_value: float | None = None
    max_value: float | None = None


@dataclass(frozen=True)
class TableSpec:
    name: str
    version: int
    fields: tuple[pa.Field, ...]
    required: tuple[str, ...]
    rules: tuple[RowRule, ...] = field(default_factory=tuple)
    description: str = ""

    @property
    def schema_id(self) -> str:
        return f"prefloop.{self.name}"

    @property
    def schema(self) -> pa.Schema:
        return pa.schema(
            list(self.fields),
            metadata={"schema_id": self.schema_id, "schema_version": str(self.version)},
        )

    @property
    def column_names(self) -> list[str]:
        return [f.name for f in self.fields]


def _not_blank(*columns: str) -> tuple[RowRule, ...]:
    rules: list[RowRule] = []
    for column in columns:
        rules.append(RowRule(f"missing_{column}", "not_null", column))
        rules.append(RowRule(f"empty_{column}", "non_empty", column))
    return tuple(rules)


PROMPTS = TableSpec(
    name="prompts",
    version=1,
    description="Prompts of a task, with the reference answer used by verifiers.",
    fields=(
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("reference_answer", pa.string()),
        pa.field("reference_solution", pa.string()),
        pa.field("task", pa.string()),
        pa.field("source", pa.string()),
        pa.field("split", pa.string(), nullable=False),
    ),
    required=("prompt_id", "prompt", "split"),
    rules=(
        *_not_blank("prompt_id", "prompt"),
        RowRule("unknown_split", "in_set", "split", values=("train", "heldout")),
        RowRule("duplicate_prompt_id", "unique", "prompt_id"),
    ),
)

SAMPLES = TableSpec(
    name="samples",
    version=1,
    description="Completions sampled from a policy, with token counts and sequence log-probs.",
    fields=(
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("completion", pa.string(), nullable=False),
        pa.field("sample_index", pa.int32()),
        pa.field("completion_tokens", pa.int32()),
        pa.field("sum_logprob", pa.float64()),
        pa.field("finish_reason", pa.string()),
        pa.field("policy_model_id", pa.string()),
        pa.field("round", pa.int32()),
        pa.field("temperature", pa.float64()),
        pa.field("top_p", pa.float64()),
        pa.field("seed", pa.int64()),
        # Added for imported samples (nullable, so older artifacts still read): the name of the model
        # that wrote the completion when it is not a model artifact of this store (e.g. "gpt-4o").
        pa.field("policy_name", pa.string()),
        # Added with sample@3 (nullable; null in older and imported samples): the token ids the policy
        # sampled (``Completion.token_ids``), so training and the reference score exactly that sequence even
        # where it is not the tokenizer's own encoding of ``completion``, and the fingerprint of the
        # tokenizer they belong to (prefloop.forward.tokenizer_fingerprint): ids are used only by a model
        # whose tokenizer has the same fingerprint, any other re-encodes the text.
        pa.field("completion_token_ids", pa.list_(pa.int32())),
        pa.field("tokenizer_fingerprint", pa.string()),
    ),
    required=("sample_id", "prompt_id", "prompt", "completion"),
    rules=(
        *_not_blank("sample_id", "prompt_id", "prompt"),
        RowRule("missing_completion", "not_null", "completion"),
        RowRule("nonfinite_logprob", "finite", "sum_logprob"),
        RowRule("unknown_finish_reason", "in_set", "finish_reason", values=("stop", "length")),
        RowRule("duplicate_sample_id", "unique", "sample_id"),
    ),
)

LABELS = TableSpec(
    name="labels",
    version=1,
    description="Scores given to samples or pairs by a labeler (verifier, reward model, judge).",
    fields=(
        pa.field("label_id", pa.string(), nullable=False),
        pa.field("target_id", pa.string(), nullable=False),
        pa.field("target_kind", pa.string(), nullable=False),
        pa.field("prompt_id", pa.string()),
        pa.field("labeler", pa.string(), nullable=False),
        pa.field("labeler_version", pa.string()),
        pa.field("score", pa.float64(), nullable=False),
        pa.field("verdict", pa.string()),
        pa.field("extracted_answer", pa.string()),
    ),
    required=("label_id", "target_id", "target_kind", "labeler", "score"),
    rules=(
        *_not_blank("label_id", "target_id", "labeler"),
        RowRule("unknown_target_kind", "in_set", "target_kind", values=("sample", "pair")),
        RowRule("missing_score", "not_null", "score"),
        RowRule("nonfinite_score", "finite", "score"),
        RowRule("duplicate_label_id", "unique", "label_id"),
    ),
)

PREFERENCES = TableSpec(
    name="preferences",
    version=1,
    description="Preference pairs: prompt, chosen, rejected, with scores, provenance and confidence.",
    fields=(
        pa.field("pair_id", pa.string(), nullable=False),
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("chosen", pa.string(), nullable=False),
        pa.field("rejected", pa.string(), nullable=False),
        pa.field("score_chosen", pa.float64()),
        pa.field("score_rejected", pa.float64()),
        pa.field("margin", pa.float64()),
        pa.field("method", pa.string()),
        pa.field("confidence", pa.float64()),
        pa.field("chosen_sample_id", pa.string()),
        pa.field("rejected_sample_id", pa.string()),
        pa.field("round", pa.int32()),
        pa.field("policy_model_id", pa.string()),
        # Added with construct@3 (nullable; null for imported pairs, pairs of tree search and pairs whose
        # samples carry no ids): the sampled token ids of chosen and rejected, carried from the samples'
        # ``completion_token_ids``, and the fingerprint of the tokenizer they belong to. Training, SFT on
        # chosen responses and the reference stage use them when the model's tokenizer has that fingerprint,
        # else they re-encode the text (prefloop.forward.sampled_completion_ids).
        pa.field("chosen_token_ids", pa.list_(pa.int32())),
        pa.field("rejected_token_ids", pa.list_(pa.int32())),
        pa.field("tokenizer_fingerprint", pa.string()),
    ),
    required=("pair_id", "prompt", "chosen", "rejected"),
    rules=(
        *_not_blank("pair_id", "prompt", "chosen", "rejected"),
        RowRule("chosen_equals_rejected", "columns_differ", "chosen", other="rejected"),
        RowRule("nonfinite_score", "finite", "score_chosen"),
        RowRule("nonfinite_score", "finite", "score_rejected"),
        RowRule("nonfinite_margin", "finite", "margin"),
        RowRule("confidence_out_of_range", "between", "confidence", min_value=0.0, max_value=1.0),
        RowRule("duplicate_pair_id", "unique", "pair_id"),
    ),
)

DROPS = TableSpec(
    name="drops",
    version=1,
    description="Rows removed by a filter or a data contract, each with a named reason.",
    fields=(
        pa.field("table", pa.string(), nullable=False),
        pa.field("row_id", pa.string()),
        pa.field("row_index", pa.int64()),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string()),
        pa.field("row", pa.string(), metadata={"format": "json"}),
    ),
    required=("table", "reason"),
    rules=(*_not_blank("reason"),),
)

METRICS = TableSpec(
    name="metrics",
    version=1,
    description="Evaluation metrics in long form: one row per (round, metric).",
    fields=(
        pa.field("round", pa.int32(), nullable=False),
        pa.field("metric", pa.string(), nullable=False),
        pa.field("value", pa.float64()),
        pa.field("stderr", pa.float64()),
        pa.field("count", pa.int64()),
        pa.field("policy_model_id", pa.string()),
        pa.field("split", pa.string()),
    ),
    required=("round", "metric", "value"),
    rules=(*_not_blank("metric"), RowRule("missing_round", "not_null", "round")),
)

EVAL_RESULTS = TableSpec(
    name="eval_results",
    version=1,
    description="Per-prompt evaluation outcomes, kept so policies can be compared on the same prompts.",
    fields=(
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("completion", pa.string()),
        pa.field("correct", pa.bool_()),
        pa.field("completion_tokens", pa.int32()),
        pa.field("finish_reason", pa.string()),
        # Added with evaluate@2 (nullable, so older artifacts still read): the reward of the greedy
        # completion, and the pass@k / KL samples of the prompt (null where it was not sampled).
        pa.field("reward", pa.float64()),
        pa.field("samples_drawn", pa.int32()),
        pa.field("samples_correct", pa.int32()),
        pa.field("mean_log_ratio", pa.float64()),
    ),
    required=("prompt_id", "correct"),
    rules=(*_not_blank("prompt_id"), RowRule("duplicate_prompt_id", "unique", "prompt_id")),
)

TREES = TableSpec(
    name="trees",
    version=1,
    description="Every node of step-level search trees (MCTS), so pairs can be re-derived without search.",
    fields=(
        pa.field("tree_id", pa.string(), nullable=False),
        pa.field("node_id", pa.string(), nullable=False),
        pa.field("parent_id", pa.string()),
        pa.field("prompt_id", pa.string()),
        pa.field("depth", pa.int32()),
        pa.field("step_text", pa.string()),
        pa.field("visits", pa.int64()),
        pa.field("q_value", pa.float64()),
        pa.field("value", pa.float64()),
        pa.field("prior", pa.float64()),
        pa.field("terminal", pa.bool_()),
        pa.field("correct", pa.bool_()),
        # Added with the mcts stage (nullable): what pair-trees needs to re-derive pairs without search —
        # the prompt, sibling order, the node's evaluation R and self-evaluation P(yes), the step's tokens
        # and log-prob, why a terminal node is not a verified answer, the committed path, the tree's final
        # status (correct, incorrect, truncated_step, empty_step, max_depth, context_window), provenance.
        pa.field("prompt", pa.string()),
        pa.field("child_index", pa.int32()),
        pa.field("evaluation", pa.float64()),
        pa.field("self_eval", pa.float64()),
        pa.field("num_tokens", pa.int32()),
        pa.field("sum_logprob", pa.float64()),
        pa.field("finish_reason", pa.string()),
        pa.field("invalid_reason", pa.string()),
        pa.field("committed", pa.bool_()),
        pa.field("expanded", pa.bool_()),
        pa.field("tree_status", pa.string()),
        pa.field("round", pa.int32()),
        pa.field("policy_model_id", pa.string()),
        # Added for MCTS-DPO's decision-time confidence (nullable; null in tables written before, and for
        # nodes whose parent was never a decision root): the node's visit count and Q when the decision
        # at its parent was committed. pair-trees computes conf = 1/(1 + N_l/max(1, N_w)) from these.
        pa.field("decision_visits", pa.int64()),
        pa.field("decision_q_value", pa.float64()),
    ),
    required=("tree_id", "node_id", "depth"),
    rules=(
        *_not_blank("tree_id", "node_id"),
        RowRule("nonfinite_q_value", "finite", "q_value"),
        RowRule("duplicate_node_id", "unique", "node_id"),
    ),
)

TRAIN_LOG = TableSpec(
    name="train_log",
    version=1,
    description="Per-step training metrics in long form (loss, reward margin, implicit-reward accuracy …).",
    fields=(
        pa.field("step", pa.int32(), nullable=False),
        pa.field("metric", pa.string(), nullable=False),
        pa.field("value", pa.float64()),
    ),
    required=("step", "metric", "value"),
    rules=(*_not_blank("metric"),),
)

REFERENCE_LOGPS = TableSpec(
    name="reference_logps",
    version=1,
    description="Sequence log-probs of each pair's chosen and rejected completion under the round's DPO "
    "reference, computed once per round and read by every training run on those pairs.",
    fields=(
        pa.field("pair_id", pa.string(), nullable=False),
        pa.field("chosen_logp", pa.float64(), nullable=False),
        pa.field("rejected_logp", pa.float64(), nullable=False),
        pa.field("chosen_tokens", pa.int32()),
        pa.field("rejected_tokens", pa.int32()),
    ),
    required=("pair_id", "chosen_logp", "rejected_logp"),
    rules=(
        *_not_blank("pair_id"),
        RowRule("nonfinite_logp", "finite", "chosen_logp"),
        RowRule("nonfinite_logp", "finite", "rejected_logp"),
        RowRule("duplicate_pair_id", "unique", "pair_id"),
    ),
)

SPECS: dict[str, TableSpec] = {
    spec.name: spec
    for spec in (PROMPTS, SAMPLES, LABELS, PREFERENCES, DROPS, METRICS, EVAL_RESULTS, TREES, TRAIN_LOG,
                 REFERENCE_LOGPS)
}


def get_spec(name: str) -> TableSpec:
    try:
        return SPECS[name]
    except KeyError:
        raise KeyError(f"no table spec named '{name}'; known tables: {', '.join(SPECS)}") from None
