"""A linear checkpoint as an MLflow pyfunc model ("models from code": MLflow runs this file
to get the model, so nothing is pickled).

    model = mlflow.pyfunc.load_model("models:/linear-cbmc/1")
    model.predict(counts)  # DataFrame: cells as rows, gene names as columns, raw counts
    # -> DataFrame with one column, cell_type

The checkpoint folder (model.json, trainers/linear/checkpoint.py) is the model's `checkpoint`
artifact; the predictor is the one the trainer tested with, so the test cells give back the
test metrics the version was registered with. Only mlflow and pandas at the top: the host
runs this file when it logs a model.
"""

from __future__ import annotations

import mlflow
import pandas as pd


class LinearCellTypes(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from trainers.linear.checkpoint import load

        self.model = load(context.artifacts["checkpoint"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        """`model_input`: raw counts, one row per cell, one column per gene (genes the model
        does not read are ignored; genes it reads that are missing count 0)."""
        import numpy as np

        from trainers.data.load import counts_frame

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        data = counts_frame(frame)
        if len(frame) == 0:
            return pd.DataFrame({"cell_type": pd.Series([], dtype=str)})
        head = self.model.predict(data, np.arange(len(frame)))
        return pd.DataFrame({"cell_type": [self.model.label_names[i] for i in head]},
                            index=frame.index)


mlflow.models.set_model(LinearCellTypes())
