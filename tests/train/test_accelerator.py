"""Precision, stored outputs in fp32, and which errors leave a device unusable (on the CPU, where it shows)."""

from __future__ import annotations

import pytest
import torch

from hpsearch.config import DataSection, ModelSection, TrainSection
from hpsearch.data import load_pool, make_split, trial_data
from hpsearch.model import build_model
from hpsearch.train import Hyperparams, predict_logits, train_trial
from hpsearch.train._accelerator import choose_precision, is_out_of_memory, is_sticky_device_error
from hpsearch.train._loop import FP32

CPU = torch.device("cpu")


def test_the_cpu_trains_in_fp32_unless_told() -> None:
    assert choose_precision("auto", CPU).dtype is None
    assert choose_precision("bf16", CPU).dtype == torch.bfloat16 and not choose_precision("bf16", CPU).scaled
    assert choose_precision("fp16", CPU).scaled  # fp16 always with a gradient scaler


def test_stored_outputs_are_fp32_even_when_training_in_bf16() -> None:
    """Forced bf16 autocast on the CPU: the trial's stored validation/test logits are what an fp32 forward of its
    best weights gives (what `predict` and ONNX compute), not the bf16 forward the epochs were judged by."""
    # Small: bf16 convolutions on a CPU without bf16 units are slow; one epoch of 2 small steps shows it all.
    cfg = DataSection(dataset="digits", image_size=16, subset=60, augment=[])
    pool = load_pool(cfg)
    data = trial_data(pool, make_split(pool, cfg, 0), cfg, False, CPU)
    train = TrainSection(epochs=1, batch_size=16, device="cpu", precision="bf16")
    model_cfg = ModelSection(arch="resnet18")
    result = train_trial(model_cfg, train, data, Hyperparams(lr=2e-3, optimizer="adam", scheduler="none"), seed=0,
                         device=CPU)
    model = build_model(model_cfg, data.num_classes, 16)
    model.load_state_dict(result.state_dict)
    fp32 = predict_logits(model, data.val, data.preprocess, 512, FP32)
    bf16 = predict_logits(model, data.val, data.preprocess, 512, choose_precision("bf16", CPU))
    assert torch.allclose(result.val_logits, fp32, atol=1e-5, rtol=0)
    assert (result.val_logits - bf16).abs().max() > 1e-3  # the check would see bf16 outputs


def test_sticky_device_errors_and_library_allocation_failures_are_told_apart() -> None:
    sticky = torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
    assert is_sticky_device_error(sticky) and not is_out_of_memory(sticky)
    assert is_sticky_device_error(RuntimeError("CUDA error: device-side assert triggered\nCompile with ..."))
    for text in ("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
                 "cuDNN error: CUDNN_STATUS_ALLOC_FAILED"):
        assert is_out_of_memory(RuntimeError(text)) and not is_sticky_device_error(RuntimeError(text))
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    for other in (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), ValueError("CUDA error: nope")):
        assert not is_sticky_device_error(other) and not is_out_of_memory(other)


@pytest.mark.slow
@pytest.mark.inprocess
@pytest.mark.timeout(900)
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")])])
def test_compile_once_per_worker_reused_by_later_trials_with_other_dropout(device: str,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """[train] compile: the first trial compiles (training and evaluation graphs); four more trials with other
    dropout values and seeds recompile nothing (Dynamo is told to raise on any recompilation)."""
    import functools

    import torch._dynamo
    from torch._dynamo.utils import counters

    import hpsearch.train._compile

    if device == "cpu":
        # What recompiles is Dynamo's decision (its guards on the module, its parameters and the dropout buffer),
        # whatever backend then compiles the graph: on the CPU the graphs go to aot_eager (AOTAutograd's joint
        # training graph, run eagerly), not Inductor, whose C++ build of a ResNet-18 costs CI a minute and a half.
        # The cuda case compiles with Inductor, as a study does.
        aot_eager = functools.partial(torch.compile, backend="aot_eager")
        monkeypatch.setattr(hpsearch.train._compile.torch, "compile", aot_eager)

    cfg = DataSection(dataset="digits", image_size=16, subset=160, augment=["crop"])
    pool = load_pool(cfg)
    data = trial_data(pool, make_split(pool, cfg, 0), cfg, False, torch.device(device))
    train = TrainSection(epochs=1, batch_size=32, device=device, compile=True)
    torch._dynamo.reset()
    counters.clear()
    values = []
    try:
        for trial, p in enumerate((0.0, 0.1, 0.25, 0.4, 0.5)):
            result = train_trial(ModelSection(arch="resnet18"), train, data,
                                 Hyperparams(lr=1e-3, optimizer="adam", scheduler="none", dropout=p), seed=trial,
                                 device=torch.device(device))
            values.append(result.best.val_accuracy)
            if trial == 0:
                graphs = counters["stats"]["unique_graphs"]
                assert graphs >= 1
                torch._dynamo.config.error_on_recompile = True  # from here, any recompilation fails the test
        assert counters["stats"]["unique_graphs"] == graphs
    finally:
        torch._dynamo.config.error_on_recompile = False
        torch._dynamo.reset()
    assert len(values) == 5


def test_status_tells_gpus_apart_by_name_id_and_peak_memory(tmp_path) -> None:
    import optuna
    from rich.console import Console

    from hpsearch import keys
    from hpsearch.monitor._tables import running_trials_table, status_renderables
    from hpsearch.store import open_storage

    study = optuna.create_study(study_name="g", storage=open_storage(f"sqlite:///{tmp_path / 'g.db'}"),
                                direction="maximize")
    for number, (visible, peak) in enumerate((("4", 2100.0), ("5", 3300.0))):
        trial = study.ask()
        trial.set_user_attr(keys.DEVICE, "cuda:0")
        trial.set_user_attr(keys.GPU, {"index": 0, "name": "NVIDIA H200", "uuid": f"GPU-{visible}",
                                       "memory_mib": 143771, "visible": visible})
        trial.set_user_attr(keys.PEAK_GPU_MIB, peak)
        study.tell(trial, 0.9 + number / 100)
    running = study.ask()
    running.set_user_attr(keys.DEVICE, "cuda:0")
    running.set_user_attr(keys.GPU, {"index": 0, "name": "NVIDIA H200", "uuid": "GPU-5", "visible": "5"})
    console = Console(width=250, record=True)
    console.print(running_trials_table(study, 3))
    for part in status_renderables(study, "sqlite:///g.db", str(tmp_path / "a"), 2, 3):
        console.print(part)
    text = console.export_text()
    assert "cuda:0 (NVIDIA H200, CUDA_VISIBLE_DEVICES=5)" in text
    assert "GPU NVIDIA H200 (GPU-4): peak 2.2 GB per trial of 150.8 GB, over 1 trials" in text
    assert "GPU NVIDIA H200 (GPU-5): peak 3.5 GB" in text
