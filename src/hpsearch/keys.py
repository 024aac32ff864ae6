"""Every study and trial attribute name hpsearch records.

A study records, when it is created, what later stages rely on (the split every trial's outputs line up with,
the classes, the config it was created from, the normalization its trials trained with, its artifact store);
each trial records who ran it, from what, and where its artifacts are. Each name is written in exactly one
place through this module and read back typed through `hpsearch.record`, so a rename is one line.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import Any

# ------------------------------------------------------------------------------------------ study attrs
SPACE_FINGERPRINT = "space_fingerprint"  # a resumed study must keep its search space
SPACE = "space"  # the space itself, to name what changed
SPLIT_SHA256 = "split_sha256"  # the split every trial's outputs line up with
SPLIT_SIZES = "split_sizes"
FOLDS_SHA256 = "folds_sha256"  # [data] folds: the fold assignment of train+val every trial's folds line up with
FOLD_SIZES = "fold_sizes"
CLASSES = "classes"
CONFIG = "config"  # the study file it was created from, as JSON
PREPROCESS = "preprocess"  # image_size, mean, std, interpolation: what an export reproduces
HPSEARCH_VERSION = "hpsearch_version"
ARTIFACTS = "artifacts_dir"  # the artifact store: a folder or s3://bucket/prefix
STOP_REQUEST = "stop_request"  # {"generation", "at", "by", "reason", "now"}: `hpsearch stop` or a reached target
SKIPPED_IMAGES = "skipped_images"  # unreadable files left out ([data] bad_images = "skip"), relative to the root
PIN = "pin:"  # + an artifact id: until when (unix seconds) a running `ensemble` needs it; keep_weights waits

# ------------------------------------------------------------------------------------------ trial attrs
WORKER = "worker"  # host:pid running it, and its SLURM job (a supervisor finds a dead worker's trial by it)
SEED = "seed"
# A trial system attr that never lands: a worker behind the storage proxy beats by writing it, and the proxy's
# storage records a heartbeat instead (Optuna's gRPC protocol has no heartbeat call).
PROXY_BEAT = "hpsearch:heartbeat"
DEVICE = "device"
MEMORY_AT_START = "memory_at_start"
INIT_WEIGHTS = "init_weights"  # what its weights started from: none, a weights enum, or a file's sha256
RESUMED_FROM = "resumed_from"  # {"trial": n, "epochs_done": k} when it continued a checkpoint
PRUNED_REASON = "pruned_reason"
FAIL_REASON = "fail_reason"
FAIL_TRACEBACK = "fail_traceback"
OUT_OF_MEMORY = "out_of_memory"
DEVICE_BROKEN = "device_broken"  # a sticky device error ended it: its worker exited to get a fresh context
GPU = "gpu"  # {"index", "name", "uuid", "memory_mib", "visible"}: which physical GPU ran it
PEAK_GPU_MIB = "peak_gpu_mib"  # the most GPU memory its tensors held at once
INTERRUPTED = "interrupted"  # stopped by SIGINT/SIGTERM: FAIL, retried once from its checkpoint
STORE_FULL = "store_full"  # its files found no room in the artifact store: FAIL, the run stops, retried once
STORAGE_LOST = "storage_lost"  # the storage was away past [study] storage_patience: FAIL, retried once
WEIGHTS = "weights_artifact"  # best-epoch weights.safetensors
OUTPUTS = "outputs_artifact"  # validation and test logits, outputs.safetensors
CHECKPOINT = "checkpoint_artifact"  # the latest resumable checkpoint while it runs
CHECKPOINT_EPOCH = "checkpoint_epoch"
FOLDS = "folds"  # [data] folds: one record per finished fold (val_accuracy, best epoch, curves, artifact ids)
FOLD_VAL_ACCURACY = "fold_val_accuracy"  # a cross-validated trial's per-fold validation accuracies, fold 0 first
CHECKPOINT_FOLD = "checkpoint_fold"  # the fold the latest checkpoint belongs to
BEST_EPOCH = "best_epoch"  # 0-based; with val_accuracy, val_loss and epochs_run from the training summary

# A retry copies its original's user attrs, but not why the original failed nor the worker that ran it.
FAILURE_ATTRS = (FAIL_REASON, FAIL_TRACEBACK, OUT_OF_MEMORY, INTERRUPTED, STORE_FULL, STORAGE_LOST, DEVICE_BROKEN,
                 WORKER)


def without_failure(user_attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The user attrs a retry inherits: all but FAILURE_ATTRS."""
    return {k: v for k, v in user_attrs.items() if k not in FAILURE_ATTRS}


def worker_tag(pid: int | None = None) -> str:
    """Who runs a trial: host and pid, recorded on the trial so a supervisor can find a dead worker's trial;
    under SLURM the job and array task too (`node7:4242 slurm 1234_7`), so that `status` names what to
    `scancel` or `sacct`. The workers of one supervisor share its job, so its tag for a worker is the worker's."""
    job = slurm_job()
    return f"{socket.gethostname()}:{pid or os.getpid()}" + (f" slurm {job}" if job else "")


def slurm_job(env: Mapping[str, str] = os.environ) -> str | None:
    """The SLURM job running this process as SLURM's own commands write it: `1234_7` for task 7 of array job
    1234, `1234` for a plain job; None outside SLURM. A label, recorded as SLURM gave it, never parsed."""
    array_job, task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return env.get("SLURM_JOB_ID") or None
