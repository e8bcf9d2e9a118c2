"""Wiring only: the DAG (stages.py), the Prefect flow (pipeline.py), MLflow (tracking.py), the CLI."""
