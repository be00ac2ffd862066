"""One wiring of model and data for every entry that needs both: ``train``, ``eval``, ``lr_find`` and ``find_issues``.

The model comes first, because its backbone owns the preprocessing (input size, crop, mean/std, interpolation) that
the data module applies; the data module may still override the size (``data.image_size``). The data module must keep
the contract in ``data.contract`` (``ClassificationData``), which is all its callers read. ``predict.py`` and
``export.py`` need no data module: the checkpoint's stored preprocessing is all they apply to files.
"""

from __future__ import annotations

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from image_finetune.checkpoints import check_stored_targets, run_config
from image_finetune.core.errors import ConfigError, UserError
from image_finetune.data.base import ClassificationDataModule
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


def data_config(cfg: DictConfig, ckpt_path: str) -> DictConfig:
    """The ``data`` group from the command line if given, else the one stored in the checkpoint.

    A stored config is untrusted data: it may only name one of the project's data modules (``check_stored_targets``),
    and it writes nothing where the checkpoint says (no scan report; the scan cache goes to this run's
    ``paths.cache_dir``). Either way images are read from the original files, never from the resized training cache,
    so eval.py's numbers are exactly what predict.py and the exported models compute (find_issues.py reads it too).
    """
    if cfg.get("data") is not None:
        data = OmegaConf.create(OmegaConf.to_container(cfg.data, resolve=True))  # a copy: cfg stays as the user gave it
        if data.get("test_fraction") == "auto":
            data.test_fraction = 0  # a folder named for evaluation is held out whole (its test/ folder, if any, counts)
    else:
        stored = run_config(ckpt_path).get("data")
        if not stored:
            raise UserError(f"{ckpt_path} holds no run config: name the data, e.g. data=imagefolder data.root=DIR")
        stored.pop("augment", None)  # training augmentation (augment=...): evaluation never uses it
        check_stored_targets(stored, source=f"{ckpt_path}: data", root_type=ClassificationDataModule)
        for key, value in (("report_path", None), ("cache_dir", cfg.paths.get("cache_dir"))):
            if key in stored:
                stored[key] = value
        data = OmegaConf.create(stored)
    if "cache" in data:
        data.cache = None
    if "decode" in data:
        data.decode = "cpu"  # decoded as predict.py and the exports decode; a GPU-trained checkpoint evaluates anywhere
    data.pop("augment", None)
    return data
