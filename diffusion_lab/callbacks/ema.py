"""EMA of the weights through Lightning's own weight-averaging callback, with a warm-up."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from lightning.pytorch.callbacks import WeightAveraging

from diffusion_lab.config_types import OpenUnitFloat


def warmup_ema_decay(decay: float, num_averaged: int) -> float:
    """min(decay, (1 + n) / (10 + n)): the warm-up that keeps an early EMA from being pure noise
    (openai/improved-diffusion#59; the schedule of TensorFlow's ExponentialMovingAverage with
    num_updates, as used by NCSNv2 and Score SDE)."""
    return min(decay, (1 + num_averaged) / (10 + num_averaged))


class WarmupEMA(WeightAveraging):
    """Exponential moving average of the parameters only (never buffers: averaging
    the registered betas and alphas gave black images, denoising-diffusion-pytorch#136), decay warmed up by :func:`warmup_ema_decay`.

    Lightning swaps the averaged weights in for validation (so samples drawn there use EMA), copies
    them into the model when training ends, and saves both in checkpoints.
    """

    def __init__(self, decay: OpenUnitFloat = 0.9999, warmup: bool = True) -> None:
        self.decay = decay
        self.warmup = warmup
        super().__init__(use_buffers=False, multi_avg_fn=self._average)
        self.swapped = False  # the EMA weights are in the model (during a validation)

    def on_train_start(self, trainer, pl_module) -> None:
        """Give the averaged copy the model's buffers as they are now: Lightning copies the
        module at setup, before the method fits its process to the data (``process.fit`` fills
        buffers of new shapes at fit start), and then keeps buffers in sync by an in-place copy,
        which cannot change a shape."""
        if self._average_model is None:
            return
        averaged = self._average_model.module
        for name, buffer in pl_module.named_buffers():
            owner, _, leaf = name.rpartition(".")
            holder = averaged.get_submodule(owner)
            if holder._buffers[leaf].shape != buffer.shape:
                holder._buffers[leaf] = buffer.detach().clone()

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        super().on_validation_epoch_start(trainer, pl_module)
        self.swapped = self._average_model is not None

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        super().on_validation_epoch_end(trainer, pl_module)
        self.swapped = False

    @contextmanager
    def averaged_weights(self, pl_module) -> Iterator[None]:
        """The averaged weights in the model inside the block (as during a validation), the
        trained ones back after it; nothing to swap before the first update."""
        if self._average_model is None or self.swapped:
            yield
            return
        self._swap_models(pl_module)
        self.swapped = True
        try:
            yield
        finally:
            self._swap_models(pl_module)
            self.swapped = False

    def restore_training_weights(self, pl_module) -> None:
        """Put the trained weights back if a validation stopped with the EMA ones swapped in,
        so a checkpoint written on that exception holds the right weights in each slot."""
        if self.swapped:
            self._swap_models(pl_module)
            self.swapped = False

    def _average(
        self,
        averaged: list[torch.Tensor],
        current: list[torch.Tensor],
        num_averaged: torch.Tensor,
    ) -> None:
        """averaged <- decay * averaged + (1 - decay) * current for a group of tensors of one
        device and dtype (torch's multi_avg_fn), by foreach kernels. The decay is computed on
        that device from the update count (float64, as the Python float it replaces), so an
        update never waits for the device: no host sync per parameter."""
        n = num_averaged.to(torch.float64)
        decay = n.new_tensor(self.decay)
        if self.warmup:
            decay = torch.minimum(decay, (1 + n) / (10 + n))  # warmup_ema_decay
        dtype = averaged[0].dtype  # a half type computes in float32, as with a Python scalar
        opmath = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        torch._foreach_mul_(averaged, decay.to(opmath))
        torch._foreach_add_(averaged, torch._foreach_mul(current, (1 - decay).to(opmath)))
