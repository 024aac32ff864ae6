"""The weights' exponential moving average: torch's AveragedModel with its EMA function, updated without a sync."""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class WeightEMA(AveragedModel):
    """`AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)`: its `module` is a copy
    of the model whose parameters and buffers (BatchNorm's statistics too) follow the trained ones as an EMA,
    `W_ema = decay * W_ema + (1 - decay) * W`, updated after each optimizer step; the first update copies them.

    The same numbers as torch's `update_parameters`, without its two host reads of the `n_averaged` buffer per
    call (`n_averaged == 0`, `n_averaged > 0`): on a GPU each is a device synchronization in the step loop. The
    count is also kept here, on the host; the buffer is still counted on its device, so the state dict (what a
    checkpoint holds) is torch's."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        self.updates = 0

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        ours = [*self.module.parameters(), *self.module.buffers()]
        theirs = [*model.parameters(), *model.buffers()]
        if self.updates == 0:
            for mine, trained in zip(ours, theirs, strict=True):
                mine.detach().copy_(trained)
        else:
            # Grouped by dtype as torch does (its EMA function lerps floats; integer buffers, such as
            # BatchNorm's num_batches_tracked, it averages and truncates).
            groups: dict[torch.dtype, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
            for mine, trained in zip(ours, theirs, strict=True):
                pair = groups.setdefault(mine.dtype, ([], []))
                pair[0].append(mine.detach())
                pair[1].append(trained.detach())
            for mine_group, trained_group in groups.values():
                self.multi_avg_fn(mine_group, trained_group, self.n_averaged)  # type: ignore[misc]
        self.n_averaged += 1
        self.updates += 1

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # type: ignore[override]
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self.updates = int(self.n_averaged)  # once, on a resume
        return result
