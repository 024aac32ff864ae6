"""Where a study lives: storages (SQLite, PostgreSQL, journal, the gRPC proxy), the artifact store, reading a study
(counts, ranking, retries, stop requests, pinned weights). Imports no torch: `status`, `stop` and `dashboard`
start on it.
"""

from __future__ import annotations

from hpsearch.store._artifacts import (
    OUTPUTS_FILE,
    WEIGHTS_FILE,
    ArtifactStore,
    StudyArtifacts,
    TrialOutputs,
    download_to,
    free_bytes,
    is_s3,
    load_outputs,
    load_trial_outputs,
    load_trial_weights,
    load_weights,
    open_artifact_store,
    remove_artifact,
    resolve_artifacts,
    store_full_reason,
    store_size_bytes,
    upload_model_files,
    upload_trial_artifacts,
)
from hpsearch.store._pins import pin, pinned, unpin
from hpsearch.store._proxy import DEFAULT_HEARTBEAT_GRACE_S, DEFAULT_POOL_SIZE, DEFAULT_PORT, proxy_failure
from hpsearch.store._proxy_server import serve
from hpsearch.store._redact import redact
from hpsearch.store._stopping import StopWatch, StopWhenAsked, pending, request_stop, stop_request, target_reached
from hpsearch.store._storage import open_storage, resolve_storage_url
from hpsearch.store._studies import (
    FINISHED,
    METRIC_NAME,
    best_trial,
    finished_trials,
    has_retry,
    load_existing,
    metric_name,
    open_existing,
    ranked_trials,
    retry_failed,
    study_storage_name,
)

__all__ = [
    "DEFAULT_HEARTBEAT_GRACE_S",
    "DEFAULT_POOL_SIZE",
    "DEFAULT_PORT",
    "FINISHED",
    "METRIC_NAME",
    "OUTPUTS_FILE",
    "WEIGHTS_FILE",
    "ArtifactStore",
    "StopWatch",
    "StopWhenAsked",
    "StudyArtifacts",
    "TrialOutputs",
    "best_trial",
    "download_to",
    "finished_trials",
    "free_bytes",
    "has_retry",
    "is_s3",
    "load_existing",
    "load_outputs",
    "load_trial_outputs",
    "load_trial_weights",
    "load_weights",
    "metric_name",
    "open_artifact_store",
    "open_existing",
    "open_storage",
    "pending",
    "pin",
    "pinned",
    "proxy_failure",
    "ranked_trials",
    "redact",
    "remove_artifact",
    "request_stop",
    "resolve_artifacts",
    "resolve_storage_url",
    "retry_failed",
    "serve",
    "stop_request",
    "store_full_reason",
    "store_size_bytes",
    "study_storage_name",
    "target_reached",
    "unpin",
    "upload_model_files",
    "upload_trial_artifacts",
]
