"""Prove that a refactor of hpsearch changed no behaviour: the same CLI session on two source trees, compared.

Run it from the repository root with the project's virtual environment (about 6-8 minutes on 2 cores):

    .venv/bin/python -m tools.compare_outputs --old /work/baseline/src --new /work/main/src [--workdir DIR] [--keep]

Each side runs `python -c "from hpsearch.cli import main; ..."` with its own tree first on PYTHONPATH (checked: the
import must resolve inside that tree), one thread, fixed hash seed, 200 columns, no colour, no GPU. Both sides run
each step at the same time (one core each), in `WORKDIR/old` and `WORKDIR/new` with the same relative paths, on
three tiny digits studies written here (ResNet-18, 32 px): `tiny` (from scratch, 2 epochs, 4 trials, median
pruner), `tiny-cv` (3 folds, 2 trials, 1 epoch, Wilcoxon pruner) and `tiny-soup` (3 trials from one seeded
weights file, frozen backbone, so `ensemble --method soup` really averages instead of refusing):

- A-* steps, a fresh run: each side runs `run` on its own new database and artifact store. Compared: exit code,
  stdout (the top-trials table with its `sec` column masked), stderr, and the study itself (every trial's state,
  values, params, intermediate values, user and system attrs; each stored artifact by content).
- B-* steps, the same inputs: the old side's A-run study is copied into each command's folder (database copied,
  artifact files hard-linked; a last step checks that no command changed a shared file in place), then both
  sides run `status`, `check`, `run` (of the finished study), `ensemble` with every `--method` and with `--onnx`,
  `predict` and `select` on the old side's export (digit PNGs and one unreadable file), and `report` without
  and with `--ensemble`; CV-* and S-* do the same for the other two studies. Compared: exit code, stdout,
  stderr, and every file in the command's folder by relative path and content, the database too (dumped
  through Optuna).

Only what legitimately varies between two runs is normalised: the two work folders and source trees (one
placeholder each), timestamps, elapsed times, the host name with a pid, and what Part A's training measures
(trial durations, host memory, epoch seconds). Bytes that hold the same content compare as that content: PNGs
(files, and report.html's inline images) by pixels, safetensors files by sorted header and tensor bytes (the
writer orders its metadata at random), ensemble.onnx without the source paths and Python module names torch.onnx
records per node, artifacts by content rather than by their random ids, and a file's sha256 named in another
file by that file's compared content. Anything else that differs is reported with a unified diff. Exit 0: every
step is the same; 1: some step differs; 2: the harness could not run (a tree that does not import from itself,
a work folder in use).

The package by job: `session` (the studies, input files and steps), `sides` (the two sides and running a step on
both), `normalise` (the text rules), `fingerprint` (a folder's files as compared), `compare` (the diffs and
verdicts), `cli` (arguments, the run in order, the summary); `__main__` runs `cli.main`.
"""
