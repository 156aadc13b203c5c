"""The LightningModule every method family shares: training, EMA sampling, metrics, guards."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn

from diffusion_lab.config_types import NonNegativeInt, PositiveInt, Probability
from diffusion_lab.errors import ConfigError
from diffusion_lab.gathering import distributed, gather_on_rank_zero
from diffusion_lab.methods.training import TrainingModule
from diffusion_lab.metrics import image_quality
from diffusion_lab.metrics.evaluator import check_samples_finite
from diffusion_lab.processes.base import ForwardProcess
from diffusion_lab.sample_streams import SampleStreams
from diffusion_lab.samplers.base import SampleResult
from diffusion_lab.score_model import ScoreModel

Loss = Callable[[ScoreModel, torch.Tensor], torch.Tensor]
Sampler = Callable[..., SampleResult]
Evaluator = Callable[[torch.Tensor, Any], dict[str, float]]
#: Training examples a process's ``fit`` sees at most (a prior, a schedule: statistics of the set).
MAX_FIT_EXAMPLES = 10_000


class DiffusionMethod(TrainingModule):
    """A process, a network (through its parameterisation), a loss and a sampler.

    Ranges, optimiser and checkpoints as ``TrainingModule``: data map from ``data_range`` to
    ``model_range``; the optimiser partial (Adam by default) warms up linearly over
    ``warmup_steps`` (Ho et al. App. B: 5000 steps); gradient clipping is the Trainer's
    ``gradient_clip_val``. ``dequantize`` adds uniform noise within each 8-bit bin to the training
    data, x 255/256 + U/256 (NCSN's released code). Sampling starts from the process's
    prior (``process.prior_sampling``: NCSN's U[0, 1]^D is the VE process's ``prior: uniform``)
    and the sampler receives the model itself (``ScoreModel``: a score callable with
    ``denoised``). A process that estimates something from the training data (``process.fit``)
    is fitted once at the start of a fresh run and restored from checkpoints otherwise. At each
    validation the EMA weights (swapped in by the EMA callback) draw ``num_eval_samples``
    samples, which ``evaluator`` scores against held-out data, and, for images, the clean-image
    estimate from x_t at each of ``reconstruction_times`` is scored against the first
    validation batch (``recon/ssim_t*``, ``recon/psnr_t*``): SSIM curves beside FID-type ones.
    Samples are drawn in batches of ``sample_batch_size``, sample i seeded from
    (``sample_seed``, i), so that neither the batch size nor the number of devices that share
    the batches (``diffusion_lab.sample --devices``) changes them (:meth:`generate`).
    ``compile`` compiles the network with ``torch.compile`` (``nn.Module.compile``: in place, so
    the weights, the EMA copy and the checkpoint keys stay those of the eager network);
    ``channels_last`` stores its 4-D weights and feeds it images in NHWC memory order (the same
    values and keys: a memory layout that GPU convolutions run faster in, under bf16 above all).
    """

    def __init__(
        self,
        network: nn.Module,
        process: ForwardProcess,
        loss: Loss,
        sampler: Sampler,
        optimizer: Callable[..., torch.optim.Optimizer],
        parameterization: str = "eps",
        data_range: Sequence[float] | None = (0.0, 1.0),
        model_range: Sequence[float] | None = (-1.0, 1.0),
        warmup_steps: int = 0,
        num_eval_samples: NonNegativeInt = 256,
        sample_seed: int = 0,
        sample_batch_size: PositiveInt = 256,
        dequantize: bool = False,
        reconstruction_times: Sequence[Probability] = (),
        evaluator: Evaluator | None = None,
        run_config: dict | None = None,
        compile: bool = False,
        channels_last: bool = False,
        label_dropout: Probability = 0.0,
        guidance_scale: float = 1.0,
    ) -> None:
        super().__init__(optimizer, data_range, model_range, warmup_steps, run_config)
        self.num_classes = int(getattr(network, "num_classes", 0))
        if label_dropout and not self.num_classes:
            raise ConfigError(
                f"method.label_dropout={label_dropout} needs a class-conditional network: set "
                "network.num_classes (e.g. 10 for digits)"
            )
        self.label_dropout, self.guidance_scale = float(label_dropout), float(guidance_scale)
        if channels_last:
            network.to(memory_format=torch.channels_last)
        if compile:
            network.compile()
        self.model = ScoreModel(network, process, parameterization, channels_last)
        self.process = process
        self.loss_fn = loss
        self.sampler = sampler
        self.num_eval_samples = num_eval_samples
        self.reconstruction_times = tuple(reconstruction_times)
        self.sample_seed = sample_seed
        self.sample_batch_size = sample_batch_size
        self.dequantize = dequantize
        self.evaluator = evaluator
        self.last_samples: torch.Tensor | None = None
        self.last_nfe: int | None = None
        self.check_parts()

    def check_parts(self) -> None:
        """Stop at build time on parts that cannot work together (a subclass's rules)."""

    # ---------------------------------------------------------------- training
    def score_fn(self) -> ScoreModel:
        """The learned model in model range, for any sampler: ``score(x, t)`` when called, and
        ``denoised(x, t)``."""
        return self.model

    def on_fit_start(self) -> None:
        """Fit the process to the training data on a fresh run (a resumed one restored it)."""
        if self.process.needs_fit and self.trainer.ckpt_path is None:
            self.process.fit(self.fit_examples(self.trainer.datamodule).to(self.device))

    def fit_examples(self, datamodule: L.LightningDataModule) -> torch.Tensor:
        """The training examples, in model range, that the process is fitted to: at most
        ``MAX_FIT_EXAMPLES`` of them in their order, chosen by a generator seeded by
        ``sample_seed`` (the global RNG, training's, is left alone), so that a large set is
        never stacked whole."""
        dataset = datamodule.dataset("train")
        generator = torch.Generator().manual_seed(self.sample_seed)
        order = torch.randperm(len(dataset), generator=generator)[:MAX_FIT_EXAMPLES]
        items = [dataset[int(i)] for i in order.sort().values]
        x = torch.stack([item[0] if isinstance(item, (list, tuple)) else item for item in items])
        return self.to_model_range(x)

    def batch_loss(self, x: torch.Tensor) -> torch.Tensor:
        """The loss of a batch in model range (a method may give the loss more context)."""
        return self.loss_fn(self.model, x)

    def batch_classes(self, batch: Any, dropout: float) -> torch.Tensor | None:
        """A class-conditional network's classes of a batch (images, labels), each replaced by
        -1 ("no class") with probability ``dropout`` (Ho & Salimans 2022 Alg. 1: one network
        learns the conditional and the unconditional model); None for other networks."""
        if not self.num_classes:
            return None
        if not isinstance(batch, (list, tuple)) or len(batch) < 2:
            raise ConfigError(
                "network.num_classes is set but the data give no labels: use a labelled data "
                "set (digits, mnist, cifar10, imagenet)"
            )
        labels = batch[1].long()
        dropped = torch.rand(labels.shape, device=labels.device) < dropout
        return torch.where(dropped, -1, labels)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        if self.dequantize:
            x = x * 255 / 256 + torch.rand_like(x) / 256
        with self.model.conditioned(self.batch_classes(batch, self.label_dropout)):
            loss = self.batch_loss(self.to_model_range(x))
        self.check_finite(loss)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = self.to_model_range(batch[0] if isinstance(batch, (list, tuple)) else batch)
        with self.model.conditioned(self.batch_classes(batch, 0.0)):
            loss = self.batch_loss(x)
        self.log("val/loss", loss, on_epoch=True, sync_dist=True)
        if batch_idx == 0 and x.ndim == 4 and not self.trainer.sanity_checking:
            images = batch[0] if isinstance(batch, (list, tuple)) else batch
            for name, value in self.reconstruction_scores(images).items():
                self.log(f"recon/{name}", value, on_epoch=True, rank_zero_only=True)
        return loss

    @torch.no_grad()
    def reconstruction_scores(self, images: torch.Tensor) -> dict[str, float]:
        """SSIM and PSNR (data range [0, 1]) of ``model.denoised(x_t, t)`` against ``images`` at
        each of ``reconstruction_times``. The noise comes from a generator seeded by
        ``sample_seed``: the same x_t at every validation, and the global RNG (training's) is
        left alone."""
        generator = torch.Generator(device=images.device).manual_seed(self.sample_seed)
        x0 = self.to_model_range(images)
        scores = {}
        for t in self.reconstruction_times:
            times = torch.full((x0.shape[0],), float(t), device=x0.device)
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            x0_hat = self.model.denoised(self.process.sample_marginal(x0, times, noise), times)
            estimate = self.to_data_range(x0_hat)
            scores[f"ssim_t{t:g}"] = image_quality.ssim(estimate, images)
            scores[f"psnr_t{t:g}"] = image_quality.psnr(estimate, images)
        return scores

    def on_validation_epoch_start(self) -> None:
        """Sample and score with the EMA weights. Lightning runs the callbacks' epoch hooks
        before the module's: at this epoch's start the EMA callback has already swapped the
        averaged weights in, while at its end it has already swapped them out again (sampling
        there used the raw weights: FID 8.06 against 3.21 in pytorch-ddpm#22), and the sample-grid and
        curve callbacks, which read ``last_samples`` and the metrics at the epoch end, saw the
        previous validation's. NaN or infinite samples stop the run before any metric
        (``NonFiniteSamplesError``: FID's solver crashes on them), with the step; so does a
        NaN loss since the last check (:meth:`stop_if_diverged`)."""
        self.stop_if_diverged()
        if self.num_eval_samples == 0 or self.trainer.sanity_checking:
            return
        drawn = self.generate_across_ranks(self.num_eval_samples)
        what = f"samples drawn at the validation of step {self.global_step}"
        finite = drawn is None or bool(torch.isfinite(drawn[0]).all())
        if not self.trainer.strategy.broadcast(finite, src=0):  # every rank stops together
            check_samples_finite(
                drawn[0] if drawn is not None else torch.tensor([float("nan")]),
                what if drawn is not None else f"(rank 0's) {what}",
                "the weights have diverged though the loss is finite, or the sampler is "
                "unstable: lower the learning rate (optimizer.lr) or change the sampler, and "
                "resume from the last good checkpoint with ckpt_path=last",
            )
        if drawn is None:  # another rank's: rank 0 scores them
            return
        samples, nfe = drawn
        self.last_samples, self.last_nfe = samples, nfe
        self.log("sample/nfe", float(nfe), rank_zero_only=True)
        for name, value in self.sample_metrics(samples).items():
            self.log(f"metrics/{name}", value, rank_zero_only=True)

    def sample_metrics(self, samples: torch.Tensor, datamodule: Any = None) -> dict[str, float]:
        """The evaluator's scores of samples (data range) against the held-out data of
        ``datamodule`` (default: the trainer's)."""
        if self.evaluator is None:
            return {}
        return self.evaluator(samples, datamodule or self.trainer.datamodule)

    @property
    def batch_alignment(self) -> int:
        """Every sample batch but the last holds a multiple of this many samples (a method
        whose samples depend on their position in the batch says which)."""
        return 1

    def sample_batches(self, num_samples: int, batch_size: int | None = None) -> list[range]:
        """The global indices of each batch that draws ``num_samples`` samples: ``batch_size``
        (default ``sample_batch_size``) rounded up to a multiple of :attr:`batch_alignment`."""
        align = self.batch_alignment
        size = -(-(batch_size or self.sample_batch_size) // align) * align
        return [range(i, min(i + size, num_samples)) for i in range(0, num_samples, size)]

    @torch.no_grad()
    def draw(
        self, indices: range, sample_shape: Sequence[int], **sampler_options: Any
    ) -> tuple[torch.Tensor, int]:
        """Samples number ``indices`` in data range with the current weights, on this module's
        device; returns (samples, NFE). Sample i takes all its noise from its own stream, seeded
        from (``sample_seed``, i) (``sample_streams``), so it is the same in any batch."""
        _, result = self.sample_from_prior(indices, sample_shape, **sampler_options)
        return self.to_data_range(result.samples), result.nfe

    @torch.no_grad()
    def sample_from_prior(
        self, indices: range, sample_shape: Sequence[int], **sampler_options: Any
    ) -> tuple[torch.Tensor, SampleResult]:
        """The prior draws of samples number ``indices`` and the sampler's result from them,
        in model range (:meth:`draw`)."""
        streams = SampleStreams(self.sample_seed, indices, self.device)
        shape = (len(indices), *sample_shape)
        x_init = self.process.prior_sampling(shape, generator=streams, device=self.device)
        # a float64 network (64-true) samples in float64; any other in float32, bf16 included
        if self.model.network_dtype == torch.float64:
            x_init = x_init.double()
        was_training = self.training
        self.eval()
        with self.autocast(), self.model.conditioned(*self.sample_classes(indices)):
            result = self.sampler(
                self.model, self.process, x_init.clone(), generator=streams, **sampler_options
            )
        self.train(was_training)
        return x_init, result

    def sample_classes(self, indices: range) -> tuple[torch.Tensor | None, float]:
        """The classes samples number ``indices`` are drawn for (sample i: class i mod K, so
        every class is drawn alike) and the guidance scale; (None, 1) for an unconditional
        network."""
        if not self.num_classes:
            return None, 1.0
        classes = torch.tensor([i % self.num_classes for i in indices], device=self.device)
        return classes, self.guidance_scale

    def autocast(self) -> AbstractContextManager:
        """The trainer's autocast under ``bf16-mixed`` / ``16-mixed``, which Lightning applies
        around its own steps only: validation and final samples, drawn in hooks, ran in
        float32. Any other precision: nothing (``bf16-true`` / ``64-true`` weights already are
        in their dtype)."""
        plugin = getattr(self._trainer, "precision_plugin", None)
        return plugin.forward_context() if isinstance(plugin, MixedPrecision) else nullcontext()

    def generate(
        self,
        num_samples: int,
        sample_shape: Sequence[int] | None = None,
        batch_size: int | None = None,
        **sampler_options: Any,
    ) -> tuple[torch.Tensor, int]:
        """Draw ``num_samples`` samples in data range, in batches of ``batch_size`` (default
        ``sample_batch_size``), with the current weights; returns (samples, NFE: the most any
        batch took). Sample i is seeded from (``sample_seed``, i): the same samples for any
        batch size, on the same device (to float rounding: a kernel may sum in another order for
        another batch size). ``sample_shape`` (of one example) defaults to the attached
        DataModule's ``data_shape``."""
        shape = tuple(sample_shape or self.trainer.datamodule.data_shape)
        drawn = [
            self.draw(batch, shape, **sampler_options)
            for batch in self.sample_batches(num_samples, batch_size)
        ]
        return torch.cat([samples for samples, _ in drawn]), max(nfe for _, nfe in drawn)

    def generate_across_ranks(self, num_samples: int) -> tuple[torch.Tensor, int] | None:
        """:meth:`generate` with the batches shared out over the DDP ranks (rank r of K draws
        batches r, r + K, ...): rank 0 returns all ``num_samples`` (the samples one process
        draws), the other ranks None; one process draws them all."""
        shape = tuple(self.trainer.datamodule.data_shape)
        batches = self.sample_batches(num_samples)
        rank, world = self.trainer.global_rank, self.trainer.world_size
        mine = []
        for number in range(rank, len(batches), world):
            samples, nfe = self.draw(batches[number], shape)
            mine.append((number, samples.cpu() if distributed() else samples, nfe))
        gathered = gather_on_rank_zero(mine)
        if gathered is None:
            return None
        gathered.sort(key=lambda item: item[0])
        samples = torch.cat([samples for _, samples, _ in gathered]).to(self.device)
        return samples, max(nfe for _, _, nfe in gathered)


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
