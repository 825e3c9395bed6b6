"""scvi-tools as a family: settings.py and family.py (plain data, for the host), recipe.py
(train and predict, in the jail), mlflow_model.py (the MLflow model)."""
