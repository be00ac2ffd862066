"""Operations around runs: hyperparameter sweeps (``sweep``, Optuna), the multirun summary (``multirun``), SLURM
(``slurm``) and experiment trackers (``loggers``: TensorBoard, W&B, MLflow)."""
