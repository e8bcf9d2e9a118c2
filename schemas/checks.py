"""Checks shared by the schemas, named so a report says which rule a row broke."""

import pandera.pandas as pa

NOT_BLANK = pa.Check(lambda s: s.str.strip().str.len() > 0, element_wise=False, name="not_blank")


def at_least_n_classes(column: str, n: int) -> pa.Check:
    return pa.Check(lambda df: df[column].nunique() >= n, name=f"at_least_{n}_classes")
