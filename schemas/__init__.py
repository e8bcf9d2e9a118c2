"""Data contracts (pandera) for every raw dataset format the pipeline reads.

Schemas only declare rules; tasks/validate.py runs them and writes the report.
"""

from schemas.classification import classification_schema
from schemas.instruction import instruction_schema

__all__ = ["classification_schema", "instruction_schema"]
