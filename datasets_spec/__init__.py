"""Arrow schemas, data contracts (great-expectations suites) and quarantine of bad rows."""

from prefloop.datasets_spec.contracts import (
    SUITE_SAMPLE_ROWS,
    ContractError,
    ContractResult,
    apply_contract,
    attach_suite,
    check_readable,
    check_rows,
    conform,
    empty_drops,
    make_drops,
    quarantine,
    run_suite,
    suite_sample,
)
from prefloop.datasets_spec.schemas import (
    DROPS,
    EVAL_RESULTS,
    LABELS,
    METRICS,
    PREFERENCES,
    PROMPTS,
    SAMPLES,
    SPECS,
    TRAIN_LOG,
    TREES,
    RowRule,
    TableSpec,
    get_spec,
)

__all__ = [
    "DROPS", "EVAL_RESULTS", "LABELS", "METRICS", "PREFERENCES", "PROMPTS", "SAMPLES", "SPECS", "TRAIN_LOG", "TREES",
    "ContractError", "ContractResult", "RowRule", "TableSpec", "apply_contract", "attach_suite", "check_rows", "check_readable", "conform",
    "empty_drops", "get_spec", "make_drops", "quarantine", "run_suite", "suite_sample", "SUITE_SAMPLE_ROWS",
]
