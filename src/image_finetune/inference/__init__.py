"""After training: ``classifier.Classifier`` (a checkpoint or export with its own preprocessing, rebuilt through the
recipe's allow-lists only), and the entry functions of ``eval.py`` (``evaluate``), ``predict.py`` (``predict``) and
``export.py`` (``export``), with test-time augmentation (``tta``)."""
