"""Freeze-then-unfreeze fine-tuning (in N phases: gradual unfreezing), built so that the known Lightning pitfalls
cannot happen. The schedule itself is plain data (``schedule.FinetuneSchedule``); this module runs it.

The design, and why
-------------------
1. **Every parameter group exists in the optimizer from the first step** (``head``, ``backbone`` or one
   ``backbone.<stage>`` per stage, and their ``/no_decay`` twins; see ``ImageClassifier.param_groups``). Frozen
   weights only have ``requires_grad=False``, so autograd computes no gradient for them and the optimizer skips them.
   Because the groups never change, resuming never meets a "different number of parameter groups" error (Lightning
   #6891, #8502), every LR scheduler knows every group (no ``ReduceLROnPlateau``/``OneCycleLR`` crash at unfreeze,
   #12141, lightning-flash#1321), and ``LearningRateMonitor`` shows the groups by name in every phase.
2. **Each phase is its own ``Trainer.fit``**. DDP only reduces the gradients of parameters that required grad when it
   wrapped the model (Lightning #20340), and ``torch.compile`` may reuse a graph traced under the old
   ``requires_grad`` (pytorch#139476). A new ``fit`` re-runs ``setup`` (fresh compiled graph) and wraps the model in a
   fresh DDP that sees the newly unfrozen stages. A phase ends by ``should_stop`` rather than ``max_epochs``, so
   ``trainer.max_epochs`` (and the LR schedule's horizon) always covers the whole run.
3. **Each phase boundary goes through a checkpoint.** At the end of a phase's last epoch we save
   ``checkpoints/phase<k>.ckpt`` and phase ``k`` starts by resuming from it (weights, optimizer and scheduler state,
   loop counters). An uninterrupted run and a run resumed at a boundary therefore take the same code path, and
   resuming from any checkpoint picks its phase from the epoch the checkpoint resumes at.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

from image_finetune.checkpoints import resume_epoch
from image_finetune.training.schedule import FinetuneSchedule, Phase

if TYPE_CHECKING:
    from image_finetune.models.classifier import ImageClassifier

log = logging.getLogger(__name__)


def boundary_checkpoint(phase: int) -> str:
    """The file phase ``phase`` (1, 2, ...) starts from: the state at the end of the phase before it."""
    return f"phase{phase}.ckpt"


class _EndPhase(L.Callback):
    """Stops a fit after its phase's last epoch (``fit`` then saves the checkpoint the next phase resumes from)."""

    def __init__(self, end: int) -> None:
        self.end, self.reached = end, False

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch + 1 >= self.end:
            self.reached = True
            trainer.should_stop = True


def fit(
    trainer: L.Trainer,
    model: ImageClassifier,
    datamodule: L.LightningDataModule,
    schedule: FinetuneSchedule,
    ckpt_path: str | Path | None = None,
) -> None:
    """Run the schedule: one fit per phase from the one ``ckpt_path`` resumes in, each from the last one's checkpoint.

    ``fast_dev_run`` runs one batch of the first phase only (Lightning's step budget is spent by then); use
    ``debug=limit`` to run the whole schedule in seconds.
    """
    phases = schedule.phases()
    if not trainer.fast_dev_run:
        for warning in schedule.unreached(trainer.max_epochs):
            log.warning(warning)
    if trainer.max_epochs is not None and trainer.max_epochs > 0:  # the phases unreached() warned of never start
        phases = tuple(phase for phase in phases if phase.start < trainer.max_epochs)
    first = schedule.phase_at(resume_epoch(ckpt_path)) if ckpt_path else 0
    with _StopSignals.installed(trainer) as signals:
        try:
            for k in range(first, len(phases)):
                if k > first and signals.received:
                    raise SIGTERMException  # as Lightning raises it inside a fit: the caller's interruption path
                if not fit_phase(trainer, model, datamodule, phases[k], ckpt_path) or k + 1 == len(phases):
                    return  # linear probe, early stop, interruption, fast_dev_run, or max_epochs reached
                # Saved after the fit has finished, so every callback (ModelCheckpoint's best and last included) has
                # recorded the phase's last epoch first; a callback's own save would come before ModelCheckpoint's.
                ckpt_path = Path(trainer.default_root_dir) / "checkpoints" / boundary_checkpoint(k + 1)
                trainer.save_checkpoint(ckpt_path, weights_only=False)
                trainer.should_stop = False
                log.info("Unfreezing after epoch %d: %s train(s) from now on", phases[k].end, phases[k + 1].describe())
        except SIGTERMException:
            raise StoppedBySignal(signals.signum or signal.SIGTERM) from None


class StoppedBySignal(Exception):  # noqa: N818 (not an error: the run was stopped from outside)
    """SIGTERM or SIGINT (Ctrl-C) ended the schedule after a batch; ``last.ckpt`` (``LastCheckpoint``) holds that state."""

    def __init__(self, signum: signal.Signals) -> None:
        super().__init__(f"stopped by {signum.name}")
        self.signum = signum


class _StopSignals(L.Callback):
    """SIGTERM and SIGINT (Ctrl-C) for the whole schedule: finish the batch, save ``last.ckpt``, stop.

    SIGTERM: Lightning's signal connector handles it from just before a fit's first step to its teardown, and clears
    what it saw when the next fit registers it again. A SIGTERM at the unfreeze (after one fit, or in the next fit's
    setup and restore) would otherwise kill the process outright (exit -15, nothing saved) or be forgotten and the
    run would train on to the end. This handler notes the signal; ``fit`` raises ``SIGTERMException`` before the
    next phase, and ``on_train_start`` raises it inside a fit that began after the signal, the same exception
    Lightning raises, so the run saves ``last.ckpt`` and exits 143. Inside a fit Lightning composes this handler with
    its own; a handler installed before the run still runs.

    SIGINT: Lightning turns a ``KeyboardInterrupt`` into ``exit(1)`` with the state of wherever the interrupt landed
    (possibly half an optimizer step), which neither a script nor an exact resume can use. So the first SIGINT is
    handled as a SIGTERM is: it is passed to the SIGTERM handler in place (Lightning's inside a fit: it notes the
    signal, forwards it to DDP worker processes and tells the other ranks), and the run stops after the batch, saved.
    A second SIGINT raises ``KeyboardInterrupt`` at once: nothing more is saved (an interrupted save leaves the
    previous file whole, ``AtomicCheckpointIO``), and ``last.ckpt`` stays the last state saved whole.
    """

    def __init__(self, previous: Any) -> None:
        self.previous, self.signum, self.pid = previous, None, os.getpid()
        self._forwarding = False  # a SIGINT passed to the SIGTERM handlers: not for a handler installed before the run

    @property
    def received(self) -> bool:
        return self.signum is not None

    def note(self, signum: int, frame: Any) -> None:
        self.signum = self.signum or signal.Signals(signum)
        if callable(self.previous) and not self._forwarding:
            self.previous(signum, frame)

    def interrupt(self, signum: int, frame: Any) -> None:
        if os.getpid() != self.pid:
            return  # a forked data loader worker (Ctrl-C reaches the whole process group): the trainer stops it
        if self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        self.signum = self.signum or signal.SIGINT
        log.warning("Ctrl-C: stopping after this batch and saving checkpoints/last.ckpt (Ctrl-C again: stop at once)")
        self._forwarding = True
        connector_log = logging.getLogger("lightning.pytorch.trainer.connectors.signal_connector")
        connector_log.addFilter(self._no_sigterm_line)  # its "Received SIGTERM" would contradict the line above
        try:
            handler = signal.getsignal(signal.SIGTERM)
            if callable(handler):
                handler(signal.SIGTERM, frame)
        finally:
            connector_log.removeFilter(self._no_sigterm_line)
            self._forwarding = False

    def _no_sigterm_line(self, record: logging.LogRecord) -> bool:
        return not self._forwarding

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.received:
            raise SIGTERMException

    @classmethod
    @contextlib.contextmanager
    def installed(cls, trainer: L.Trainer) -> Iterator[_StopSignals]:
        guard = cls(signal.getsignal(signal.SIGTERM))
        if threading.current_thread() is not threading.main_thread():  # signal handlers belong to the main thread
            yield guard
            return
        previous_int = signal.signal(signal.SIGINT, guard.interrupt)
        signal.signal(signal.SIGTERM, guard.note)
        trainer.callbacks.append(guard)
        try:
            yield guard
        finally:
            trainer.callbacks.remove(guard)
            signal.signal(signal.SIGTERM, guard.previous)
            signal.signal(signal.SIGINT, previous_int)


def fit_phase(
    trainer: L.Trainer,
    model: ImageClassifier,
    datamodule: L.LightningDataModule,
    phase: Phase,
    ckpt_path: str | Path | None,
) -> bool:
    """One ``Trainer.fit`` with ``phase``'s stages trainable; True when it ran to the phase's end (not the run's)."""
    model.set_trainable_stages(phase.stages)
    stopper = _EndPhase(phase.end) if phase.end is not None else None
    trainer.callbacks.extend([stopper] if stopper else [])
    try:
        with warnings.catch_warnings():
            # Frozen layers are in eval mode on purpose (their BatchNorm statistics must not drift).
            warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
            trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    finally:
        if stopper:
            trainer.callbacks.remove(stopper)
    return bool(stopper and stopper.reached and not trainer.interrupted and not trainer.fast_dev_run)
