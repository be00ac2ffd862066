"""What train, eval and lr_find may rely on in a data module: the ``ClassificationData`` protocol.

Callers read these members and nothing else (no ``getattr`` probes, no checks for a concrete class), so any data module
that keeps the contract works with every entry script. ``ClassificationDataModule`` (``data/base.py``) keeps it; a data
module of your own gets it by subclassing that (``data/cifar10.py`` is a complete example). ``wiring.build_model_and_data``
refuses one that does not keep it, with one line.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol, runtime_checkable

from torch.utils.data import Dataset

from image_finetune.data.preprocessing import Preprocessing


class ImageName(NamedTuple):
    """What reports call one item of ``all_images()``: its split, its id and its label."""

    split: str
    """The split of this run it is in (``train``, ``val``, ``test``)."""
    id: str
    """Its file path, or ``<split>/<index>`` for an image without a file (CIFAR-10's arrays, a dataset's items, a
    Hugging Face row), the split there being where the data keeps it (CIFAR-10's ``train/123`` may be in ``val``)."""
    label: int
    """Its class index (multi-label data: the class it is stratified by, its commonest label)."""
    is_file: bool
    """Whether ``id`` is a file (``near_duplicates.csv`` compares file bytes, else the image's pixels)."""


@runtime_checkable
class ClassificationData(Protocol):
    """A LightningDataModule of ``(uint8 NCHW images, int64 labels)`` batches, as train, eval and lr_find use it."""

    class_names: list[str]
    """The classes, in label order; filled by ``setup``."""
    preprocessing: Preprocessing | None
    """What turns a file into the network's input: the model's (handed over by the wiring), at the data's size if it
    overrides it. The model stores it in checkpoints; eval's TTA reads its ``size`` and ``crop_ratio``. None only when
    the data module was built without one (the model then records its backbone's)."""
    datasets: dict[str, Dataset]
    """``"train"``, ``"val"``, optionally ``"test"``, filled by ``setup``; eval reads and replaces ``"test"``."""
    batch_size: int
    num_workers: int
    source: str
    """How one-line messages name this data, e.g. ``data.root='/data/pets'``."""
    task: str
    """``multiclass`` (one int label per image) or ``multilabel`` (a multi-hot float vector): the model's loss,
    metrics and decision rule follow it. Known after ``setup`` where the data decides it (``data.task=auto``)."""

    def prepare_data(self) -> None: ...

    def setup(self, stage: str | None = None) -> None: ...

    def has_split(self, split: str) -> bool:
        """Whether ``setup`` made ``split`` (without a test split there are no test numbers)."""
        ...

    def class_counts(self) -> list[int]:
        """The training split's images per class, in label order (after ``setup``): ``loss=focal``'s balanced weights."""
        ...

    def all_images(self) -> Dataset | None:
        """Every image the data holds, at the eval transform (``eval.py split=all``, ``find_issues.py``); every shipped
        data module has it, None only for a module of your own that has no eval view of its training split."""
        ...

    def image_names(self) -> list[ImageName]:
        """Each item of ``all_images()``, in its order: split, id (path or ``<split>/<index>``) and label."""
        ...

    def held_out_fold(self) -> Dataset | None:
        """k-fold (``data.folds``): the held-out fold's images read from their files at the eval transform, with
        ``samples`` as ``(path, label)`` (the out-of-fold predictions); None when not k-fold or there are no files."""
        ...
