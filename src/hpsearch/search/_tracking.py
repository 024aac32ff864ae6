"""`[tracking] tensorboard = true`: each trial's scalars per epoch and its hyperparameters in TensorBoard.

A trial writes to `<log_dir>/<study>/trial-<number>`: `train/loss`, `val/loss`, `val/accuracy` and `lr` at each
epoch (with `[data] folds`: `fold-<k>/train/loss`, ... for each fold, epochs as steps), then its parameters
with its final validation accuracy (TensorBoard's HParams tab), PRUNED and FAILed trials too. The objective
opens one log per trial; training (`hpsearch.train`) knows nothing of it. TensorBoard is an optional extra,
imported only when a log is opened, so everything else runs without it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from hpsearch.config import TrackingSection
from hpsearch.train import EpochMetrics

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

_log = logging.getLogger(__name__)

# The metric the HParams tab shows next to each trial's parameters.
HPARAM_METRIC = "hparam/val_accuracy"


class TrialTracker(Protocol):
    """What the objective calls: once per epoch, then once when the trial ends, however it ends."""

    def epoch(self, metrics: EpochMetrics, fold: int | None = None) -> None: ...

    def finish(self, params: dict[str, Any], val_accuracy: float | None = None) -> None: ...


class NoTracking:
    """Tracking is off: nothing is written and no folder is made."""

    def epoch(self, metrics: EpochMetrics, fold: int | None = None) -> None:
        pass

    def finish(self, params: dict[str, Any], val_accuracy: float | None = None) -> None:
        pass


class TrialLog:
    """One trial's TensorBoard event files, in its own folder."""

    def __init__(self, folder: Path) -> None:
        # Imported here: the tensorboard package is an optional extra, needed only when tracking is on.
        from torch.utils.tensorboard import SummaryWriter

        self.folder = folder
        self._writer: SummaryWriter = SummaryWriter(log_dir=str(folder))
        self._last: EpochMetrics | None = None

    def epoch(self, metrics: EpochMetrics, fold: int | None = None) -> None:
        step = metrics.epoch
        tag = "" if fold is None else f"fold-{fold}/"
        self._writer.add_scalar(f"{tag}train/loss", metrics.train_loss, step)
        self._writer.add_scalar(f"{tag}val/loss", metrics.val_loss, step)
        self._writer.add_scalar(f"{tag}val/accuracy", metrics.val_accuracy, step)
        self._writer.add_scalar(f"{tag}lr", metrics.lr, step)
        # Flushed every epoch: a worker killed mid-trial leaves every epoch it finished readable.
        self._writer.flush()
        self._last = metrics

    def finish(self, params: dict[str, Any], val_accuracy: float | None = None) -> None:
        """The parameters and the final accuracy (the trial's value, else its last epoch's); then close."""
        accuracy = val_accuracy if val_accuracy is not None else (
            self._last.val_accuracy if self._last is not None else None)
        metrics = {HPARAM_METRIC: accuracy} if accuracy is not None else {}
        step = self._last.epoch if self._last is not None else 0
        try:
            try:
                # run_name ".": the hparams land in the trial's own folder, not in a timestamped subfolder.
                self._writer.add_hparams(_loggable(params), metrics, run_name=".", global_step=step)
            finally:
                self._writer.close()
        except Exception as err:  # called in the objective's finally: a log must not turn PRUNED or COMPLETE into FAIL
            _log.warning("trial log %s: could not write its hparams (%s)", self.folder, err)


class TrialLogs:
    """Opens each trial's log under `<log_dir>/<study>`; the folder is resolved once, when the run starts."""

    def __init__(self, tracking: TrackingSection, study: str) -> None:
        self.enabled = tracking.tensorboard
        # Resolved now: a relative log_dir means the folder `run` was started in, whatever changes later.
        self.root = Path(tracking.log_dir).expanduser().resolve() / study

    def open(self, number: int) -> TrialTracker:
        if not self.enabled:
            return NoTracking()
        return TrialLog(self.root / f"trial-{number}")


def _loggable(params: dict[str, Any]) -> dict[str, bool | int | float | str]:
    # TensorBoard's hparams take only numbers, strings and bools; anything else is shown as its text.
    return {k: v if isinstance(v, bool | int | float | str) else str(v) for k, v in params.items()}
