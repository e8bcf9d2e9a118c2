"""Contract for instruction-tuning data (Alpaca JSON, JSONL, Self-Instruct instances)."""

import pandera.pandas as pa

from schemas.checks import NOT_BLANK


def instruction_schema(with_output: bool = True, unique: bool = True) -> pa.DataFrameSchema:
    """with_output False: prompts to answer (the output column is then optional, checked if present)."""
    columns = {
        "instruction": pa.Column(str, checks=[NOT_BLANK], nullable=False),
        # The optional context may be empty, but must be a string when present.
        "input": pa.Column(str, nullable=False),
    }
    if with_output:
        columns["output"] = pa.Column(str, checks=[NOT_BLANK], nullable=False)
    return pa.DataFrameSchema(
        columns,
        unique=["instruction", "input"] if unique else None,
        report_duplicates="exclude_first",
        strict=False,
        coerce=False,
        name="instruction",
    )
