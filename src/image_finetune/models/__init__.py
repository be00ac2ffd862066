"""The model engine: ``ImageClassifier`` (the LightningModule every run trains), the ``Backbone`` seam it is built on,
its stages and norms, and the rebuild of a network from a checkpoint through the recipe's allow-lists. The parts a
person changes (backbone builders, heads, losses, metrics, schedulers) are in ``image_finetune.recipe``."""
