"""MLflow wiring: runs, the model registry, and lineage read back from them."""
