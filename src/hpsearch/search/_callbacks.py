"""The callbacks `run_trials` runs after each trial: failure streaks, retries, the kept weights, a full store
and a broken device. Each reads how the trial ended from its record (hpsearch.record)."""

from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial, TrialState

from hpsearch.record import read_trial_record
from hpsearch.search._cv_trial import trial_weights
from hpsearch.store import StudyArtifacts, has_retry, pinned, ranked_trials, retry_failed


class StopAfterFailures:
    """Stop the study after `limit` trials of this process failed in a row (a broken setup, not bad luck)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_a_row = 0
        self.tripped = False

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if read_trial_record(trial).storage_lost:
            return  # the storage was away, not the setup broken: the streak neither grows nor resets
        self.in_a_row = self.in_a_row + 1 if trial.state == TrialState.FAIL else 0
        if self.in_a_row >= self.limit:
            self.tripped = True
            study.stop()


class RetryOutOfMemory:
    """A trial that ran out of memory (GPU or host) is retried once with the same parameters (no searched parameter
    changes memory, so PRUNED would teach the sampler the wrong lesson); a second OOM stays FAIL."""

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if trial.state == TrialState.FAIL and read_trial_record(trial).out_of_memory:
            retry_failed(study, trial)


class RetryAfterStorageOutage:
    """A trial ended because the storage was away past its patience is retried once, from its checkpoint."""

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if trial.state == TrialState.FAIL and read_trial_record(trial).storage_lost and not has_retry(
                study, trial.number):
            retry_failed(study, trial)


class KeepBestWeights:
    """Disk stays bounded: weights of COMPLETE trials outside the best `keep` are deleted as the study runs.
    Outputs (small) stay, so the study's record is whole; a deleted trial is simply no ensemble candidate.
    Weights a running `hpsearch ensemble` has pinned (hpsearch.pins) wait until it is done."""

    def __init__(self, files: StudyArtifacts, keep: int) -> None:
        self.files = files
        self.keep = keep
        self.removed: set[str] = set()  # not asked of the store again at every later trial

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if not self.keep:
            return
        # With folds a trial keeps one weights file per fold; each is listed under the trial that uploaded it.
        losers = [pair for t in ranked_trials(study)[self.keep:] for pair in trial_weights(t)]
        losers = [(number, artifact) for number, artifact in losers if artifact not in self.removed]
        if not losers:
            return
        held = pinned(study.user_attrs)  # read after the ranking: a pin set since then is seen here
        for number, artifact in losers:
            if artifact not in held:
                self.files.delete(number, artifact)
                self.removed.add(artifact)


class StopOnFullStore:
    """The first trial whose files found no room in the store (ENOSPC, an S3 quota) stops the run at once: it
    is queued for retry (its checkpoint kept), and `line` says why; every later trial would only fail too."""

    def __init__(self) -> None:
        self.line: str | None = None

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        record = read_trial_record(trial)
        if trial.state == TrialState.FAIL and record.store_full:
            if not has_retry(study, trial.number):
                retry_failed(study, trial)
            self.line = record.fail_reason or "artifacts: the store is full"
            study.stop()


class StopOnBrokenDevice:
    """A trial that ended on a sticky device error stops this process's run at once (its CUDA context is
    unusable); it is not retried (the same configuration would likely break the next context too)."""

    def __init__(self) -> None:
        self.line: str | None = None

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        record = read_trial_record(trial)
        if trial.state == TrialState.FAIL and record.device_broken:
            self.line = (f"trial {trial.number}: {record.fail_reason or 'device error'}"[:300]
                         + "; this process's GPU context is unusable: it exits to start with a fresh one")
            study.stop()
