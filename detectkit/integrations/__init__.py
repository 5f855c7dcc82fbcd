"""Adapters to other tools: experiment tracking (MLflow / W&B loggers, the run folder rule) and the
MLflow ``pyfunc`` model. Each module imports its tool; nothing in the core imports this package."""
