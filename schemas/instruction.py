"""Contract for instruction-tuning data (Alpaca JSON, JSONL, Self-Instruct instances)."""
import pandera.pandas as pa

from schemas.checks import NOT_BLANK


def instruction_schema() -> pa.DataFrameSchema:
    return pa.DataFrameSchema(
        {
            "instruction": pa.Column(str, checks=[NOT_BLANK], nullable=False),
            # The optional context may be empty, but must be a string when present.
            "input": pa.Column(str, nullable=False),
            "output": pa.Column(str, checks=[NOT_BLANK], nullable=False),
        },
        unique=["instruction", "input"],
        report_duplicates="exclude_first",
        strict=False,
        coerce=False,
        name="instruction",
    )
