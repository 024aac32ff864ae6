"""Models: the new head, dropout before it, plain torchvision state dicts, local weights files, freezing."""

from __future__ import annotations

import os
import shlex
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torchvision import models

from hpsearch.config import ConfigError, ModelSection
from hpsearch.model._build import (
    DropoutLinear,
    build_model,
    dropout,
    head_path,
    load_weights_file,
    plain_state_dict,
    set_train_mode,
)

NUM_CLASSES = 7


def _build(arch: str = "resnet18", weights: str = "none", freeze: str = "none", dropout: float = 0.25,
           image_size: int = 32, num_classes: int = NUM_CLASSES) -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelSection(arch=arch, weights=weights, freeze=freeze), num_classes, image_size, dropout)


@pytest.fixture(scope="module")
def imagenet_resnet18() -> dict[str, torch.Tensor]:
    """A torchvision resnet18 state dict with its 1000-class head (random, but fixed: no download offline)."""
    torch.manual_seed(1234)
    model = models.get_model("resnet18", num_classes=1000)
    # Non-default BatchNorm statistics, so loading them is observable.
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    return {k: v.clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------------- head and dropout


def test_resnet18_gets_a_new_head_with_dropout_in_front() -> None:
    model = _build(dropout=0.25)
    assert head_path(model) == "fc"
    assert isinstance(model.fc, DropoutLinear)
    assert (model.fc.in_features, model.fc.out_features) == (512, NUM_CLASSES)
    assert model.fc.p == 0.25
    # No extra module: the family has no Dropout, and none is stacked elsewhere.
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())
    model.eval()
    assert model(torch.randn(3, 3, 32, 32)).shape == (3, NUM_CLASSES)


def test_dropout_linear_drops_its_input_in_training_only() -> None:
    torch.manual_seed(0)
    layer = DropoutLinear(16, 4, p=1.0)
    x = torch.randn(5, 16)
    # p=1 drops every input: the output is the bias alone; in eval it is the plain Linear.
    assert torch.allclose(layer.train()(x), layer.bias.expand(5, 4))
    assert torch.allclose(layer.eval()(x), nn.functional.linear(x, layer.weight, layer.bias))
    half = DropoutLinear(16, 4, p=0.5).train()
    assert not torch.allclose(half(x), nn.functional.linear(x, half.weight, half.bias))
    # Same parameters and keys as the Linear it replaces.
    assert set(layer.state_dict()) == {"weight", "bias"}
    assert "dropout=1.0" in repr(layer)


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_compiled_dropout_drops_at_its_rate_in_bf16(p: float) -> None:
    """The written-out dropout of compiled models (p a 0-d tensor) on bf16 activations, as under autocast: the
    share of dropped values is p, not p shifted by bf16's grid (drawn in bf16, p = 0.1 dropped 0.1016)."""
    torch.manual_seed(0)
    x = torch.ones(10_000_000, dtype=torch.bfloat16)
    out = dropout(x, torch.tensor(p), training=True)
    assert out.dtype == torch.bfloat16
    dropped = (out == 0).float().mean().item()
    assert abs(dropped - p) < 6e-4, dropped  # 10^7 draws: one standard error is under 1.6e-4
    kept = out[out != 0].float()
    assert torch.allclose(kept, torch.full_like(kept, 1 / (1 - p)), rtol=1e-2)  # inverted dropout's scale


def test_dropout_is_applied_to_the_head_input_of_a_built_model() -> None:
    model = _build(dropout=1.0).train()
    features: list[torch.Tensor] = []
    model.fc.register_forward_hook(lambda _m, args, _out: features.append(args[0]))
    out = model(torch.randn(4, 3, 32, 32))
    # The head sees real features, drops them all (p=1), so only its bias is left; eval keeps them.
    assert features[0].abs().sum() > 0
    assert torch.equal(out, model.fc.bias.expand(4, NUM_CLASSES))
    assert not torch.allclose(model.eval()(torch.randn(4, 3, 32, 32)), model.fc.bias.expand(4, NUM_CLASSES))


@pytest.mark.parametrize(
    ("arch", "head"), [("mobilenet_v3_small", "classifier.3"), ("efficientnet_b0", "classifier.1")]
)
def test_families_with_their_own_dropout_get_it_tuned_not_stacked(arch: str, head: str) -> None:
    model = _build(arch, dropout=0.15)
    assert head_path(model) == head
    linear = model.get_submodule(head)
    assert type(linear) is nn.Linear
    assert linear.out_features == NUM_CLASSES
    before = model.classifier[int(head.rsplit(".", 1)[1]) - 1]
    assert isinstance(before, nn.Dropout)
    assert before.p == 0.15
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.15]
    assert not any(isinstance(m, DropoutLinear) for m in model.modules())
    assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, NUM_CLASSES)


def test_vit_takes_a_small_image_size() -> None:
    model = _build("vit_b_16", image_size=32, dropout=0.1)
    assert head_path(model) == "heads.head"
    assert isinstance(model.heads.head, DropoutLinear) and model.heads.head.p == 0.1
    assert model.image_size == 32
    assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, NUM_CLASSES)


# ------------------------------------------------------------------------- plain torchvision state dict


@pytest.mark.parametrize(
    ("arch", "kwargs"),
    [("resnet18", {}), ("mobilenet_v3_small", {}), ("efficientnet_b0", {}), ("densenet121", {}),
     ("vit_b_16", {"image_size": 32})],
)
def test_plain_state_dict_loads_strictly_into_torchvision(arch: str, kwargs: dict[str, int]) -> None:
    model = _build(arch, dropout=0.3).eval()
    state = plain_state_dict(model)
    assert all(v.device.type == "cpu" and v.is_contiguous() and not v.requires_grad for v in state.values())
    # A copy: changing it leaves the model alone.
    key = next(iter(state))
    state[key].add_(1)
    assert not torch.equal(state[key], model.state_dict()[key])
    state = plain_state_dict(model)

    # ViT's position embedding is built for one size, so it must be told the size; others need nothing.
    plain = models.get_model(arch, num_classes=NUM_CLASSES, **kwargs).eval()
    plain.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(plain(x), model(x), atol=1e-5)


# ------------------------------------------------------------------------------- local weights files


def _write(state: dict[str, torch.Tensor], path: Path) -> Path:
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_local_weights_file_loads_the_backbone_and_gets_a_new_head(
    imagenet_resnet18: dict[str, torch.Tensor], tmp_path: Path, suffix: str
) -> None:
    path = _write(imagenet_resnet18, tmp_path / f"resnet18{suffix}")
    model = _build(weights=str(path), dropout=0.2)
    state = model.state_dict()
    backbone = [k for k in imagenet_resnet18 if not k.startswith("fc.")]
    assert len(backbone) > 100
    for k in backbone:
        assert torch.equal(state[k], imagenet_resnet18[k]), k
    # The head is new, sized for the dataset, with dropout in front.
    assert state["fc.weight"].shape == (NUM_CLASSES, 512) and state["fc.bias"].shape == (NUM_CLASSES,)
    assert isinstance(model.fc, DropoutLinear) and model.fc.p == 0.2
    assert set(state) == set(imagenet_resnet18)


def test_checkpoint_wrapped_in_state_dict_with_module_prefix_loads(
    imagenet_resnet18: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    # What DataParallel training scripts save.
    wrapped = {"state_dict": {f"module.{k}": v for k, v in imagenet_resnet18.items()}, "epoch": 3}
    path = tmp_path / "ddp.pth"
    torch.save(wrapped, path)
    assert load_weights_file(path).keys() == imagenet_resnet18.keys()
    model = _build(weights=str(path))
    assert torch.equal(model.conv1.weight, imagenet_resnet18["conv1.weight"])


def test_checkpoint_with_the_same_head_loads_whole(tmp_path: Path) -> None:
    # A trial's own saved weights: the head is kept too, so the model is the same function.
    first = _build(dropout=0.0).eval()
    path = _write(plain_state_dict(first), tmp_path / "trial.safetensors")
    torch.manual_seed(99)  # a different init, which loading must overwrite
    second = build_model(ModelSection(weights=str(path)), NUM_CLASSES, 32, 0.0).eval()
    for k, v in first.state_dict().items():
        assert torch.equal(second.state_dict()[k], v), k


def test_pickle_that_runs_code_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, (f"touch {shlex.quote(str(marker))}",))

    path = tmp_path / "evil.pt"
    torch.save({"conv1.weight": Payload()}, path)
    with pytest.raises(ConfigError) as info:
        _build(weights=str(path))
    text = str(info.value)
    assert info.value.field == "model.weights"
    assert "\n" not in text
    assert "weights_only=True" in text and "never arbitrary pickles" in text and "GLOBAL" in text and "system" in text
    assert not marker.exists()
    # Control: the payload is live, so the check above means something (our own file, our own tmp dir).
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_weights_file_for_another_architecture_is_refused(tmp_path: Path) -> None:
    path = _write(models.get_model("mobilenet_v3_small").state_dict(), tmp_path / "mobilenet.pt")
    with pytest.raises(ConfigError) as info:
        _build(weights=str(path))
    text = str(info.value)
    assert info.value.field == "model.weights"
    assert "\n" not in text
    assert "does not fit resnet18" in text and "missing" in text and "unexpected" in text
    assert "conv1.weight" in text


def test_weights_file_with_wrong_shapes_is_refused(
    imagenet_resnet18: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    state = dict(imagenet_resnet18)
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    path = _write(state, tmp_path / "odd.safetensors")
    with pytest.raises(ConfigError) as info:
        _build(weights=str(path))
    text = str(info.value)
    assert info.value.field == "model.weights" and "\n" not in text
    assert "does not fit resnet18" in text and "conv1.weight" in text and "[64, 3, 7, 7]" in text


@pytest.mark.parametrize(
    ("name", "content", "words"),
    [
        ("junk.safetensors", b"\x00not a safetensors file", ("not a valid safetensors file",)),
        ("junk.pt", b"not a zip nor a pickle", ("was refused", "weights_only=True")),
    ],
)
def test_corrupt_weights_files_are_refused(tmp_path: Path, name: str, content: bytes, words: tuple[str]) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        _build(weights=str(path))
    assert info.value.field == "model.weights" and "\n" not in str(info.value)
    for word in words:
        assert word in str(info.value)


def test_file_holding_no_state_dict_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(ConfigError, match="holds no state dict of tensors"):
        _build(weights=str(path))


# ----------------------------------------------------------------------------------------- freezing


def test_frozen_backbone_trains_only_the_head_and_keeps_batchnorm_statistics() -> None:
    model = _build(freeze="backbone")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc.weight", "fc.bias"}

    set_train_mode(model)
    assert model.training and model.fc.training
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(not m.training for m in norms)

    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    loss = nn.functional.cross_entropy(model(torch.randn(8, 3, 32, 32) * 3 + 1), torch.arange(8) % NUM_CLASSES)
    loss.backward()
    optimizer.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"fc.weight", "fc.bias"}


def test_unfrozen_model_updates_batchnorm_statistics_in_train_mode() -> None:
    model = _build()
    set_train_mode(model)
    assert all(p.requires_grad for p in model.parameters())
    mean = model.bn1.running_mean.clone()
    model(torch.randn(4, 3, 32, 32) + 2)
    assert not torch.equal(model.bn1.running_mean, mean)


def test_frozen_efficientnet_keeps_its_head_dropout_active() -> None:
    model = _build("efficientnet_b0", freeze="backbone", dropout=0.3)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"classifier.1.weight", "classifier.1.bias"}
    set_train_mode(model)
    assert model.classifier[0].training and model.classifier[0].p == 0.3
    assert all(not m.training for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))


# ------------------------------------------------------------------------------ torchvision weights


def test_unknown_weights_name_lists_the_allowed_names() -> None:
    with pytest.raises(ConfigError) as info:
        _build(weights="IMAGENET2K_V9")
    text = str(info.value)
    assert info.value.field == "model.weights" and "\n" not in text
    assert "'IMAGENET2K_V9'" in text and "resnet18" in text
    assert "DEFAULT" in text and "IMAGENET1K_V1" in text and "none" in text
    assert text.count("DEFAULT") == 1, text


def test_torchvision_weights_without_network_give_a_clear_error_quickly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dead_network: None
) -> None:
    # An empty torch cache, and no way out (the dead proxy), whatever network the test machine has.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    start = time.monotonic()
    with pytest.raises(ConfigError) as info:
        _build(weights="IMAGENET1K_V1")
    assert time.monotonic() - start < 30
    text = str(info.value)
    assert info.value.field == "model.weights" and "\n" not in text
    assert "could not fetch ResNet18_Weights.IMAGENET1K_V1" in text
    # Says where to put the file by hand.
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    assert str(checkpoints / "resnet18-f37072fd.pth") in text
    assert not checkpoints.exists() or not any(checkpoints.iterdir())
