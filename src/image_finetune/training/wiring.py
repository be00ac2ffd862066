"""One wiring of model and data for every entry that needs both: ``train``, ``eval`` and ``lr_find``.

The model comes first, because its backbone owns the preprocessing (input size, crop, mean/std, interpolation) that
the data module applies; the data module may still override the size (``data.image_size``). The data module must keep
the contract in ``data.contract`` (``ClassificationData``), which is all its callers read. ``predict.py`` and
``export.py`` need no data module: the checkpoint's stored preprocessing is all they apply to files.
"""

from __future__ import annotations

from hydra.utils import instantiate
from omegaconf import DictConfig

from image_finetune.core.errors import ConfigError
from image_finetune.data.contract import ClassificationData
from image_finetune.models.classifier import ImageClassifier


def build_model_and_data(
    data: DictConfig, *, model: DictConfig | None = None, checkpoint: str | None = None
) -> tuple[ImageClassifier, ClassificationData]:
    """The model (from its ``model`` config, or from ``checkpoint``), then the data module of ``data`` with the model's
    preprocessing (``preprocessing=``: the backbone's for a new model, the stored one for a checkpoint)."""
    classifier = build_model(model=model, checkpoint=checkpoint)
    return classifier, build_data(data, classifier)


def build_model(*, model: DictConfig | None = None, checkpoint: str | None = None) -> ImageClassifier:
    """The model from its ``model`` config, or rebuilt from ``checkpoint`` (exactly one of the two)."""
    if (model is None) == (checkpoint is None):
        raise TypeError("build_model needs exactly one of model= (a config) and checkpoint= (a path)")
    return ImageClassifier.from_checkpoint(checkpoint) if checkpoint is not None else instantiate(model)


def build_data(data: DictConfig, classifier: ImageClassifier) -> ClassificationData:
    """The data module of ``data``, given ``classifier``'s preprocessing; it must keep the data-module contract."""
    datamodule = instantiate(data, _partial_=True)(preprocessing=classifier.preprocessing)
    if not isinstance(datamodule, ClassificationData):
        raise ConfigError(
            f"data._target_={data.get('_target_')!r} makes a {type(datamodule).__name__}, which does not keep the "
            "data-module contract (image_finetune.data.contract.ClassificationData): subclass "
            "image_finetune.data.ClassificationDataModule, or wrap your datasets in image_finetune.recipe.datasets.DatasetDataModule"
        )
    return datamodule
