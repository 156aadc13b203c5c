"""Rectified flow with one reflow step (Liu et al. 2023, sec. 2.2 and Alg. 1): train a flow on
the data (1-rectified flow), draw pairs (z, x = the flow's ODE from z), and train on to straighten
it on those pairs (2-rectified flow): the loss then regresses z - x at x_t = (1 - t) x + t z, whose
paths no longer cross, so the flow's paths straighten and a few-step solver goes further."""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Any

import torch

from diffusion_lab.callbacks.ema import WarmupEMA
from diffusion_lab.config_types import PositiveInt
from diffusion_lab.errors import ConfigError
from diffusion_lab.losses.flow_matching import FlowMatchingLoss
from diffusion_lab.methods.base import DiffusionMethod

log = logging.getLogger("diffusion_lab")
#: Pairs are drawn for sample numbers from here on: their noise streams are not those of the
#: evaluation samples (numbers 0, 1, ...), which would otherwise start from training pairs' z.
PAIR_OFFSET = 2**40


class ReflowMethod(DiffusionMethod):
    """A flow-matching method that, at step ``reflow_step``, draws ``num_pairs`` pairs (z, x)
    with its sampler and its EMA weights (the online ones before any average exists) and from
    then on trains on minibatches of them: ``loss(model, x, noise=z)`` in place of the data
    batch with fresh noise. The pairs travel in checkpoints (a resumed run does not redraw
    them). The network keeps training from its weights, as Liu et al. initialise the
    2-rectified flow from the 1-rectified one."""

    def __init__(
        self, *args: Any, reflow_step: PositiveInt = 1000, num_pairs: PositiveInt = 4096,
        **kwargs: Any,
    ) -> None:  # fmt: skip
        self.reflow_step, self.num_pairs = int(reflow_step), int(num_pairs)
        super().__init__(*args, **kwargs)
        self.pairs: tuple[torch.Tensor, torch.Tensor] | None = None

    def check_parts(self) -> None:
        if not isinstance(self.loss_fn, FlowMatchingLoss):
            raise ConfigError(
                f"method=reflow trains on (noise, sample) pairs with loss=flow_matching, got "
                f"{type(self.loss_fn).__name__}: set loss=flow_matching"
            )
        if self.num_classes:
            raise ConfigError("method=reflow draws unconditional pairs: set network.num_classes=0")

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
        skip = super().on_train_batch_start(batch, batch_idx)
        if skip is None and self.pairs is None and self.global_step >= self.reflow_step:
            self.pairs = self.draw_pairs()
        return skip

    @torch.no_grad()
    def draw_pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``num_pairs`` (z, x) in model range, x the sampler's image of z under the EMA
        weights."""
        log.info("reflow at step %d: drawing %d pairs", self.global_step, self.num_pairs)
        shape = tuple(self.trainer.datamodule.data_shape)
        ema = next((c for c in self.trainer.callbacks if isinstance(c, WarmupEMA)), None)
        noise, data = [], []
        with ema.averaged_weights(self) if ema is not None else nullcontext():
            for batch in self.sample_batches(self.num_pairs):
                indices = range(PAIR_OFFSET + batch.start, PAIR_OFFSET + batch.stop)
                z, result = self.sample_from_prior(indices, shape)
                noise.append(z)
                data.append(result.samples.to(z.dtype))
        return torch.cat(noise), torch.cat(data)

    def batch_loss(self, x: torch.Tensor) -> torch.Tensor:
        """Before the reflow, the flow-matching loss of the data batch; after it, of a batch
        of the same size drawn from the pairs."""
        if self.pairs is None:
            return super().batch_loss(x)
        noise, data = self.pairs
        index = torch.randint(len(noise), (x.shape[0],), device=x.device).to(noise.device)
        return self.loss_fn(self.model, data[index].to(x), noise[index].to(x))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.pairs is not None:
            checkpoint["reflow_pairs"] = [p.cpu() for p in self.pairs]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        pairs = checkpoint.get("reflow_pairs")
        if pairs is not None:
            self.pairs = (pairs[0], pairs[1])  # moved to each batch's device when used
