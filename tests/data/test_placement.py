"""Where a worker's splits live under `placement = "auto"` on a GPU: its share of device_memory_fraction of the
free memory, divided among the workers pinned to that GPU and counting cross-validation's second copy (the free
memory faked: no GPU here; the pool, split and folds are real)."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from hpsearch.config import DataSection
from hpsearch.data import load_pool, make_split
from hpsearch.data._batches import gather_rows
from hpsearch.data._placement import placement_for, resident_allowance, resident_bytes

GPU = torch.device("cuda")


def test_the_allowance_is_divided_among_the_workers_sharing_a_gpu_and_counts_the_fold_copy(
        monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = DataSection(dataset="digits", image_size=16, subset=300)
    pool = load_pool(cfg)
    split = make_split(pool, cfg, 0)
    row = math.prod(pool.images.shape[1:])  # uint8
    need = row * 300
    assert resident_bytes(row, split, 0) == need
    assert resident_bytes(row, split, 5) == need + row * (len(split.train) + len(split.val))
    assert resident_allowance(8_000, 0.5, 1) == 4_000 and resident_allowance(8_000, 0.5, 4) == 1_000

    free = 3 * need  # half of it is 1.5 × what one worker's three splits take
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 4 * free))
    assert placement_for(pool, split, cfg, GPU) == "resident"
    # Two workers on that GPU read the same free memory: each may take half the allowance, 0.75 × its need.
    assert placement_for(pool, split, cfg, GPU, sharers=2) == "stream"
    # Under 5-fold cross-validation a fold's train and validation images are a second copy: 1.8 × the need.
    assert placement_for(pool, split, cfg.model_copy(update={"folds": 5}), GPU) == "stream"
    # Asked for by name, the placement is what was asked; on the CPU, auto gathers from the shared pool.
    assert placement_for(pool, split, cfg.model_copy(update={"placement": "resident"}), GPU, sharers=8) == "resident"
    assert placement_for(pool, split, cfg, torch.device("cpu")) == "stream"


def test_out_of_memory_placing_the_splits_falls_back_to_streaming_in_one_line(tmp_path) -> None:
    """Out of memory while a worker places its splits comes before any trial: a restarted worker would only run
    out again. A real allocator refusal (the process's address space capped just above what it holds, so the
    resident copy cannot be made; the CPU shows it as the GPU would) ends with streamed splits and one line."""
    import subprocess
    import sys

    from tests.support import cli_env, tiny_tables, write_study

    study = write_study(tmp_path / "s.toml", tiny_tables(data={
        "dataset": "synthetic", "synthetic_size": 4000, "image_size": 128, "augment": [], "subset": 0,
        "placement": "resident"}))
    script = (
        "import logging, resource, torch\n"
        "from hpsearch.config import read_study_file\n"
        "from hpsearch.search._objective import _place\n"
        "from hpsearch.search._study import prepare\n"
        "logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(message)s')\n"
        f"cfg = read_study_file({str(study)!r})\n"
        "prepared = prepare(cfg)\n"
        "vm = next(int(line.split()[1]) for line in open('/proc/self/status') if line.startswith('VmSize:'))\n"
        "cap = vm * 1024 + 48 * 2**20  # the resident train split alone is 118 MB\n"
        "resource.setrlimit(resource.RLIMIT_AS, (cap, cap))\n"
        "data = _place(prepared, cfg, torch.device('cpu'))\n"
        "print(data.train.placement, data.val.placement, data.test.placement, len(data.train))\n")
    done = subprocess.run([sys.executable, "-c", script], env=cli_env(), cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[:3] == ["stream"] * 3
    warnings = [line for line in done.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and "data: the splits did not fit on cpu" in warnings[0], done.stderr
    assert "streaming them from the host instead" in warnings[0]


@pytest.mark.parametrize("mapped", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 37, 128])
def test_gather_rows_over_threads_is_index_select(rows: int, mapped: bool, tmp_path: Path) -> None:
    """A streamed batch's rows, gathered by several threads in contiguous runs, are `index_select`'s, in order,
    from a memory map as from memory."""
    data = np.random.default_rng(0).integers(0, 256, (300, 3, 8, 8), dtype=np.uint8)
    if mapped:
        data.tofile(tmp_path / "pool.u8")
        data = np.memmap(tmp_path / "pool.u8", dtype=np.uint8, mode="r+", shape=data.shape)
    images = torch.from_numpy(np.asarray(data))
    index = torch.from_numpy(np.random.default_rng(1).permutation(300)[:rows])
    out = torch.empty((rows, 3, 8, 8), dtype=torch.uint8)
    with ThreadPoolExecutor(max_workers=4) as pool:
        gather_rows(images, index, out, pool)
    assert torch.equal(out, torch.index_select(images, 0, index))
