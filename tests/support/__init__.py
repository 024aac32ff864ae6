"""What the tests share besides fixtures (those are in conftest.py): tiny study files and the `hpsearch` command in
a fresh process (_studies), the storages and artifact stores tests run against (_storages) and the dashboard over
them (_dashboard), the processes the process-level tests start and kill (_processes), a single-node SLURM cluster
(_slurm), image folders (_images), what a drawn figure shows (_figures), and the small real studies and exports the
ensemble, export and predict tests build without training (_exports, _lab, _outputs).

Test modules import these as `from tests.support import ...` (this package re-exports them all); no test module
imports another's helpers."""

from tests.support._dashboard import dashboard_artifacts, dashboard_http
from tests.support._exports import N_MEMBERS, Exported, build_export, fit_head, member_state
from tests.support._figures import MATH_CLASS, SYNTHETIC_SPACE, csv_rows, drawn_texts, scatter_points, synthetic_study
from tests.support._images import COLOURS, bomb_png, colour_folder, imagefolder_section, solid_png
from tests.support._lab import Lab, State, lab_ensemble, lab_study, lab_study_file, make_lab, perturbed
from tests.support._outputs import study_of_outputs
from tests.support._processes import (
    Procs,
    alive,
    held_trials,
    hpsearch_argv,
    is_descendant,
    pid_of,
    process_env,
    run_on_a_small_tmpfs,
    session_members,
    states_of,
    trials_of,
    wait_until,
)
from tests.support._slurm import SlurmCluster, slurm_cluster
from tests.support._storages import (
    ARTIFACT_STORES,
    PG_ADMIN_URL,
    PROXIED,
    PROXY_GRACE_S,
    STORAGES,
    STORAGES_AND_PROXY,
    DatabaseOutage,
    Proxy,
    free_port,
    postgres_database,
    require_postgres,
    s3_keys,
    storage_proxy,
)
from tests.support._studies import cli_env, run_cli, tiny_tables, write_study

__all__ = [
    "ARTIFACT_STORES",
    "COLOURS",
    "MATH_CLASS",
    "N_MEMBERS",
    "PG_ADMIN_URL",
    "PROXIED",
    "PROXY_GRACE_S",
    "STORAGES",
    "STORAGES_AND_PROXY",
    "SYNTHETIC_SPACE",
    "DatabaseOutage",
    "Exported",
    "Lab",
    "Procs",
    "Proxy",
    "SlurmCluster",
    "State",
    "alive",
    "bomb_png",
    "build_export",
    "cli_env",
    "colour_folder",
    "csv_rows",
    "dashboard_artifacts",
    "dashboard_http",
    "drawn_texts",
    "fit_head",
    "free_port",
    "held_trials",
    "hpsearch_argv",
    "imagefolder_section",
    "is_descendant",
    "lab_ensemble",
    "lab_study",
    "lab_study_file",
    "make_lab",
    "member_state",
    "perturbed",
    "pid_of",
    "postgres_database",
    "process_env",
    "require_postgres",
    "run_cli",
    "run_on_a_small_tmpfs",
    "s3_keys",
    "scatter_points",
    "session_members",
    "slurm_cluster",
    "solid_png",
    "states_of",
    "storage_proxy",
    "study_of_outputs",
    "synthetic_study",
    "tiny_tables",
    "trials_of",
    "wait_until",
    "write_study",
]
