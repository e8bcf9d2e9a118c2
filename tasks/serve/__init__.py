"""Serving a trained model: batch prediction and the model card."""
