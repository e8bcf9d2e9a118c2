"""Pipeline steps as plain functions over file paths and typed configs.

Each step reads its inputs from paths under the project root, writes its outputs there,
and returns a StageResult naming every output with its content hash. Nothing here
imports Prefect, DVC or MLflow: those live in flows/.
"""
