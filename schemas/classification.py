"""Contract for classification data (CSV, JSONL or parquet): text columns plus a label.

Every value arrives as a string (the readers do not coerce types), so a wrong label type
shows up as a label outside the allowed set rather than as a silent cast.
"""

import pandera.pandas as pa

from schemas.checks import NOT_BLANK, at_least_n_classes


def classification_schema(
    text_columns: list[str],
    label_column: str | None,
    allowed_labels: list[str] | None,
    min_classes: int | None = 2,
    unique: bool = True,
) -> pa.DataFrameSchema:
    """label_column None: rows to predict, which need no label. unique False: the same text may
    come twice (in training it would leak across splits; in prediction it is just asked twice).
    unique and min_classes are rules over all rows: a dataset validated in chunks declares them
    here with unique=False, min_classes=None per chunk and checks them over the whole dataset
    (tasks/validate.py: hashes of every row's text, the set of labels seen)."""
    columns = {c: pa.Column(str, checks=[NOT_BLANK], nullable=False) for c in text_columns}
    checks = []
    if label_column is not None:
        label_checks = [NOT_BLANK]
        if allowed_labels is not None:
            label_checks.append(pa.Check.isin(allowed_labels))
        columns[label_column] = pa.Column(str, checks=label_checks, nullable=False)
        if min_classes is not None:
            checks.append(at_least_n_classes(label_column, min_classes))
    return pa.DataFrameSchema(
        columns,
        checks=checks,
        # The same text twice (same or conflicting label) would leak across splits.
        unique=list(text_columns) if unique else None,
        report_duplicates="exclude_first",
        strict=False,
        coerce=False,
        name="classification",
    )
