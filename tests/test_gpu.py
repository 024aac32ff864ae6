"""The GPU test set: what only a CUDA device can show. Skipped cleanly without one (`pytest -m gpu` runs it).

- a 2-trial study on CUDA through `run --workers 1 --gpus 0`: pinned, each trial recording its physical GPU and
  peak memory, stored outputs in fp32 that an fp32 forward of the stored weights reproduces;
- the step loop of an epoch with no host synchronization (torch.cuda.set_sync_debug_mode("error")), also with
  each regularizer a study may turn on (mixup, cutmix, RandAugment, the weights' moving average);
- a real CUDA out-of-memory inside a step (the fault hook allocates beyond free memory), retried once, the worker
  going on with its memory freed;
- a real device-side error (an out-of-range index in a kernel) under `run --workers 2 --workers-per-gpu 2`: the
  trial ends FAIL, its worker exits 6 and is restarted with a fresh context, and the study goes on;
- streamed batches (pinned buffers, a batch ahead) equal resident ones, compared on the device, read once;
- `[train] compile` on CUDA: one compilation over 5 trials of different dropout (in tests/train/test_accelerator.py,
  parametrized over cpu and cuda; `-m gpu` selects its cuda case).
"""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from tests.support import run_cli, tiny_tables, write_study

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA = torch.device("cuda")


def _trials(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    from hpsearch.store import open_storage

    return optuna.load_study(study_name=name, storage=open_storage(url)).trials


@pytest.mark.timeout(600)
def test_a_two_trial_study_on_cuda_is_pinned_and_stores_fp32_outputs(tmp_path: Path) -> None:
    from hpsearch.config import read_study_file
    from hpsearch.data import load_pool, make_split, trial_data
    from hpsearch.model import build_model
    from hpsearch.store import load_trial_outputs, load_trial_weights, open_artifact_store
    from hpsearch.train import predict_logits

    study = write_study(tmp_path / "gpu.toml", tiny_tables("gpu", train={"device": "cuda", "epochs": 2}))
    url = f"sqlite:///{tmp_path / 'gpu.db'}"
    done = run_cli("run", str(study), "--workers", "1", "--gpus", "0", "--storage", url, "--artifacts",
                   str(tmp_path / "artifacts"), cwd=tmp_path, timeout=540)
    assert done.returncode == 0, done.stderr[-3000:]
    trials = [t for t in _trials(url, "gpu") if t.state == TrialState.COMPLETE]
    assert len(trials) == 2
    for trial in trials:
        assert trial.user_attrs["device"].startswith("cuda")
        assert trial.user_attrs["gpu"]["name"] == torch.cuda.get_device_name(0)
        assert trial.user_attrs["peak_gpu_mib"] > 0
    # The stored validation outputs are what an fp32 forward of the stored weights gives.
    cfg = read_study_file(study)
    pool = load_pool(cfg.data)
    data = trial_data(pool, make_split(pool, cfg.data, cfg.study.seed), cfg.data, False, CUDA)
    store = open_artifact_store(str(tmp_path / "artifacts"), create=False)
    best = max(trials, key=lambda t: t.value or 0)
    outputs = load_trial_outputs(store, best)
    model = build_model(cfg.model, pool.num_classes, cfg.data.image_size).to(CUDA)
    model.load_state_dict(load_trial_weights(store, best))
    # TF32 off on both sides (hpsearch.kernels: the worker's trial, and predict_logits here): with it on, cuDNN's
    # convolutions differ from fp32 near 1e-3, beyond this bound.
    again = predict_logits(model, data.val, data.preprocess, 512).cpu()
    assert torch.allclose(outputs.val_logits, again, atol=1e-4, rtol=0)


@pytest.mark.parametrize("recipe", ["none", "mixup", "cutmix", "randaugment", "ema"])
def test_the_step_loop_never_waits_for_the_device(recipe: str) -> None:
    from hpsearch.config import DataSection, ModelSection, TrainSection
    from hpsearch.data import load_pool, make_split, mixer, trial_data
    from hpsearch.model import build_model
    from hpsearch.train import Hyperparams
    from hpsearch.train._accelerator import choose_precision
    from hpsearch.train._ema import WeightEMA
    from hpsearch.train._loop import train_steps
    from hpsearch.train._optim import make_optimizer, make_schedule

    cfg = DataSection(dataset="digits", image_size=32, subset=600, augment=["crop", "cutout"])
    pool = load_pool(cfg)
    data = trial_data(pool, make_split(pool, cfg, 0), cfg, False, CUDA)
    train = TrainSection(epochs=1, batch_size=64, device="cuda")
    precision = choose_precision("auto", CUDA)
    if precision.scaled:
        pytest.skip("fp16's gradient scaler reads its inf check on the host; this GPU has no bf16")
    model = build_model(ModelSection(arch="resnet18"), pool.num_classes, 32).to(CUDA, memory_format=torch.channels_last)
    hp = Hyperparams(lr=1e-3, optimizer="adam", scheduler="none")
    optimizer = make_optimizer(model.parameters(), hp)
    schedule = make_schedule(optimizer, hp, 1, 1)
    scaler = precision.scaler(CUDA)
    gen, aug = torch.Generator().manual_seed(0), torch.Generator(device=CUDA).manual_seed(0)
    args = (data, train.batch_size, 0.1, schedule, precision, gen, aug)
    extras = {"mix": mixer(recipe, 1.0, pool.num_classes) if recipe in ("mixup", "cutmix") else None,
              "augment_strength": 0.6 if recipe == "randaugment" else 0.0,
              "ema": WeightEMA(model, 0.99) if recipe == "ema" else None}
    train_steps(model, optimizer, scaler, *args, **extras)  # warm-up: first-use allocations
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = train_steps(model, optimizer, scaler, *args, **extras)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss.loss_sum).item()


def test_streamed_batches_equal_resident_ones_on_the_device() -> None:
    """Compared on the device and read once at the end: a per-batch comparison read on the host (torch.equal)
    synchronizes every batch, which would hide a missing wait on a batch's copy (the next copy overwriting a
    pinned buffer, a batch read before it arrived)."""
    from hpsearch.config import DataSection
    from hpsearch.data import DeviceData, load_pool, make_split

    cfg = DataSection(dataset="digits", image_size=32, subset=500, augment=[])
    pool = load_pool(cfg)
    split = make_split(pool, cfg, 0)
    resident, streamed = (DeviceData(pool, split.train, CUDA, placement) for placement in ("resident", "stream"))
    assert streamed.placement == "stream" and resident.placement == "resident"
    differ = torch.zeros((), dtype=torch.int64, device=CUDA)
    checksum = torch.zeros((), dtype=torch.int64, device=CUDA)
    batches = 0
    for (a, la), (b, lb) in zip(resident.batches(32, shuffle=True, generator=torch.Generator().manual_seed(1)),
                                streamed.batches(32, shuffle=True, generator=torch.Generator().manual_seed(1)),
                                strict=True):
        assert a.device.type == b.device.type == "cuda"
        differ += (a != b).sum() + (la != lb).sum()
        checksum += b.sum(dtype=torch.int64)
        batches += 1
    expected = int(pool.images[torch.from_numpy(split.train)].sum(dtype=torch.int64))
    assert batches > 3
    assert differ.item() == 0  # the one synchronization
    assert checksum.item() == expected  # every training image arrived once, none stale or twice


@pytest.mark.timeout(600)
def test_a_cuda_out_of_memory_inside_a_step_is_retried_and_the_worker_goes_on(tmp_path: Path) -> None:
    """The fault hook allocates 1 GiB more than is free inside the first step: a real CUDA OOM. Its trial ends
    FAIL (out_of_memory), its retry (same params) and a further trial complete in the same process, with a peak
    no higher than the further trial's: what the failed trial held was freed."""
    from hpsearch._testhooks import FAULT_ENV

    study = write_study(tmp_path / "oom.toml", tiny_tables("oom", study={"n_trials": 2},
                                                           train={"device": "cuda"}))
    url = f"sqlite:///{tmp_path / 'oom.db'}"
    done = run_cli("run", str(study), "--storage", url, "--artifacts", str(tmp_path / "a"), cwd=tmp_path,
                   timeout=540, **{FAULT_ENV: f"oom:{tmp_path / 'once'}"})
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert (tmp_path / "once").exists(), "the fault ran"
    trials = _trials(url, "oom")
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert trials[0].user_attrs.get("out_of_memory")
    assert trials[1].system_attrs["failed_trial"] == 0 and trials[1].params == trials[0].params
    assert len({t.user_attrs["worker"] for t in trials}) == 1  # one process throughout
    retry, further = trials[1].user_attrs["peak_gpu_mib"], trials[2].user_attrs["peak_gpu_mib"]
    assert retry <= further * 1.1 + 16, (retry, further)


@pytest.mark.timeout(600)
def test_a_device_side_error_fails_its_trial_and_restarts_its_worker(tmp_path: Path) -> None:
    from hpsearch._testhooks import FAULT_ENV

    study = write_study(tmp_path / "fault.toml", tiny_tables("fault", study={"n_trials": 8},
                                                             train={"device": "cuda"}))
    url = f"sqlite:///{tmp_path / 'fault.db'}"
    # Two workers sharing GPU 0: a supervisor that restarts the broken one while the other goes on.
    done = run_cli("run", str(study), "--workers", "2", "--workers-per-gpu", "2", "--gpus", "0", "--storage", url,
                   "--artifacts", str(tmp_path / "a"), cwd=tmp_path, timeout=540,
                   **{FAULT_ENV: f"device-assert:{tmp_path / 'once'}"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "its GPU context broke (a sticky device error); restarting it" in done.stderr
    trials = _trials(url, "fault")
    broken = [t for t in trials if t.user_attrs.get("device_broken")]
    assert len(broken) == 1 and broken[0].state == TrialState.FAIL
    assert "device-side assert" in broken[0].user_attrs["fail_reason"]
    # The study went on past the broken trial (each worker may finish one trial beyond n_trials).
    assert 8 <= sum(t.state == TrialState.COMPLETE for t in trials) <= 9
