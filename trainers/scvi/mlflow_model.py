"""A fine-tuned scANVI checkpoint as an MLflow pyfunc model ("models from code": MLflow runs
this file to get the model, so nothing is pickled).

    model = mlflow.pyfunc.load_model("models:/scvi-cbmc/3")
    model.predict(counts)  # DataFrame: cells as rows, gene names as columns, raw counts
    # -> DataFrame with one column, cell_type

The checkpoint (scvi-tools' layout: model.pt, plus forge.json) is the model's `checkpoint`
artifact. Predictions go through trainers/scvi/recipe.py `predict`, the classifier's posterior
mean (deterministic), so the test cells give back the labels the version was scored on.

Only mlflow and pandas at the top: the host runs this file when it logs a model and must not
load torch for it (runner/jobs/tracking.py `log_model`).
"""

from __future__ import annotations

import mlflow
import pandas as pd


class ScanviCellTypes(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        self.folder = context.artifacts["checkpoint"]

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        """`model_input`: raw counts, one row per cell, one column per gene (genes the model
        lacks are dropped, genes it reads that are absent count as 0, as do missing values)."""
        import numpy as np

        from trainers.data.load import counts_frame
        from trainers.scvi.recipe import predict

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        data = counts_frame(frame)
        if len(frame) == 0:
            return pd.DataFrame({"cell_type": pd.Series([], dtype=str)})
        head, names = predict(self.folder, data, np.arange(len(frame)))
        return pd.DataFrame({"cell_type": [names[i] for i in head]}, index=frame.index)


mlflow.models.set_model(ScanviCellTypes())
