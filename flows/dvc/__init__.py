"""DVC wiring: the DAG and dvc.yaml, the stage command, code dependencies, data versions."""
