"""The recipe: the only Python you open to change what is trained. Everything else is the engine.

Read top to bottom; each file says what to edit in it and what the engine expects of it.

- ``backbones.py``, ``timm_backbone.py``: builders turning a named network into a headless ``Backbone``
  (``model.backbone._target_``). ``registry.py``: the allow-lists of backbone and head builders a checkpoint may name.
- ``heads.py``: what sits on the features (``head=linear|mlp``).
- ``losses.py``: the training loss (``loss=cross_entropy|focal``), built from the training split's class counts.
- ``metrics.py``: the torchmetrics collection logged per split (``model.metrics``).
- ``schedulers.py``: the learning-rate schedule (``model.scheduler``).
- ``datasets.py``: any map-style dataset of ``(image, label)`` as a data module (``data=flowers102`` is the example).

Augmentation presets are configs (``configs/augment/*.yaml``: crop scale, flip, and any torchvision v2 ``ops`` by
``_target_``); the engine executes them on every data path (``data/transforms.py``). Experiments are configs too
(``configs/experiment/``).
"""
