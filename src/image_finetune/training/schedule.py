"""The fine-tuning schedule as plain data: which backbone stages train in which epochs, and the stages' learning rates.

A leaf module (no torch, no Lightning): ``train`` builds a ``FinetuneSchedule`` from the ``finetune`` config group and
hands it to ``finetune.fit``, which runs one ``Trainer.fit`` per ``Phase``. The model only learns, before each fit,
how many of its last stages train (see ``finetune.py`` for why the phases are separate fits).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from image_finetune.core.errors import ConfigError

ALL = "all"
LR_SPREADS = ("flat", "geometric")


@dataclass(frozen=True)
class Phase:
    """Epochs ``[start, end)`` (``end=None``: until ``trainer.max_epochs``) with the last ``stages`` backbone stages
    training; ``stages=0`` is a frozen backbone, ``None`` the whole backbone."""

    start: int
    end: int | None
    stages: int | None

    @property
    def frozen(self) -> bool:
        return self.stages == 0

    def describe(self) -> str:
        if self.stages is None:
            return "the whole backbone"
        return "no backbone stage" if self.frozen else f"the last {self.stages} backbone stage(s)"


@dataclass(frozen=True)
class FinetuneSchedule:
    """``freeze_epochs`` epochs with the backbone frozen, then the stages unfreeze as ``unfreeze`` says.

    ``unfreeze`` lists ``(epoch, stages)`` steps: from ``epoch`` on, the last ``stages`` stages train (``all`` or
    ``None``: the whole backbone), e.g. ``((1, 1), (2, 2), (3, None))``: layer4 at epoch 1, layer3 too at epoch 2,
    everything at epoch 3 (ULMFiT's gradual unfreezing). Left out, it is the simple case: everything unfreezes at
    ``freeze_epochs``; ``freeze_epochs=0`` trains everything from the start (``finetune=full``) and
    ``freeze_epochs=null`` never unfreezes (``finetune=linear_probe``).
    """

    freeze_epochs: int | None = 1
    unfreeze: tuple[tuple[int, int | None], ...] | None = None

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> FinetuneSchedule:
        """From the ``finetune`` config group (other keys, such as ``train_bn``, are the model's)."""
        steps = cfg.get("unfreeze")
        if steps is not None:
            steps = tuple(_step(step) for step in steps)
        return cls(freeze_epochs=cfg.get("freeze_epochs", 1), unfreeze=steps)

    def __post_init__(self) -> None:
        if self.freeze_epochs is not None and self.freeze_epochs < 0:
            raise ConfigError(f"finetune.freeze_epochs must be >= 0 or null, got {self.freeze_epochs}")
        if self.unfreeze is None:
            return
        epochs = [epoch for epoch, _ in self.unfreeze]
        stages = [float("inf") if n is None else n for _, n in self.unfreeze]
        if not self.unfreeze or epochs != sorted(set(epochs)) or stages != sorted(set(stages)) or stages[0] < 1:
            raise ConfigError(
                f"finetune.unfreeze={_show(self.unfreeze)}: give [epoch, stages] steps with rising epochs and rising "
                "stage counts (>= 1, or all), e.g. [[1, 1], [2, 2], [3, all]]"
            )
        if self.freeze_epochs != epochs[0]:
            raise ConfigError(
                f"finetune.unfreeze starts at epoch {epochs[0]} but finetune.freeze_epochs={self.freeze_epochs}: set "
                f"finetune.freeze_epochs={epochs[0]} (the frozen phase ends where the first stage unfreezes)"
            )

    def steps(self) -> tuple[tuple[int, int | None], ...]:
        """The unfreeze steps, the simple case included: ``freeze_epochs=1`` is ``((1, None),)``."""
        if self.unfreeze is not None:
            return self.unfreeze
        return () if self.freeze_epochs is None else ((self.freeze_epochs, None),)

    def phases(self) -> tuple[Phase, ...]:
        """One ``Phase`` per ``Trainer.fit``: frozen until the first step, then one per step (empty ones dropped)."""
        starts = [(0, 0), *self.steps()]
        ends = [epoch for epoch, _ in starts[1:]] + [None]
        phases = (Phase(start, end, stages) for (start, stages), end in zip(starts, ends))
        return tuple(phase for phase in phases if phase.end is None or phase.end > phase.start)

    def unreached(self, max_epochs: int | None) -> list[str]:
        """Warnings for the steps a run of ``max_epochs`` epochs never reaches (it ends before they start)."""
        if not max_epochs or max_epochs <= 0:
            return []
        if self.freeze_epochs is not None and max_epochs <= self.freeze_epochs:
            return [
                f"finetune.freeze_epochs={self.freeze_epochs} >= trainer.max_epochs={max_epochs}: the backbone never "
                "unfreezes. Raise trainer.max_epochs, lower finetune.freeze_epochs, or say finetune=linear_probe if a "
                "frozen backbone is what you want"
            ]
        late = [epoch for epoch, _ in self.steps() if epoch >= max_epochs]
        if not late:
            return []
        return [
            f"finetune.unfreeze steps at epoch(s) {', '.join(map(str, late))} (counted from 0) start at or after "
            f"trainer.max_epochs={max_epochs}: those stages never unfreeze. Raise trainer.max_epochs or move the steps "
            "earlier"
        ]

    def phase_at(self, epoch: int) -> int:
        """Index of the phase that trains ``epoch`` (a resumed run starts there)."""
        return max(i for i, phase in enumerate(self.phases()) if phase.start <= epoch)


def stage_lr_ratios(num_stages: int, backbone_lr_ratio: float, spread: str = "flat") -> tuple[float, ...]:
    """Each backbone stage's LR as a fraction of the head's, stem first.

    ``flat``: every stage at ``backbone_lr_ratio``. ``geometric``: fastai's ``slice(lr * ratio, lr)`` over the stages
    and the head, i.e. the stem at ``ratio`` and each later stage ``ratio ** (1 / num_stages)`` times the one before,
    so the last stage is one such step below the head; the same as timm's layer-wise decay with
    ``decay = ratio ** (1 / num_stages)``.
    """
    if backbone_lr_ratio < 0:
        raise ConfigError(f"finetune.backbone_lr_ratio must be >= 0, got {backbone_lr_ratio}")
    if spread not in LR_SPREADS:
        raise ConfigError(f"finetune.lr_spread={spread!r} is not one of {', '.join(LR_SPREADS)}")
    if spread == "flat" or backbone_lr_ratio == 0:
        return (backbone_lr_ratio,) * num_stages
    return tuple(backbone_lr_ratio ** (1 - i / num_stages) for i in range(num_stages))


def _step(step: Any) -> tuple[int, int | None]:
    if not isinstance(step, Sequence) or isinstance(step, str) or len(step) != 2:
        raise ConfigError(f"finetune.unfreeze: each step is [epoch, stages], e.g. [2, 1] or [3, all]; got {step!r}")
    epoch, stages = step
    if stages == ALL or stages is None:
        stages = None
    elif not isinstance(stages, int) or isinstance(stages, bool):
        raise ConfigError(f"finetune.unfreeze: stages must be a count or 'all', got {stages!r} in {list(step)}")
    if not isinstance(epoch, int) or isinstance(epoch, bool):
        raise ConfigError(f"finetune.unfreeze: epoch must be an integer, got {epoch!r} in {list(step)}")
    return epoch, stages


def _show(steps: Sequence[tuple[int, int | None]]) -> str:
    return "[" + ", ".join(f"[{e}, {ALL if n is None else n}]" for e, n in steps) + "]"
