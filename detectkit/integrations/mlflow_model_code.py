"""The MLflow "model from code" file of detectkit's pyfunc model (see :mod:`detectkit.integrations.mlflow_pyfunc`).

MLflow copies this file into the saved model folder and runs it when the model loads, instead of
unpickling a Python object; it only names the model class, which comes from the installed detectkit.
"""

from mlflow.models import set_model

from detectkit.integrations.mlflow_pyfunc import DetectkitPythonModel

set_model(DetectkitPythonModel())
