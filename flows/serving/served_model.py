"""The code of every registered model version (MLflow "models from code").

flows/serving/model_version.py logs this file as the version's python_model, with tasks/ and schemas/ as its
code_paths: MLflow copies all three into the version, and runs this file to load it (in
`mlflow.pyfunc.load_model` and `mlflow models serve`), so a version serves with the code that
made it. Nothing is pickled. It imports only mlflow and tasks: prediction is tasks/serve/predict.py,
the same function `qlora predict` calls.
"""

from __future__ import annotations

import warnings

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

# The signature is given explicitly when the model is logged; type hints would be a second one.
warnings.filterwarnings("ignore", message=r".*Add type hints to the `predict` method")


class QloraModel(mlflow.pyfunc.PythonModel):
    """Input: a DataFrame with the training data's text columns (seq_cls), or instruction [+ input] or messages
    (causal_lm). Output: label and score per row, or generated text. Params: batch_size,
    max_new_tokens (causal_lm)."""

    def load_context(self, context):
        from tasks.serve.predict import load_predictor

        self.predictor = load_predictor(context.artifacts["bundle"])

    def predict(self, context, model_input, params=None):
        import pandas as pd

        from tasks.common import PipelineError
        from tasks.serve.predict import frame_rows, predict, prepare

        params = params or {}
        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        try:
            rows = prepare(self.predictor.params, frame_rows(model_input), "request")
        except PipelineError as exc:  # a bad row is the caller's error: HTTP 400 naming row, column and rule
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None
        return predict(
            self.predictor, rows, batch_size=params.get("batch_size"), max_new_tokens=params.get("max_new_tokens")
        )


mlflow.models.set_model(QloraModel())
