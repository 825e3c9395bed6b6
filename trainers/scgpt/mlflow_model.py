"""A fine-tuned cell-type checkpoint as an MLflow pyfunc model ("models from code": MLflow
runs this file to get the model, so nothing is pickled).

    model = mlflow.pyfunc.load_model("models:/scgpt-cbmc/3")
    model.predict(counts)  # DataFrame: cells as rows, gene names as columns, raw counts
    # -> DataFrame with one column, cell_type

The checkpoint (scGPT layout: args.json, vocab.json, best_model.pt) is the model's
`checkpoint` artifact. Predictions go through trainers/scgpt/predict.py with the draws of
the trainer's own test pass (its seed, eval batch size and precision rule), so the test cells,
in the split's order, give back the test metrics the version was registered with.

Only mlflow and pandas at the top: the host runs this file when it logs a model and must not
load torch for it (runner/jobs/tracking.py `log_model`).
"""

from __future__ import annotations

import mlflow
import pandas as pd


class ScGPTCellTypes(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from trainers.scgpt.predict import load_classifier

        self.clf = load_classifier(context.artifacts["checkpoint"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        """`model_input`: raw counts, one row per cell, one column per gene (genes the
        vocabulary lacks are dropped; missing values count as 0)."""
        import numpy as np

        from trainers.data.load import counts_frame
        from trainers.runtime import choose_precision
        from trainers.scgpt.predict import predict

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        data = counts_frame(frame)
        if len(frame) == 0:
            return pd.DataFrame({"cell_type": pd.Series([], dtype=str)})
        args = self.clf.args
        head = predict(self.clf, data, np.arange(len(frame)), seed=args["seed"],
                       max_seq_len=args["max_seq_len"],
                       batch_size=args.get("eval_batch_size") or 2 * args["batch_size"],
                       include_zero_gene=args.get("include_zero_gene", False),
                       precision=choose_precision(args.get("precision") or "auto", "cpu"))
        return pd.DataFrame({"cell_type": [self.clf.label_names[i] for i in head]},
                            index=frame.index)


mlflow.models.set_model(ScGPTCellTypes())
