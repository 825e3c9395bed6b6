"""A centroid checkpoint as an MLflow pyfunc model from code: raw counts (cells x genes) in,
`cell_type` out, by the recipe's own predict."""

from __future__ import annotations

import mlflow
import pandas as pd


class CentroidCellTypes(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        self.folder = context.artifacts["checkpoint"]

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        import numpy as np
        from trainers.centroid.recipe import predict

        from trainers.data.load import CellData

        frame = pd.DataFrame(model_input)
        data = CellData(frame.to_numpy(dtype=np.float32), [str(c) for c in frame.columns],
                        None, [], "counts")
        head, names = predict(self.folder, data, np.arange(len(frame)))
        return pd.DataFrame({"cell_type": [names[i] for i in head]}, index=frame.index)


mlflow.models.set_model(CentroidCellTypes())
