"""``model.init_from``: start a new run from the weights of a finished one (its checkpoint, or its exported safetensors).

Not a resume (that is ``ckpt_path``): only weights are taken. The backbone's always (the architectures must match),
the head's when the new data has the same classes (same names; in another order its rows are reordered by name),
else a new head for the new classes. Optimizer and scheduler state, epochs, EMA state and the data split all start
fresh. For an EMA run the weights are the average, the ones the run validated, tested and exported with (a
checkpoint's ``state_dict``; ``callbacks/ema.py``).

The file is read once, when a fresh run's model is built (``train.build``), and applied by ``InitFrom`` when the model
has its head. A resumed run takes its weights from its checkpoint and never reads the file, nor do eval, predict,
export and ``Classifier.from_checkpoint``, which rebuild from the checkpoint's stored config: the file may be gone.
A checkpoint is read with ``torch.load(weights_only=True)`` and only its tensors and plain values are used; the
backbone is the one this run's config builds, never one named in the file.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn

from image_finetune.checkpoints import read_checkpoint
from image_finetune.core.errors import ConfigError, UserError
from image_finetune.inference.classifier import read_sidecar
from image_finetune.models.backbone import Backbone
from image_finetune.models.classifier import ImageClassifier, check_weights_fit
from image_finetune.models.rebuild import architecture

log = logging.getLogger(__name__)

KEY = "model.init_from"


@dataclass(frozen=True)
class InitWeights:
    """What a finished run's file holds for a new run: its network's tensors (``ClassifierNet`` names) and
    what they are: the backbone's builder config and the class names of the head's rows."""

    source: str
    backbone: Mapping[str, Any]
    class_names: list[str]
    state: Mapping[str, torch.Tensor]

    @property
    def prefix(self) -> str:
        return f"{KEY}={self.source!r}"

    def backbone_state(self) -> dict[str, torch.Tensor]:
        return {k.removeprefix("backbone."): v for k, v in self.state.items() if k.startswith("backbone.")}


def read_init_weights(source: str | Path) -> InitWeights:
    """Read a training checkpoint or an exported ``.safetensors`` (with its JSON); one-line errors for bad files."""
    path = Path(source).expanduser()
    prefix = f"{KEY}={str(source)!r}"
    if path.suffix == ".safetensors":
        return _read_safetensors(path, str(source), prefix)
    checkpoint = read_checkpoint(path, key=KEY, mmap=True)
    hparams = checkpoint.get("hyper_parameters")
    if not isinstance(hparams, Mapping) or not isinstance(hparams.get("backbone"), Mapping):
        raise UserError(
            f"{prefix} is not a checkpoint of this project (no backbone in its hyper_parameters); give a .ckpt "
            "written by train.py or a .safetensors written by export.py"
        )
    state = {k.removeprefix("net."): v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}
    return InitWeights(str(source), dict(hparams["backbone"]), _names(hparams.get("class_names"), prefix), state)


def _read_safetensors(path: Path, source: str, prefix: str) -> InitWeights:
    if not path.is_file():
        raise UserError(f"{prefix}: no such file")
    meta = read_sidecar(path)  # one line for a missing, damaged or edited JSON (architecture, class names, ...)
    try:
        from safetensors.torch import load_file  # an optional dependency (the ``export`` extra)
    except ImportError:
        raise UserError("safetensors is not installed: pip install 'image-finetune[export]'") from None
    try:
        state = load_file(str(path))
    except Exception as err:  # safetensors raises its own SafetensorError (and OSError) for damaged files
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(
            f"{prefix} cannot be read: it is truncated or not a safetensors file ({reason}); export it again"
        ) from None
    backbone = {"name": meta["architecture"], **dict(meta.get("backbone") or {})}
    return InitWeights(source, backbone, _names(meta.get("class_names"), prefix), state)


def _names(value: Any, prefix: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(name, str) for name in value):
        raise UserError(f"{prefix} stores no class names; give a .ckpt from train.py or a .safetensors from export.py")
    return list(value)


def _describe(config: Mapping[str, Any]) -> str:
    """``resnet18 (torchvision_backbone)``: the architecture and the builder that makes it."""
    spec = architecture(config)
    return f"{spec.get('name')} ({str(spec.get('_target_')).rsplit('.', 1)[-1]})"


def check_fits(weights: InitWeights, backbone: Backbone) -> None:
    """Refuse, in one line naming both architectures, a file whose backbone is not the one this run builds."""
    theirs, ours = architecture(weights.backbone), architecture(backbone.config)
    if (theirs.get("_target_"), theirs.get("name")) != (ours.get("_target_"), ours.get("name")):
        raise ConfigError(
            f"{weights.prefix} holds a {_describe(weights.backbone)} backbone, but this run builds "
            f"{_describe(backbone.config)}: the architectures must match. Set model.backbone.name={theirs.get('name')} "
            "(and the model group it was trained with), or leave model.init_from out"
        )
    check_weights_fit(
        backbone.module,
        weights.backbone_state(),
        source=f"{weights.prefix} ({_describe(weights.backbone)})",
        expected=f"this run's backbone ({_describe(backbone.config)})",
    )


def apply_init_weights(model: ImageClassifier, weights: InitWeights) -> str:
    """Load ``weights`` into ``model`` (its head already sized for the new classes); return the log line.

    The backbone always; the head when the class names are the same (reordered by name when only the order differs),
    else the model keeps its new head. Nothing but tensors is taken from the file.
    """
    net = model.net
    assert net is not None, "apply_init_weights needs the model's head (configure_model)"
    check_fits(weights, model.backbone)
    ours, theirs = model.class_names, weights.class_names
    # Any head (recipe/heads.py): an nn.Sequential whose last layer has one row per class.
    last = f"{len(net.head) - 1}."
    head = {k.removeprefix("head."): v for k, v in weights.state.items() if k.startswith("head.")}
    if not all(v.shape[0] == len(theirs) for k, v in head.items() if k.startswith(last)):
        raise UserError(f"{weights.prefix}: its head does not have one row per class name it stores; it is damaged")
    backbone = weights.backbone_state()
    net.backbone.load_state_dict(backbone)
    loaded = f"loaded backbone ({len(backbone)} tensors)"
    own_shapes = {k: tuple(v.shape) for k, v in net.head.state_dict().items()}
    same_head = own_shapes.keys() == head.keys() and all(
        tuple(head[k].shape[k.startswith(last) :]) == shape[k.startswith(last) :] for k, shape in own_shapes.items()
    )
    if sorted(ours) != sorted(theirs) or len(set(ours)) != len(ours):
        line = f"{loaded}; head new ({len(ours)} classes; the checkpoint had {len(theirs)})"
    elif not same_head:
        line = f"{loaded}; head new (the checkpoint's head is another head: model.head differs)"
    else:
        rows = [theirs.index(name) for name in ours]
        net.head.load_state_dict({k: v[rows] if k.startswith(last) else v for k, v in head.items()})
        order = "same names" if ours == theirs else "same names in another order: rows reordered by name"
        line = f"{loaded} and head ({len(ours)} classes, {order})"
    return f"{weights.prefix}: {line}; optimizer, epochs, EMA state and data split start fresh"


class InitFrom(L.Callback):
    """Applies ``model.init_from`` at the start of the first fit of each fresh model it meets.

    In ``setup``, when the data module has given the class names (the model's head is sized from them), and before
    any callback later in the list copies the model (``EMAWeights`` averages from a copy), so it goes first in the
    list. A fit that restores a checkpoint (a resume, or a later fine-tuning phase) keeps the checkpoint's weights,
    and a model already started from the file is not reset by its next fit (``lr_find`` runs several fits).
    """

    def __init__(self, weights: InitWeights) -> None:
        self.weights = weights
        self._started: weakref.WeakSet[L.LightningModule] = weakref.WeakSet()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != TrainerFn.FITTING or pl_module in self._started:
            return
        self._started.add(pl_module)
        if trainer.ckpt_path is not None:
            log.info(
                "%s not applied: this fit restores %s, whose weights it continues",
                self.weights.prefix,
                trainer.ckpt_path,
            )
            return
        assert isinstance(pl_module, ImageClassifier)
        pl_module.configure_model()
        log.info(apply_init_weights(pl_module, self.weights))


def init_from_callbacks(source: str | None, backbone: Backbone, *, resume: bool = False) -> list[InitFrom]:
    """``[InitFrom]`` for ``model.init_from=source`` (``[]`` when unset). The file is read and checked against
    ``backbone`` now, so a bad file or another architecture fails before the data scan. A resumed run continues its
    checkpoint's weights: the file is not read at all (it may be gone)."""
    if source is None or str(source) == "":
        return []
    if resume:
        log.info("%s=%r not read: this run resumes from ckpt_path, whose weights it continues", KEY, str(source))
        return []
    weights = read_init_weights(str(source))
    check_fits(weights, backbone)
    return [InitFrom(weights)]
