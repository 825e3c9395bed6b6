"""The linear family: scikit-learn logistic regression on log1p CP10k features, the host's
baseline (trainers/scoring.py) made a versioned model. No torch, no Lightning, no pickle:

- settings.py: its settings (architecture, training keys, ranges, rules);
- family.py: `FAMILY`, and `inspect` of a checkpoint's model.json on the host;
- checkpoint.py: model.json, written and read (JSON numbers only), and the numpy predictor;
- recipe.py: `train(manifest, state)` and `predict(...)`, run in the jail;
- mlflow_model.py: the checkpoint as an MLflow pyfunc model.
"""
