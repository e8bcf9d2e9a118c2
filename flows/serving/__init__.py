"""Registered versions as MLflow pyfunc models (models from code)."""
