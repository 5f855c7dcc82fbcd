"""The import path that MLflow models saved by detectkit before ``detectkit.integrations`` existed
run on load (their copied "model from code" file imports ``detectkit.mlflow_pyfunc``): kept so that
registered models keep loading. New code imports :mod:`detectkit.integrations.mlflow_pyfunc`."""

from detectkit.integrations.mlflow_pyfunc import DetectkitPythonModel, save_pyfunc_model  # noqa: F401
