"""An LR finder that knows the fine-tuning schedule: ``python lr_find.py [experiment=...] [overrides]``.

1. From the initial state, with the backbone frozen as in the first phase, sweep the head's LR (the backbone groups
   follow at their configured ratios): suggests ``model.optimizer.lr``.
2. Train the frozen phase as ``train.py`` would (at the suggested LR, or the configured one with
   ``lr_find.train_frozen_with=configured``), then, from that state and with the next phase's stages unfrozen, keep the
   head at that LR and sweep the backbone's: suggests ``finetune.backbone_lr_ratio``.

Each sweep is an exponential ramp over ``lr_find.num_steps`` steps with fastai's smoothed loss, stopped when the loss
diverges; the suggestion is fastai's "valley" (the middle of the longest stretch where the loss keeps falling).

Why not Lightning's ``Tuner.lr_find``: it sets every param group to the same LR (``_LRFinder._exchange_scheduler``:
``new_lrs = [lr_min] * len(param_groups)``), which discards our head/stage ratios, and it runs its own fit and restores
a checkpoint around it, which is where it meets multi-fit schedules (Lightning #14674). A fresh ``Trainer`` per sweep
with a small callback that sets each group's LR keeps the ratios, the device, precision and compile handling.
"""

from __future__ import annotations

import logging
import math
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from image_finetune.core.cli import save_json, to_plain
from image_finetune.core.console import silence_lightning_noise
from image_finetune.core.errors import ConfigError
from image_finetune.core.plots import lr_find_figure, render_figure
from image_finetune.data.contract import ClassificationData
from image_finetune.models.classifier import ImageClassifier
from image_finetune.training import finetune
from image_finetune.training.init_from import init_from_callbacks
from image_finetune.training.schedule import FinetuneSchedule, Phase
from image_finetune.training.wiring import build_model_and_data

log = logging.getLogger(__name__)

APPLIED_KEYS = ("model.optimizer.lr", "finetune.backbone_lr_ratio")


@dataclass
class LRSweep:
    """The sweep's arithmetic, free of Lightning: the LR of each step, the smoothed losses, and the suggestion."""

    min_lr: float = 1e-7
    max_lr: float = 10.0
    num_steps: int = 100
    beta: float = 0.98  # fastai's loss smoothing
    diverge: float = 4.0  # stop once the smoothed loss exceeds this multiple of the best so far
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    _average: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.min_lr < self.max_lr or self.num_steps < 10:
            raise ConfigError(
                f"lr_find: need 0 < min_lr < max_lr and num_steps >= 10, got min_lr={self.min_lr}, "
                f"max_lr={self.max_lr}, num_steps={self.num_steps}"
            )

    def lr(self, step: int) -> float:
        """Exponential ramp from ``min_lr`` (step 0) to ``max_lr`` (the last step)."""
        return self.min_lr * (self.max_lr / self.min_lr) ** (step / (self.num_steps - 1))

    def record(self, lr: float, loss: float) -> bool:
        """Add one step's loss; True when the sweep is over (all steps done, or the loss diverged)."""
        self._average = self.beta * self._average + (1 - self.beta) * loss
        smoothed = self._average / (1 - self.beta ** (len(self.losses) + 1))
        self.lrs.append(lr)
        self.losses.append(smoothed)
        diverged = not math.isfinite(smoothed) or smoothed > self.diverge * min(self.losses)
        return diverged or len(self.losses) >= self.num_steps

    def suggestion(self) -> float | None:
        """fastai's valley: the LR halfway along the longest run of falling losses (None if the sweep is too short)."""
        losses = [x if math.isfinite(x) else math.inf for x in self.losses]
        n = len(losses)
        if n < 5:
            return None
        longest = [1] * n  # longest decreasing subsequence ending at each step
        best_end = 0
        for i in range(1, n):
            for j in range(i):
                if losses[i] < losses[j] and longest[i] < longest[j] + 1:
                    longest[i] = longest[j] + 1
            if longest[i] > longest[best_end]:
                best_end = i
        start = best_end - longest[best_end] + 1
        return self.lrs[start + (best_end - start) // 2]


class SweepCallback(L.Callback):
    """Sets every param group's LR from ``group_lrs(sweep_lr)`` before each step and records the loss after it.

    ``optimizer_state`` (the frozen phase's) is loaded into the sweep's fresh optimizer first, as the real run's
    unfrozen phase resumes it: a fresh Adam state would make the head's first steps jump and hide the backbone's
    effect. It always fits, because every param group exists from the first step.
    """

    def __init__(
        self,
        sweep: LRSweep,
        group_lrs: Callable[[float], Sequence[float]],
        optimizer_state: dict[str, Any] | None = None,
        label: str = "LR sweep",
    ) -> None:
        self.sweep, self.group_lrs, self.optimizer_state, self.label = sweep, group_lrs, optimizer_state, label

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.optimizer_state is not None:
            trainer.optimizers[0].load_state_dict(self.optimizer_state)
        sweep = self.sweep
        self._say(trainer, f"{sweep.num_steps} steps, lr {sweep.min_lr:.1e} to {sweep.max_lr:.1e}")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        lr = self.sweep.lr(len(self.sweep.losses))
        groups = trainer.optimizers[0].param_groups
        for group, group_lr in zip(groups, self.group_lrs(lr), strict=True):
            group["lr"] = group_lr

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = trainer.strategy.reduce(outputs["loss"].detach(), reduce_op="mean")  # every rank stops together
        sweep = self.sweep
        done = sweep.record(sweep.lr(len(sweep.losses)), float(loss))
        step = len(sweep.losses)
        if done or step % max(1, sweep.num_steps // 10) == 0:  # a line every 10% of the steps, and the last
            diverged = "; the loss diverged, sweep over" if done and step < sweep.num_steps else ""
            self._say(
                trainer, f"step {step}/{sweep.num_steps}, lr {sweep.lrs[-1]:.1e}, loss {sweep.losses[-1]:.3f}{diverged}"
            )
        if done:
            trainer.should_stop = True

    def _say(self, trainer: L.Trainer, what: str) -> None:
        """A plain line (minutes can pass between them on a CPU), like ``train.py``'s epoch lines; rank 0 only."""
        if trainer.is_global_zero:
            print(f"{self.label}: {what}", flush=True)


def lr_find(cfg: DictConfig) -> dict[str, Any]:
    """Run both sweeps; write ``lr_find.json`` and ``lr_find.png`` (also to TensorBoard) and print the overrides."""
    silence_lightning_noise()
    settings = dict(to_plain(cfg.lr_find))
    schedule = FinetuneSchedule.from_config(to_plain(cfg.finetune))
    phases = schedule.phases()
    out = Path(cfg.paths.output_dir)
    configured_lr = float(cfg.model.optimizer.lr)
    result: dict[str, Any] = {
        "configured": {
            "model.optimizer.lr": configured_lr,
            "finetune.backbone_lr_ratio": float(cfg.finetune.backbone_lr_ratio),
        }
    }
    lr = configured_lr

    def model_config(lr: float, scheduled: bool = False) -> DictConfig:
        """The configured model at head LR ``lr``; no LR scheduler during a sweep (the sweep sets the LRs)."""
        model_cfg = OmegaConf.create(to_plain(cfg.model))
        model_cfg.optimizer.lr = lr
        model_cfg.lr = lr  # model.lr is ${.optimizer.lr}, already resolved by to_plain
        if not scheduled:
            model_cfg.scheduler = None
        return model_cfg

    def fresh_model(lr: float, scheduled: bool = False) -> ImageClassifier:
        L.seed_everything(cfg.seed, workers=True)  # every sweep starts from the same head initialisation
        return instantiate(model_config(lr, scheduled))

    # The data module gets the model's preprocessing (a timm backbone's crop and interpolation), as train.py's does.
    L.seed_everything(cfg.seed, workers=True)
    first_model, datamodule = build_model_and_data(cfg.data, model=model_config(lr))
    # model.init_from: read once, applied to each fresh model's first fit
    init_from = init_from_callbacks(cfg.model.get("init_from"), first_model.backbone)

    model: ImageClassifier | None = None
    optimizer_state: dict[str, Any] | None = None
    sweeps = 2 if phases[0].frozen and len(phases) > 1 else 1
    if phases[0].frozen:
        model = first_model
        model.set_trainable_stages(0)
        frozen = _sweep(
            cfg,
            settings,
            model,
            datamodule,
            lambda x: [g["lr"] for g in model.param_groups(lr=x)],
            init_from=init_from,
            label=f"LR sweep 1/{sweeps} (head, backbone frozen)",
        )
        result["frozen"] = {"what": "model.optimizer.lr (the head's lr; backbone groups at their ratios)", **frozen}
        if frozen["suggestion"] is not None and settings["train_frozen_with"] == "suggested":
            lr = frozen["suggestion"]
        if len(phases) == 1:
            model = None  # linear probe: nothing unfreezes
        else:
            log.info("Training the frozen phase (epochs 1-%d) at lr=%.3g for the second sweep", phases[0].end, lr)
            model = fresh_model(lr, scheduled=True)
            progress = (cfg.get("callbacks") or {}).get("progress_bar")  # train.py's bar, or its plain epoch lines
            bar = [instantiate(progress, stop_epoch=phases[0].end)] if progress else []
            trainer = _trainer(cfg, callbacks=[*init_from, *bar], enable_progress_bar=bool(bar))
            finetune.fit_phase(trainer, model, datamodule, phases[0], None)
            optimizer_state = trainer.optimizers[0].state_dict()
            model.disable_scheduler()
            model.set_trainable_stages(phases[1].stages)
    else:
        model = first_model
        model.set_trainable_stages(phases[0].stages)
    if model is not None:
        unfrozen_model = model
        unfrozen = _sweep(
            cfg,
            settings,
            unfrozen_model,
            datamodule,
            lambda x: [g["lr"] for g in unfrozen_model.param_groups(lr=lr, backbone_lr_ratio=x / lr)],
            optimizer_state,
            init_from=init_from,
            label=f"LR sweep {sweeps}/{sweeps} (backbone, head at lr {lr:.3g})",
        )
        ratio = unfrozen["suggestion"] / lr if unfrozen["suggestion"] is not None else None
        result["unfrozen"] = {
            "what": f"backbone lr (stem's, = lr x backbone_lr_ratio) with the head at lr={lr:.3g}",
            **unfrozen,
            "ratio": ratio,
        }
    suggested = {
        "model.optimizer.lr": result.get("frozen", {}).get("suggestion"),
        "finetune.backbone_lr_ratio": result.get("unfrozen", {}).get("ratio"),
    }
    if not phases[0].frozen:  # finetune=full: only the second sweep, at the configured head lr
        suggested["model.optimizer.lr"] = None
    result["suggested"] = suggested
    result["command"] = _command(suggested)
    save_json(result, out / "lr_find.json")
    _plot(result, out)
    _report(result, out)
    return result


def apply_suggestions(cfg: DictConfig, result: dict[str, Any]) -> DictConfig:
    """``cfg`` with the suggested values in place of the configured ones (``lr_find.apply=true``); a sweep that gave no
    suggestion leaves its key as configured."""
    applied = cfg.copy()
    with open_dict(applied):
        for key, value in result["suggested"].items():
            if value is not None:
                OmegaConf.update(applied, key, float(value))
    return applied


def _trainer(cfg: DictConfig, callbacks: list[L.Callback], **overrides: Any) -> L.Trainer:
    """A Trainer of the run's kind (device, precision, strategy) that writes nothing and skips validation."""
    settings: dict[str, Any] = {
        "logger": False,
        "enable_checkpointing": False,
        "limit_val_batches": 0,
        "num_sanity_val_steps": 0,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        **overrides,
    }
    return instantiate(cfg.trainer, callbacks=callbacks, **settings)


def _sweep(
    cfg: DictConfig,
    settings: dict[str, Any],
    model: ImageClassifier,
    datamodule: ClassificationData,
    group_lrs: Callable[[float], Sequence[float]],
    optimizer_state: dict[str, Any] | None = None,
    init_from: Sequence[L.Callback] = (),
    label: str = "LR sweep",
) -> dict[str, Any]:
    """One sweep in its own fit (fresh optimizer, DDP wrapper and compiled graph); the model's weights move.
    ``init_from``: ``model.init_from``'s callback, which starts a fresh model from that file."""
    sweep = LRSweep(float(settings["min_lr"]), float(settings["max_lr"]), int(settings["num_steps"]))
    callback = SweepCallback(sweep, group_lrs, optimizer_state, label)
    trainer = _trainer(cfg, [*init_from, callback], max_steps=sweep.num_steps, max_epochs=-1)
    finetune.fit_phase(trainer, model, datamodule, Phase(0, None, model.trainable_stages), None)
    return {"suggestion": sweep.suggestion(), "lrs": sweep.lrs, "losses": sweep.losses}


def _command(suggested: dict[str, float | None]) -> str:
    """``python train.py`` with this run's overrides and the suggestions in place of the swept keys."""
    try:
        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:  # no Hydra context
        overrides = []
    keep = [o for o in overrides if not o.lstrip("+~").startswith(("lr_find.", "hydra.", *APPLIED_KEYS))]
    applied = [f"{key}={value:.3g}" for key, value in suggested.items() if value is not None]
    return shlex.join(["python", "train.py", *keep, *applied])


def _plot(result: dict[str, Any], out: Path) -> None:
    """``lr_find.png`` in the run dir and the same figure as TensorBoard image ``lr_find``."""
    from torch.utils.tensorboard import SummaryWriter

    fig = lr_find_figure([(name, result[name]) for name in ("frozen", "unfrozen") if name in result])
    fig.savefig(out / "lr_find.png", dpi=100)
    writer = SummaryWriter(str(out / "tensorboard"))
    writer.add_image("lr_find", render_figure(fig), dataformats="HWC")
    writer.close()


def _report(result: dict[str, Any], out: Path) -> None:
    lines = [f"LR finder: plot {out / 'lr_find.png'}, values {out / 'lr_find.json'}"]
    for key, value in result["suggested"].items():
        configured = result["configured"][key]
        lines.append(
            f"  {key}: suggested {value:.3g} (configured {configured:.3g})"
            if value is not None
            else f"  {key}: no suggestion (configured {configured:.3g})"
        )
    lines.append(f"Train with them:\n  {result['command']}")
    print("\n".join(lines))
