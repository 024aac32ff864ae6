"""Inference strategies of an ensemble's members (hpsearch.predict._members): the loop and the vmapped groups agree."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hpsearch.predict import Ensemble
from hpsearch.predict._members import MemberRunner, resolve_strategy
from hpsearch.predict._score import uncertainty
from hpsearch.preprocess import Preprocess

PRE = Preprocess(32, (0.5,) * 3, (0.25,) * 3)


def _resnets(n: int) -> list[nn.Module]:
    from torchvision import models

    nets = []
    for seed in range(n):
        torch.manual_seed(seed)
        net = models.get_model("resnet18", num_classes=10)
        for bn in (m for m in net.modules() if isinstance(m, nn.BatchNorm2d)):  # buffers that matter
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
        nets.append(net.eval())
    return nets


def _small() -> nn.Module:
    torch.manual_seed(99)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))


def _ensemble(members: list[nn.Module], strategy: str, method: str = "weighted") -> Ensemble:
    weights = [1.0 / len(members)] * len(members) if method != "weighted" else \
        [w / sum(range(1, len(members) + 1)) for w in range(1, len(members) + 1)]
    return Ensemble(members, weights, method, 1.7, [str(c) for c in range(10)], PRE, {}, strategy).eval()


def test_resolve_strategy() -> None:
    assert resolve_strategy("auto", "cpu") == "loop"
    assert resolve_strategy("auto", torch.device("cuda", 0)) == "vmap"
    assert resolve_strategy("vmap", "cpu") == "vmap" and resolve_strategy("loop", "cuda") == "loop"
    with pytest.raises(ValueError, match="not one of auto, loop, vmap"):
        resolve_strategy("fast", "cpu")


@pytest.mark.parametrize("method", ["weighted", "hard"])
def test_vmap_matches_the_loop_with_mixed_architectures(method: str) -> None:
    members = _resnets(3)
    members.insert(2, _small())  # another architecture between the resnets: runs on its own, order kept
    loop = _ensemble(members, "loop", method)
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, expected_members = loop(x), loop.member_probs(x)
    vmap = _ensemble(members, "vmap", method)
    runner = vmap._runner
    assert runner.strategy == "vmap" and [idx for idx, _ in runner.groups] == [[0, 1, 3]] and runner.singles == [2]
    with torch.inference_mode():  # predict/select run under inference mode
        got, got_members = vmap(x), vmap.member_probs(x)
        stats, expected_stats = uncertainty(vmap, got_members), uncertainty(loop, expected_members)
    assert torch.allclose(got_members, expected_members, atol=1e-6)
    assert torch.allclose(got, expected, atol=1e-6)
    for key in ("entropy", "margin", "disagreement"):
        assert torch.allclose(stats[key], expected_stats[key], atol=1e-6)


def test_stacked_members_share_their_tensors_and_restack_when_moved() -> None:
    members = _resnets(2)
    ensemble = _ensemble(members, "vmap")
    (_, group), = ensemble._runner.groups
    stacked = group.params["conv1.weight"]
    assert members[1].conv1.weight.data_ptr() == stacked[1].data_ptr()  # a view, no second copy
    assert members[0].bn1.running_var.data_ptr() == group.buffers["bn1.running_var"][0].data_ptr()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = ensemble(x)
        ensemble.double()  # any _apply (.to, .cuda, .double) restacks for the new tensors
        (_, group), = ensemble._runner.groups
        assert group.params["conv1.weight"].dtype == torch.float64
        assert members[1].conv1.weight.data_ptr() == group.params["conv1.weight"][1].data_ptr()
        assert torch.allclose(ensemble(x.double()), before, atol=1e-6)


def test_members_without_tensors_or_alone_run_in_the_loop() -> None:
    runner = MemberRunner([nn.Identity(), nn.Identity(), _small()], "vmap")
    assert runner.groups == [] and runner.singles == [0, 1, 2]
    assert MemberRunner(_resnets(2), "auto").strategy == "loop"  # on the CPU
