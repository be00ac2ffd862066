"""The LightningModule: a pretrained backbone, a new head, and one shared step for every split."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.functional.classification import multilabel_average_precision
from torchvision.transforms import v2

from image_finetune.checkpoints import read_checkpoint
from image_finetune.core.errors import ConfigError, UserError
from image_finetune.data.contract import ClassificationData
from image_finetune.data.preprocessing import Preprocessing
from image_finetune.models.backbone import Backbone
from image_finetune.models.norms import is_norm_layer
from image_finetune.models.rebuild import build_backbone_from_config, rebuild_backbone, rebuild_head
from image_finetune.models.stages import stage_names, stage_of, torchvision_stages
from image_finetune.recipe.heads import Head, linear_head
from image_finetune.recipe.losses import MultiLabelBCE, cross_entropy
from image_finetune.recipe.metrics import TASKS, AtThreshold, best_threshold, classification_metrics
from image_finetune.training.schedule import stage_lr_ratios

log = logging.getLogger(__name__)
# Epoch metrics are computed by torchmetrics across ranks before they are logged (see _log_epoch_metrics), so
# Lightning's advice to also pass sync_dist=True does not apply to them.
warnings.filterwarnings("ignore", message=r"It is recommended to use `self\.log\('(train|val|test)/")

SPLITS = ("train", "val", "test")
THRESHOLD_RULES = ("global", "per_label")


class ClassifierNet(nn.Module):
    """(Upsampling +) normalisation + backbone + head (``recipe/heads.py``): the whole inference network, exported as is.

    Input is float RGB in [0, 1], NCHW. Normalising inside the network means the mean/std of the backbone's
    pretrained weights travel with the checkpoint and the exported model, so serving code cannot get them wrong.
    ``upsample_to`` does the same for low-resolution data (CIFAR's 32 px shown to an ImageNet backbone at 160): the
    bilinear upsampling is part of the network, so training, eval, predict and every export upsample identically
    and the model's input stays the data's own size. (It is meant for upsampling: no antialiasing, so an input larger
    than ``upsample_to`` would be shrunk poorly; exports trace it at the data's size.)
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        mean: Sequence[float],
        std: Sequence[float],
        upsample_to: int | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        if upsample_to is not None and upsample_to < 1:
            raise ConfigError(
                f"model.upsample_to={upsample_to} must be a positive size in pixels, or null for no upsampling"
            )
        self.upsample_to = upsample_to

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's pooled features (what the head sees): the embeddings ``find_issues.py`` compares images by."""
        if self.upsample_to is not None and images.shape[-2:] != (self.upsample_to, self.upsample_to):
            images = F.interpolate(
                images, size=(self.upsample_to, self.upsample_to), mode="bilinear", align_corners=False
            )
        return self.backbone((images - self.mean) / self.std)


def batch_mixing(
    num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, prob: float = 1.0
) -> v2.Transform | None:
    """MixUp and/or CutMix (one of them per batch, chosen at random) applied to a batch with probability ``prob``.

    Works on the device, on the float batch, and returns soft targets (rows sum to one). Random numbers come from the
    global generator, which ``ReseedEveryBatch`` reseeds per batch, so a resumed run mixes exactly as an
    uninterrupted one. None when both alphas are 0 (off).
    """
    if mixup_alpha < 0 or cutmix_alpha < 0 or not 0 <= prob <= 1:
        raise ConfigError(
            f"model.mixup: mixup_alpha={mixup_alpha} and cutmix_alpha={cutmix_alpha} must be >= 0 (0 = off) "
            f"and prob={prob} in [0, 1]"
        )
    choices = ((v2.MixUp, mixup_alpha), (v2.CutMix, cutmix_alpha))
    mixers = [mixer(alpha=alpha, num_classes=num_classes) for mixer, alpha in choices if alpha > 0]
    if not mixers or prob == 0:
        return None
    return v2.RandomApply([v2.RandomChoice(mixers)], p=prob)


class ImageClassifier(L.LightningModule):
    """Fine-tunes a backbone (``model.backbone``) with a head (``model.head``), a loss (``model.loss``) and metrics
    (``model.metrics``), each built by its config's ``_target_`` and handed in; the module looks inside none of them.

    The head and the loss need what only the data knows, so they are given as recipes: a ``heads.Head`` (made once the
    class count is known) and a partial called as ``loss(class_counts=...)`` at the start of a fit (``losses.py``).
    ``class_names`` and ``preprocessing`` may be left out: they are then taken in ``setup`` from the data module, so no
    config hard-codes ``num_classes``. Both are stored in the checkpoint's hparams as plain values, with the backbone's
    and the head's builder configs, so that a checkpoint alone is enough to rebuild the network and predict.

    ``lr`` is the head's learning rate (``model.lr``, which the configs set from ``model.optimizer.lr``); the backbone
    gets ``lr * backbone_lr_ratio``. ``scheduler`` is a partial called as ``scheduler(optimizer, total_steps=N)``, or
    as ``scheduler(optimizer)`` with ``scheduler_takes_total_steps=False`` (torch's StepLR, ReduceLROnPlateau, ...).

    Of the fine-tuning schedule the model knows only what it acts on: how many of the backbone's last stages train in
    this fit (``set_trainable_stages``, called by ``finetune.fit_phase``), ``train_bn``, and each stage's LR
    (``backbone_lr_ratio`` spread over the stages by ``lr_spread``, see ``schedule.stage_lr_ratios``).

    ``init_from`` (``model.init_from``) is only recorded here: the weights of a finished run are loaded into a fresh
    run by ``init_from.InitFrom`` (added by ``train.build``), never by the model, so rebuilding a model from its
    checkpoint (eval, predict, export, resume) never reads that file again.
    """

    def __init__(
        self,
        backbone: Backbone | Mapping[str, Any],
        class_names: Sequence[str] | None = None,
        head: Head | Mapping[str, Any] | None = None,
        loss: Callable[..., nn.Module] = cross_entropy,
        metrics: Callable[[int, str], MetricCollection] = classification_metrics,
        lr: float = 1e-3,
        train_bn: bool = True,
        backbone_lr_ratio: float = 0.1,
        lr_spread: str = "flat",
        optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.AdamW,
        scheduler: Callable[..., Any] | None = None,
        scheduler_takes_total_steps: bool = True,
        scheduler_interval: str = "step",
        scheduler_monitor: str = "val/loss",
        dropout: float = 0.2,
        mixup: Mapping[str, float] | None = None,
        upsample_to: int | None = None,
        compile: bool = False,
        channels_last: bool = False,
        preprocessing: Preprocessing | Mapping[str, Any] | None = None,
        init_from: str | None = None,
        task: str | None = None,
        threshold: str | None = None,
        decision_threshold: float | Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        threshold = threshold or "global"  # null in the config: one threshold for every label
        if task is not None and task not in TASKS:
            raise ConfigError(f"task={task!r}: use multiclass or multilabel (training takes it from the data)")
        if threshold not in THRESHOLD_RULES:
            raise ConfigError(
                f"model.threshold={threshold!r}: use global (one decision threshold for every label, chosen on the "
                "validation split for the best micro F1) or per_label (each label's own best F1)"
            )
        stage_lr_ratios(1, backbone_lr_ratio, lr_spread)  # a bad value fails here, with the key's name
        # Hydra instantiates model.backbone's _target_; a plain mapping (tests, old configs) goes through the allow-list
        self._backbone = backbone if isinstance(backbone, Backbone) else build_backbone_from_config(backbone)
        self._head = head if isinstance(head, Head) else linear_head() if head is None else rebuild_head(head)
        unknown = sorted(set(mixup or {}) - {"mixup_alpha", "cutmix_alpha", "prob"})
        if unknown:
            raise ConfigError(f"model.mixup has unknown keys {unknown}: use mixup_alpha, cutmix_alpha and prob")
        prep = Preprocessing.coerce(preprocessing)
        # Stem first, last stage last (see models/stages.py): the unit of discriminative LRs and gradual unfreezing.
        self.stages = self._backbone.stages or torchvision_stages(self._backbone.module)
        # Plain containers only: checkpoints must load with torch.load(weights_only=True).
        self.save_hyperparameters(
            {
                "backbone": dict(self._backbone.config),
                "head": dict(self._head.config),
                "class_names": list(class_names) if class_names is not None else None,
                "preprocessing": prep.as_dict() if prep is not None else None,
                "lr": lr,
                "train_bn": train_bn,
                "backbone_lr_ratio": backbone_lr_ratio,
                "lr_spread": lr_spread,
                "dropout": dropout,
                "mixup": dict(mixup or {}),
                "upsample_to": upsample_to,
                "compile": compile,
                "channels_last": channels_last,
                "scheduler_interval": scheduler_interval,
                "scheduler_monitor": scheduler_monitor,
                # whether pretrained weights were really loaded (the offline demo may fall back to random init)
                "pretrained": self._backbone.pretrained,
                # the finished run this one started from (model.init_from; provenance only, never read back)
                "init_from": None if init_from is None else str(init_from),
                # multiclass | multilabel: from the data (data.task), None until the data module is known
                "task": task,
                # multi-label: how the decision threshold is chosen (model.threshold), and the chosen value(s), set
                # on the validation split at the end of every validation epoch so each checkpoint holds its own
                "threshold": threshold,
                "decision_threshold": _plain_threshold(decision_threshold),
            }
        )
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scheduler_takes_total_steps = scheduler_takes_total_steps
        self.loss_factory = loss
        self.metrics_factory = metrics
        self.net: ClassifierNet | None = None
        self.criterion: nn.Module | None = None
        """The training loss, made by ``loss(class_counts=...)`` at the first fit."""
        self.mixing: v2.Transform | None = None
        self.metrics = nn.ModuleDict()
        self.losses = nn.ModuleDict()
        self._trainable_stages: int | None = None
        if class_names is not None:
            self._build_head(len(class_names))

    # ---- construction -------------------------------------------------------------------------------------------
    def _build_head(self, num_classes: int) -> None:
        if num_classes < 2:
            raise ConfigError(f"need at least 2 classes to train a classifier, got {num_classes}")
        b = self._backbone
        head = self._head.make(b.num_features, num_classes, self.hparams.dropout)
        self.net = ClassifierNet(b.module, head, b.mean, b.std, self.hparams.upsample_to)
        # multi-hot targets are mixed linearly as they are (torchvision's MixUp/CutMix take 2-D float targets)
        self.mixing = batch_mixing(num_classes, **self.hparams.mixup)
        task = {"task": "multilabel"} if self.multilabel else {}  # the default single-label call stays as it was
        self.metrics = nn.ModuleDict(
            {f"{split}_metrics": self.metrics_factory(num_classes, split, **task) for split in SPLITS}
        )
        self._val_scores: list[tuple[torch.Tensor, torch.Tensor]] = []
        # nan_strategy="disable": the NaN check reads a flag back from the GPU every step; a NaN loss shows as NaN.
        self.losses = nn.ModuleDict({f"{split}_loss": MeanMetric(nan_strategy="disable") for split in SPLITS})

    @property
    def class_names(self) -> list[str]:
        return list(self.hparams.class_names or [])

    @property
    def multilabel(self) -> bool:
        """Whether the data is multi-label (``data.task``): sigmoid per label, BCE, a decision threshold."""
        return self.hparams.get("task") == "multilabel"

    @property
    def decision_threshold(self) -> float | list[float]:
        """Multi-label: the threshold(s) over which a label is predicted (0.5 until a validation epoch chose one)."""
        value = self.hparams.get("decision_threshold")
        return 0.5 if value is None else value

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Sigmoid per label (multi-label) or softmax over the classes, in float32."""
        return logits.float().sigmoid() if self.multilabel else logits.float().softmax(dim=-1)

    @property
    def backbone(self) -> Backbone:
        return self._backbone

    @property
    def preprocessing(self) -> Preprocessing:
        """What the network's inputs are made with: the stored values once known, else the backbone's own."""
        stored = self.hparams.get("preprocessing")
        return Preprocessing.from_dict(stored) if stored else self._backbone.preprocessing

    @property
    def trainable_stages(self) -> int | None:
        """How many of the backbone's last stages train (None: all; 0: frozen); see ``set_trainable_stages``."""
        return self._trainable_stages

    def set_trainable_stages(self, stages: int | None) -> None:
        """The freeze state of the next fit (``finetune.fit_phase`` calls it per phase); applied in ``setup``."""
        self._trainable_stages = stages

    def make_loss(self, class_counts: Sequence[int], num_images: int | None = None) -> None:
        """The training loss, from the training split's images per class (``setup`` calls it at the first fit); for
        multi-label data the images holding each label, and ``num_images`` (``loss=bce``'s balanced pos_weight)."""
        multilabel_loss = ConfigError("the data is multi-label (several labels per image): train with loss=bce")
        if not self.multilabel:
            self.criterion = self.loss_factory(class_counts=list(class_counts))
        else:
            try:
                self.criterion = self.loss_factory(class_counts=list(class_counts), num_images=num_images)
            except TypeError as e:  # a single-label loss (cross_entropy, focal) takes no num_images
                if "num_images" not in str(e):
                    raise
                raise multilabel_loss from None
        if self.multilabel != isinstance(self.criterion, MultiLabelBCE):
            raise (
                multilabel_loss
                if self.multilabel
                else ConfigError(
                    "loss=bce is for multi-label data (data=csv with several labels per row): use "
                    "loss=cross_entropy or loss=focal, or set data.task=multilabel"
                )
            )

    def disable_scheduler(self) -> None:
        """Train with no LR scheduler from the next fit on (the LR finder's sweeps set the LRs themselves)."""
        self.scheduler_factory = None

    def configure_model(self) -> None:
        """Size the head from the data module's classes (once). Lightning's hook for creating layers: callbacks that
        copy the model in their ``setup`` (``EMAWeights``) call it, as ``setup`` does, so the copy has the head."""
        if self.net is not None:
            return
        datamodule = self._data()
        names = list(datamodule.class_names) if datamodule is not None else []
        if not names:
            raise ConfigError(
                "model.class_names is not set and the model is fit without a data module that names the classes "
                "(one keeping data.contract.ClassificationData)"
            )
        self.hparams["class_names"] = names
        if self.hparams.get("task") is None:
            self.hparams["task"] = datamodule.task
        self._build_head(len(names))

    def _data(self) -> ClassificationData | None:
        """The trainer's data module when it keeps the data contract; None when fit on bare dataloaders."""
        datamodule = self.trainer.datamodule
        return datamodule if isinstance(datamodule, ClassificationData) else None

    def setup(self, stage: str) -> None:
        """Size the head from the data (once), then prepare this fit: the loss, freeze state, memory format, compile.

        Runs at the start of every ``fit``, before Lightning moves the model or wraps it in DDP; see ``finetune.py``
        for why each fine-tuning phase is its own ``fit``.
        """
        datamodule = self._data()
        self.configure_model()
        if not self.hparams.get("preprocessing"):
            # The data module's (the backbone's at data.image_size): what eval, predict and exports must repeat.
            data_prep = Preprocessing.coerce(datamodule.preprocessing) if datamodule is not None else None
            self.hparams["preprocessing"] = (data_prep or self._backbone.preprocessing).as_dict()
        assert self.net is not None
        if stage == "fit" and self.criterion is None:
            counts = datamodule.class_counts() if datamodule is not None else None
            num_images = len(datamodule.datasets["train"]) if datamodule is not None and self.multilabel else None
            self.make_loss(counts or [0] * len(self.class_names), num_images)
        if self.hparams.channels_last:
            self.net.to(memory_format=torch.channels_last)
        self._apply_freeze()
        if self.hparams.compile and stage == "fit":
            # A fresh graph per phase: dynamo may reuse a graph traced under the old requires_grad (pytorch#139476).
            # nn.Module.compile compiles in place: the state_dict keeps its names (no ``_orig_mod.*``).
            torch._dynamo.reset()
            self.net.compile()

    # ---- fine-tuning state ----------------------------------------------------------------------------------------
    def _first_trainable_stage(self) -> int:
        n = self.trainable_stages
        return 0 if n is None else max(0, len(self.stages) - n)

    def _stage(self, name: str) -> int:
        """The stage of a parameter name (or ``module_name + "."``); names in no stage count as the last stage."""
        stage = stage_of(name, self.stages)
        return len(self.stages) - 1 if stage is None else stage

    def _apply_freeze(self) -> None:
        """Apply ``trainable_stages`` (set by ``finetune.fit`` before each fit) to the parameters and layer modes.

        Frozen weights get ``requires_grad=False``, so autograd computes no gradient for them and the optimizer (which
        holds every group from the start) skips them. With ``train_bn`` the norm layers (BatchNorm of torchvision and
        timm, GroupNorm, LayerNorm: ``norms.is_norm_layer``) keep training.
        """
        assert self.net is not None
        first = self._first_trainable_stage()
        for module_name, module in self.net.backbone.named_modules():
            norm_trains = self.hparams.train_bn and is_norm_layer(module)
            for name, p in module.named_parameters(prefix=module_name, recurse=False):
                p.requires_grad_(norm_trains or self._stage(name) >= first)
        self.train(self.training)

    def train(self, mode: bool = True) -> ImageClassifier:
        """Keep frozen backbone layers in eval mode so their BatchNorm statistics do not drift (Lightning #15062).

        Each module's mode is set on its own (``module.training``, not the recursive ``eval()``), so a BatchNorm inside
        a frozen block still trains its statistics with ``train_bn``.
        """
        super().train(mode)
        if mode and self.trainable_stages is not None and self.net is not None:
            first = self._first_trainable_stage()
            for module_name, module in self.net.backbone.named_modules():
                stage = stage_of(f"{module_name}.", self.stages) if module_name else None
                if stage is not None and stage < first and not (self.hparams.train_bn and is_norm_layer(module)):
                    module.training = False
        return self

    # ---- steps ----------------------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        assert self.net is not None
        return self.net(images)

    def _shared_step(self, batch: tuple[torch.Tensor, torch.Tensor], split: str) -> dict[str, torch.Tensor]:
        """Loss and metric updates for any split; returns what callbacks need (loss, logits) from ``outputs``."""
        images, targets = batch
        logits = self(images)
        if self.multilabel:
            return self._multilabel_step(logits, targets, split)
        # targets: class indices, or class probabilities after mixup/cutmix (training only). The configured loss
        # (label smoothing, focal, ...) is the training objective; val/test report plain cross-entropy, so runs with
        # different losses stay comparable and eval.py reports the same number from the checkpoint alone.
        if split == "train":
            assert self.criterion is not None, "setup('fit') makes the loss"
            loss = self.criterion(logits, targets)
        else:
            loss = F.cross_entropy(logits, targets)
        # A mixed image counts as its dominant class (the larger share) for the train metrics.
        labels = targets.argmax(dim=-1) if targets.is_floating_point() else targets
        self.metrics[f"{split}_metrics"].update(logits.detach(), labels)
        self.losses[f"{split}_loss"].update(loss.detach(), weight=targets.shape[0])
        if split == "train":
            # Not on the progress bar: Lightning turns progress-bar values into Python numbers after every batch, a
            # GPU->host sync per step; loggers read it only every trainer.log_every_n_steps.
            self.log("train/loss_step", loss, on_step=True, on_epoch=False, batch_size=targets.shape[0])
        return {"loss": loss, "logits": logits.detach()}

    def _multilabel_step(self, logits: torch.Tensor, targets: torch.Tensor, split: str) -> dict[str, torch.Tensor]:
        """``_shared_step`` for multi-hot targets: the configured loss (``bce``) trains, val/test report plain BCE; a
        mixed target counts its labels over one half for the train metrics. Val keeps its probabilities for the
        threshold chosen at the epoch's end (``_choose_threshold``)."""
        targets = targets.float()
        if split == "train":
            assert self.criterion is not None, "setup('fit') makes the loss"
            loss = self.criterion(logits, targets)
        else:
            loss = F.binary_cross_entropy_with_logits(logits.float(), targets)
        labels = (targets >= 0.5).long()
        self.metrics[f"{split}_metrics"].update(logits.detach(), labels)
        self.losses[f"{split}_loss"].update(loss.detach(), weight=targets.shape[0])
        if split == "val":
            self._val_scores.append((logits.detach().float().sigmoid(), labels))
        if split == "train":
            self.log("train/loss_step", loss, on_step=True, on_epoch=False, batch_size=targets.shape[0])
        return {"loss": loss, "logits": logits.detach()}

    def _choose_threshold(self) -> None:
        """Multi-label, at the end of a validation epoch: the decision threshold(s) with the best F1 on that epoch's
        validation images (``model.threshold``: one global value for micro F1, or per label), stored in the hparams,
        so the checkpoint saved after this validation holds the threshold chosen for its weights."""
        scores, self._val_scores = self._val_scores, []
        if not scores or self.trainer.sanity_checking:
            return
        probs = torch.cat([p for p, _ in scores])
        labels = torch.cat([t for _, t in scores])
        if self.trainer.world_size > 1:  # every rank's images (the sampler gives each rank the same count)
            probs, labels = (self.all_gather(x).flatten(0, 1) for x in (probs, labels))
        chosen = best_threshold(probs, labels, per_label=self.hparams.threshold == "per_label")
        self.hparams["decision_threshold"] = chosen
        for logger in self.loggers:  # per-label AP: scalars out of callback_metrics (as PerClassAccuracy's)
            logger.log_metrics(per_label_ap(probs, labels, self.class_names), step=self.global_step)

    def _log_epoch_metrics(self, split: str) -> None:
        """Compute (synchronised across ranks) and log one split's epoch metrics, then reset them.

        Metrics are computed here, in a hook every rank runs, and logged as plain numbers. Logging the metric objects
        instead would let Lightning compute them lazily, and the first to ask is the progress bar, which runs on rank
        0 only: its collective calls then never meet the other ranks' and DDP hangs (Lightning #21264).
        """
        metrics, loss = self.metrics[f"{split}_metrics"], self.losses[f"{split}_loss"]
        if loss.update_count == 0:  # e.g. limit_val_batches=0
            return
        if self.multilabel:
            if split == "val":
                self._choose_threshold()
            threshold = torch.as_tensor(self.decision_threshold, device=self.device)
            for metric in metrics.values():
                if isinstance(metric, AtThreshold):
                    metric.threshold = threshold
        values = {**metrics.compute(), f"{split}/loss": loss.compute()}
        self.log_dict(values, prog_bar=split != "test")
        metrics.reset()
        loss.reset()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        if self.mixing is not None:  # after TrainImageGrid has drawn the batch: the grid shows the unmixed images
            batch = self.mixing(*batch)
        return self._shared_step(batch, "train")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        return self._shared_step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        return self._shared_step(batch, "test")

    def on_train_epoch_end(self) -> None:
        self._log_epoch_metrics("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test")

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self.probabilities(self(images))

    # ---- optimisation ---------------------------------------------------------------------------------------------
    def param_groups(self, lr: float | None = None, backbone_lr_ratio: float | None = None) -> list[dict[str, Any]]:
        """Named groups ``head`` and ``backbone`` (one per stage, ``backbone.<stage>``, with ``lr_spread=geometric``),
        each with a ``/no_decay`` twin, all present from the first step.

        The backbone groups exist even while frozen so that resuming, every LR scheduler and ``LearningRateMonitor``
        see the same groups in every phase. Biases and norm weights (1-D tensors) get no weight decay. ``lr`` and
        ``backbone_lr_ratio`` default to the configured ones (the LR finder sweeps them).
        """
        assert self.net is not None
        lr = self.hparams.lr if lr is None else lr
        ratio = self.hparams.backbone_lr_ratio if backbone_lr_ratio is None else backbone_lr_ratio
        spread = self.hparams.lr_spread
        ratios, names = stage_lr_ratios(len(self.stages), ratio, spread), stage_names(self.stages)
        groups: dict[str, dict[str, Any]] = {}

        def add(key: str, group_lr: float, p: nn.Parameter) -> None:
            key = key if p.ndim > 1 else f"{key}/no_decay"
            group = groups.setdefault(key, {"name": key, "params": [], "lr": group_lr})
            if p.ndim <= 1:
                group["weight_decay"] = 0.0
            group["params"].append(p)

        for p in self.net.head.parameters():
            add("head", lr, p)
        for name, p in self.net.backbone.named_parameters():
            stage = self._stage(name)
            add("backbone" if spread == "flat" else f"backbone.{names[stage]}", lr * ratios[stage], p)
        return list(groups.values())

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.param_groups())
        if self.scheduler_factory is None:
            return optimizer
        if self.scheduler_takes_total_steps:
            scheduler = self.scheduler_factory(optimizer, total_steps=int(self.trainer.estimated_stepping_batches))
        else:
            scheduler = self.scheduler_factory(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {
                "scheduler": scheduler,
                "interval": self.hparams.scheduler_interval,
                "monitor": self.hparams.scheduler_monitor,
            },
        }

    # ---- loading --------------------------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: str | torch.device = "cpu") -> ImageClassifier:
        """Load for inference: safe (``weights_only=True``), offline (no weight download), class names included."""
        path = Path(path).expanduser()
        checkpoint = read_checkpoint(path)
        hparams = dict(checkpoint.get("hyper_parameters") or {})
        if "backbone" not in hparams or not hparams.get("class_names"):
            raise UserError(
                f"{path} is not a checkpoint of image_finetune.ImageClassifier (no backbone/class_names hparams)"
            )
        # An allow-listed builder, no weights (they come from the checkpoint): nothing read from disk chooses code.
        backbone = rebuild_backbone(hparams["backbone"], source=str(path))
        model = cls(
            backbone=backbone,
            # checkpoints from before heads were configurable hold the dropout + linear head
            head=rebuild_head(hparams.get("head") or linear_head().config, source=str(path)),
            class_names=hparams["class_names"],
            preprocessing=hparams.get("preprocessing"),
            dropout=hparams.get("dropout", 0.0),
            upsample_to=hparams.get("upsample_to"),
            channels_last=hparams.get("channels_last", False),
            task=hparams.get("task") or "multiclass",
            threshold=hparams.get("threshold", "global"),
            decision_threshold=hparams.get("decision_threshold"),
        )
        model.hparams["pretrained"] = hparams.get("pretrained")
        model.hparams["init_from"] = hparams.get("init_from")  # provenance as trained; the file is not read
        model.hparams["backbone"] = dict(hparams["backbone"])  # as trained (its weights name), not as rebuilt
        check_weights_fit(
            model, checkpoint["state_dict"], source=str(path), expected=f"{_describe(hparams)}, as its hparams say"
        )
        model.load_state_dict(checkpoint["state_dict"])
        return model.to(map_location).eval()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resuming or testing a checkpoint of another architecture or class count: say what differs, not 100 tensors."""
        if self.multilabel:  # testing or resuming a checkpoint: its own threshold, chosen for its weights
            stored = (checkpoint.get("hyper_parameters") or {}).get("decision_threshold")
            self.hparams["decision_threshold"] = _plain_threshold(stored)
        if self.net is not None and self.strict_loading:
            theirs = _describe(checkpoint.get("hyper_parameters") or {})
            ours = _describe(self.hparams)
            check_weights_fit(
                self, checkpoint["state_dict"], source=f"the checkpoint ({theirs})", expected=f"this model ({ours})"
            )


def _plain_threshold(value: float | Sequence[float] | None) -> float | list[float] | None:
    """A threshold as a checkpoint stores it (``weights_only`` loads plain floats and lists)."""
    if value is None or isinstance(value, (int, float)):
        return None if value is None else float(value)
    return [float(v) for v in value]


def per_label_ap(probs: torch.Tensor, labels: torch.Tensor, names: Sequence[str]) -> dict[str, float]:
    """``val/ap/<label>``: each label's average precision (labels without positives left out)."""
    values = multilabel_average_precision(probs, labels, len(names), average=None, thresholds=None)
    present = labels.bool().any(0).tolist()
    return {f"val/ap/{name.replace('/', '_')}": v for name, v, has in zip(names, values.tolist(), present) if has}


def _describe(hparams: Mapping[str, Any]) -> str:
    """'resnet18, 10 classes': what a user recognises a checkpoint by."""
    name = (hparams.get("backbone") or {}).get("name", "unknown backbone")
    return f"{name}, {len(hparams.get('class_names') or [])} classes"


def check_weights_fit(module: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str, expected: str) -> None:
    """Raise a ``UserError`` naming what differs (class count, architecture) if ``state_dict`` cannot load into ``module``.

    ``load_state_dict`` would list every mismatched tensor; a user needs "3 classes, not 10" or "another backbone".
    """
    own = module.state_dict()
    shapes = {
        k: (tuple(state_dict[k].shape), tuple(v.shape))
        for k, v in own.items()
        if k in state_dict and state_dict[k].shape != v.shape
    }
    missing, unexpected = [k for k in own if k not in state_dict], [k for k in state_dict if k not in own]
    problems = []
    # The head's keys (``head.*``, ``net.head.*``): its last weight maps features to classes (recipe/heads.py).
    in_head = {k for k in (*own, *unexpected) if k.removeprefix("net.").startswith("head.")}
    if in_head:
        head_weights = [k for k in own if k in in_head and k.endswith("weight") and own[k].ndim == 2]
        last = head_weights[-1] if head_weights else None
        tail = (last, last.removesuffix("weight") + "bias") if last else ()
        others = [k for k in (*shapes, *missing, *unexpected) if k in in_head and k not in tail]
        if last in shapes and not others:
            (n, width), (own_n, own_width) = shapes.pop(last)
            shapes.pop(last.removesuffix("weight") + "bias", None)
            problems.append(f"its head is {width}->{n} ({n} classes), not {own_width}->{own_n} ({own_n} classes)")
        elif any(k in in_head for k in (*shapes, *missing, *unexpected)):
            theirs = [k for k in state_dict if k in in_head]
            problems.append(
                f"its head is another head ({len(theirs)} tensors, {', '.join(theirs[-2:]) or 'none'}; this model's "
                f"has {len([k for k in own if k in in_head])})"
            )
        shapes = {k: v for k, v in shapes.items() if k not in in_head}
        missing, unexpected = [k for k in missing if k not in in_head], [k for k in unexpected if k not in in_head]
    if shapes or missing or unexpected:
        examples = [f"{k} is {list(a)}, not {list(b)}" for k, (a, b) in shapes.items()][:2] + [
            f"{k} is missing" for k in missing[:1]
        ]
        problems.append(
            f"its backbone is another architecture ({len(shapes)} tensors of another shape, {len(missing)} missing, "
            f"{len(unexpected)} unexpected; e.g. {'; '.join(examples or unexpected[:1])})"
        )
    if problems:
        raise UserError(f"{source} does not fit {expected}: {'; '.join(problems)}")
