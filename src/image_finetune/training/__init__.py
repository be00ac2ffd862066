"""The training engine: ``train.train(cfg)`` (what ``train.py`` runs) builds model and data once (``wiring``), checks
a resume against its checkpoint (``resume_guard``) or starts from a finished run (``init_from``), and fits the freeze
schedule (``schedule``: plain data) one phase at a time (``finetune``); ``lr_find`` is the LR range test on the same
wiring. Nothing here is edited to change the model or the data: that is ``image_finetune.recipe``."""
