"""timm models (`[model] arch = "timm:NAME"`): a new head with the trial's dropout, timm-keyed state dicts, local
weights files, freezing, and the refusals (an unknown name, pretrained tags, timm missing). timm's tiny test models
(test_convnext, test_efficientnet, test_vit) keep every test fast; nothing here touches the network."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from hpsearch.cli._main import main
from hpsearch.config import ConfigError, ModelSection, parse_study, read_study_file
from hpsearch.model import build_model, builder_kwargs, check_study_model, head_path, plain_state_dict, set_dropout
from hpsearch.model._build import DropoutLinear, set_train_mode

timm = pytest.importorskip("timm")

NUM_CLASSES = 7


def _build(arch: str = "timm:test_convnext", weights: str = "none", freeze: str = "none", dropout: float = 0.25,
           image_size: int = 32, **kwargs: bool) -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelSection(arch=arch, weights=weights, freeze=freeze), NUM_CLASSES, image_size, dropout,
                       **kwargs)


# ----------------------------------------------------------------------------------- head and dropout


@pytest.mark.parametrize(("arch", "head", "kwargs"), [
    ("timm:test_convnext", "head.fc", {}),
    ("timm:test_efficientnet", "classifier", {}),
    ("timm:test_vit", "head", {"img_size": 32}),  # a fixed input size: its position embedding is built for 32
])
def test_a_timm_model_gets_a_new_head_with_dropout_in_front(arch: str, head: str, kwargs: dict[str, int]) -> None:
    model = _build(arch, dropout=0.25)
    assert head_path(model) == head
    linear = model.get_submodule(head)
    assert linear is model.get_classifier()  # timm's own classifier, replaced in place
    assert isinstance(linear, DropoutLinear) and linear.p == 0.25 and linear.out_features == NUM_CLASSES
    assert builder_kwargs(arch, 32) == kwargs
    # No dropout of timm's own is left on: the trial's is the one in front of the head.
    assert all(m.p == 0 for m in model.modules() if isinstance(m, nn.Dropout))
    assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, NUM_CLASSES)


def test_the_dropout_acts_on_the_head_input_in_training_only() -> None:
    model = _build(dropout=1.0)
    head = model.get_classifier()
    x = torch.randn(4, 3, 32, 32)
    # p = 1 drops every feature: only the head's bias is left; eval keeps the features.
    assert torch.equal(model.train()(x), head.bias.expand(4, NUM_CLASSES))
    assert not torch.allclose(model.eval()(x), head.bias.expand(4, NUM_CLASSES))


def test_a_compiled_trial_s_dropout_is_set_in_place() -> None:
    """tensor_dropout (torch.compile): the probability is a 0-d buffer a new trial fills in."""
    model = _build(dropout=0.0, tensor_dropout=True)
    x = torch.randn(4, 3, 32, 32)
    eval_out = model.eval()(x)
    torch.testing.assert_close(model.train()(x), eval_out)  # ConvNeXt has no BatchNorm: only dropout differs
    set_dropout(model, 0.5)
    assert float(model.get_classifier().p) == 0.5
    assert not torch.allclose(model.train()(x), eval_out)


@pytest.mark.parametrize("arch", ["timm:test_convnext", "timm:test_efficientnet", "timm:test_vit"])
def test_plain_state_dict_loads_strictly_into_timm(arch: str) -> None:
    model = _build(arch, dropout=0.3).eval()
    name = arch.removeprefix("timm:")
    plain = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **builder_kwargs(arch, 32)).eval()
    plain.load_state_dict(plain_state_dict(model), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x))


# ------------------------------------------------------------------------------- local weights files


def _timm_checkpoint(path: Path, num_classes: int = 1000) -> dict[str, torch.Tensor]:
    """A timm test_convnext state dict with its own (1000-class) head, random but not the seed _build uses."""
    torch.manual_seed(1234)
    state = {k: v.contiguous() for k, v in timm.create_model("test_convnext", num_classes=num_classes)
             .state_dict().items()}
    save_file(state, str(path))
    return state


def test_a_local_safetensors_file_loads_the_backbone_of_a_timm_model(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    checkpoint = _timm_checkpoint(path)
    model = _build(weights=str(path), dropout=0.2)
    state = model.state_dict()
    backbone = [k for k in checkpoint if not k.startswith("head.fc.")]
    assert len(backbone) > 20 and set(state) == set(checkpoint)
    for k in backbone:
        assert torch.equal(state[k], checkpoint[k]), k
    # The 1000-class head is dropped: a new one for the study's classes, dropout in front.
    assert state["head.fc.weight"].shape == (NUM_CLASSES, checkpoint["head.fc.weight"].shape[1])
    assert isinstance(model.head.fc, DropoutLinear) and model.head.fc.p == 0.2
    fresh = _build(dropout=0.2).state_dict()
    assert not torch.equal(fresh["stem.0.weight"], checkpoint["stem.0.weight"])  # so the equality means something


def test_a_timm_checkpoint_with_the_same_head_loads_whole(tmp_path: Path) -> None:
    checkpoint = _timm_checkpoint(tmp_path / "trial.safetensors", NUM_CLASSES)
    model = _build(weights=str(tmp_path / "trial.safetensors"))
    for k, v in model.state_dict().items():
        assert torch.equal(v, checkpoint[k]), k


def test_a_weights_file_of_another_timm_model_is_refused(tmp_path: Path) -> None:
    save_file({k: v.contiguous() for k, v in timm.create_model("test_efficientnet").state_dict().items()},
              str(tmp_path / "effnet.safetensors"))
    with pytest.raises(ConfigError) as info:
        _build(weights=str(tmp_path / "effnet.safetensors"))
    text = str(info.value)
    assert info.value.field == "model.weights" and "\n" not in text and "does not fit timm:test_convnext" in text


# ----------------------------------------------------------------------------------------- freezing


def test_frozen_backbone_of_a_timm_model_trains_only_the_head() -> None:
    model = _build("timm:test_efficientnet", freeze="backbone", dropout=0.0)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"classifier.weight", "classifier.bias"}
    set_train_mode(model)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(not m.training for m in norms) and model.classifier.training
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x, y = torch.randn(8, 3, 32, 32) * 3 + 1, torch.arange(8) % NUM_CLASSES
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    after = model.state_dict()
    assert {k for k in before if not torch.equal(before[k], after[k])} == {"classifier.weight", "classifier.bias"}


# -------------------------------------------------------------------------------------- refusals


def _study(study_file: Callable[..., Path], arch: str, weights: str = "none") -> Path:
    return study_file(model={"arch": arch, "weights": weights})


def test_a_study_of_a_timm_model_passes_the_check(study_file: Callable[..., Path]) -> None:
    for arch in ("timm:test_convnext", "timm:test_vit", "timm:resnet10t"):
        check_study_model(read_study_file(_study(study_file, arch)))


def test_an_unknown_timm_name_is_refused_naming_model_arch(study_file: Callable[..., Path]) -> None:
    path = _study(study_file, "timm:convnext_nanoo")
    cfg = read_study_file(path)  # config is timm-free: the name is asked of timm by the model check
    with pytest.raises(ConfigError) as info:
        check_study_model(cfg)
    text = str(info.value)
    assert info.value.field == "model.arch" and "\n" not in text
    assert "model.arch" in text and str(path) in text and "'convnext_nanoo'" in text and "timm.list_models()" in text
    assert "e.g. timm:convnext_nano" in text  # the closest names this timm has


def test_a_timm_model_whose_classifier_is_no_linear_is_refused(study_file: Callable[..., Path]) -> None:
    # A distilled DeiT has two heads (get_classifier() is a tuple): there is no one head to replace.
    with pytest.raises(ConfigError) as info:
        check_study_model(read_study_file(_study(study_file, "timm:deit_tiny_distilled_patch16_224")))
    text = str(info.value)
    assert info.value.field == "model.arch" and "\n" not in text and "not one nn.Linear" in text, text


@pytest.mark.parametrize(("model", "field", "words"), [
    ({"arch": "timm:ConvNeXt"}, "model.arch", ("timm:NAME", "lowercase")),
    ({"arch": "timm:resnet50.a1_in1k"}, "model.arch", ("no pretrained tag",)),  # a tag names weights to fetch
    ({"arch": "timm:test_convnext", "weights": "DEFAULT"}, "model.weights", ("never downloads", "local")),
    ({"arch": "timm:test_convnext", "weights": "IMAGENET1K_V1"}, "model.weights", ("never downloads",)),
])
def test_timm_names_and_weights_hpsearch_never_fetches_are_refused_when_parsed(
        model: dict[str, str], field: str, words: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError) as info:
        parse_study({"study": {"name": "t"}, "model": model})
    text = str(info.value)
    assert info.value.field == field and "\n" not in text and all(w in text for w in words), text


def test_without_timm_a_timm_study_says_how_to_install_it(study_file: Callable[..., Path],
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    path = _study(study_file, "timm:test_convnext")
    assert main(["check", str(path)]) == 0
    capsys.readouterr()
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` raises ImportError, as when it is not installed
    with pytest.raises(ConfigError) as info:
        check_study_model(read_study_file(path))
    text = str(info.value)
    assert info.value.field == "model.arch" and "\n" not in text
    assert "pip install 'hpsearch[timm]'" in text and "timm:test_convnext" in text
    # `hpsearch check` (as `run`): exit 2 and that one line, no traceback.
    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install 'hpsearch[timm]'" in err and "model.arch" in err and "Traceback" not in err
