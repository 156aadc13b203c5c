"""FP score embedding as a method (Na, Gao, Wan 2024, Alg. 2): per-image tables, eq. 24.

Before the precomputation starts, the run's memory is estimated (:class:`MemoryEstimate`): the
FP solve of each image (``fokker_planck.solve_memory_bytes``, with its rough duration), the
tables, and a training step and a validation's sampling of the network at the data's size
(its activations tallied on the meta device, nothing allocated). A run that would not fit the
memory available stops there with one line, rather than after minutes of solving or at the
first step's allocation.
"""

from __future__ import annotations

import logging
import math
import os
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.data import Dataset

from diffusion_lab.errors import ConfigError
from diffusion_lab.losses.score_embedding import ScoreEmbeddingLoss
from diffusion_lab.methods.base import DiffusionMethod
from diffusion_lab.metrics import image_quality
from diffusion_lab.processes import fokker_planck
from diffusion_lab.processes.fp_embedding import FPEmbeddingProcess, ImageScoreModel

log = logging.getLogger("diffusion_lab")

#: The most distinct training images the embedding serves (``FPEmbeddingProcess.fit``'s limit).
MAX_IMAGES = 64
#: Copies of the weights beside a step's tensors (their gradients are among those): the weights,
#: Adam's two moments and the EMA copy.
PARAMETER_COPIES = 4
#: Batch-sized tensors of the loss or the sampler beside the network's (x_0, the noise, x_t, the
#: target, the sampler's state), counted as float32 (C, H, W) images.
BATCH_TENSORS = 6


# ----------------------------------------------------------------------------- memory
def available_memory_bytes() -> int:
    """Memory this process can still use: psutil's ``available`` if installed, else
    ``MemAvailable`` of /proc/meminfo, else the physical memory; capped by a cgroup limit."""
    try:
        import psutil

        free = int(psutil.virtual_memory().available)
    except ImportError:
        free = _meminfo_available() or os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    limit = _cgroup_room()
    return free if limit is None else min(free, limit)


def _meminfo_available() -> int | None:
    """``MemAvailable`` of /proc/meminfo in bytes (Linux), None elsewhere."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_room() -> int | None:
    """What a container's memory limit leaves (cgroup v2, then v1), None without a limit."""
    for limit, usage in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):  # fmt: skip
        try:
            cap, used = Path(limit).read_text().strip(), int(Path(usage).read_text())
        except (OSError, ValueError):
            continue
        if cap.isdigit() and int(cap) < 1 << 60:  # v1 writes "no limit" as a huge number
            return max(int(cap) - used, 0)
    return None


def device_memory_bytes(device: torch.device) -> int:
    """Memory free for tensors on ``device``: the GPU's free memory plus what PyTorch's cache
    holds unused; the host's (:func:`available_memory_bytes`) for the CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    return available_memory_bytes()


def gib(size: float) -> str:
    """Bytes in MiB, GiB or TiB, for messages."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size / 2**20:.0f} MiB"


class _LiveBytes(TorchDispatchMode):
    """The most bytes alive at once among the tensors the operations under it create.

    Each new storage counts from the operation that creates it until the last tensor on it is
    freed (weak references: PyTorch keeps a tensor's Python object while autograd still holds
    it, so the activations saved for backward count until backward frees them). On the meta
    device this is the allocation profile of the real device without allocating anything (a
    training step of the U-Net on the CPU: within 2 % of the profiler's peak, tested).
    """

    def __init__(self) -> None:
        super().__init__()
        self.sizes: dict[int, int] = {}
        self.refs: dict[int, list[weakref.ref]] = {}
        self.live = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        refs = self.refs.get(key)
        if refs is not None and all(ref() is None for ref in refs):
            self.live -= self.sizes.pop(key)
            del self.refs[key]

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            key = tensor.untyped_storage()._cdata
            if key not in self.refs:
                self.sizes[key] = tensor.untyped_storage().nbytes()
                self.refs[key] = []
                self.live += self.sizes[key]
            self.refs[key].append(weakref.ref(tensor, lambda _, key=key: self._release(key)))
        self.peak = max(self.peak, self.live)
        return out


def step_peak_bytes(
    network: nn.Module, batch_shape: Sequence[int], label: torch.Tensor, train: bool
) -> int:
    """Peak bytes of the tensors a batch of ``batch_shape`` creates in ``network``: its forward
    and backward (``train``, the gradients of the weights included) or a forward without
    gradients (sampling). Run on the meta device: shapes only, nothing allocated, so an image
    size whose attention matrix would take terabytes is measured in a second."""
    meta = {
        name: torch.empty_like(value, device="meta").requires_grad_(value.requires_grad and train)
        for name, value in (*network.named_parameters(), *network.named_buffers())
    }
    x = torch.zeros(tuple(batch_shape), device="meta")
    with torch.set_grad_enabled(train), _LiveBytes() as live:
        out = functional_call(network, meta, (x, label.to("meta")))
        if train:
            out.float().square().mean().backward()
        del out
    return live.peak


@dataclass(frozen=True)
class MemoryEstimate:
    """The peaks of a run's phases, in bytes, and the solve's rough duration in seconds.

    ``fit``: embedding the images (host memory, numpy): the solve of one image at a time, the
    tables of all. ``training``: a training step (weights, gradients, Adam, EMA, the batch's
    activations). ``sampling``: a validation's or the final sampling (all samples at once, no
    gradients). ``network`` is False where the network could not be run on the meta device
    (its share is then missing from ``training`` and ``sampling``).
    """

    fit: int
    training: int
    sampling: int
    solve_seconds: float
    network: bool = True

    def peak(self, device: torch.device) -> tuple[int, int]:
        """(host bytes, device bytes): on a GPU the network's phases are its, else the host's
        (the phases follow each other, so the peak is the largest)."""
        if device.type == "cuda":
            return self.fit, max(self.training, self.sampling)
        return max(self.fit, self.training, self.sampling), 0


def fit_bytes(
    shape: Sequence[int], num_images: int, num_steps: int, iteration: str, solve: bool
) -> int:
    """Host memory of ``FPEmbeddingProcess.fit`` for ``num_images`` (C, H, W) images: their
    float32 / float64 copies while distinct ones are found, the solve of one image at a time
    (``solve``: no PDE for ``zero_score``) and the tables (float64 while built, stacked, then
    float32)."""
    if num_images == 0:
        return 0
    values = math.prod(shape)
    table = values * (num_steps + 1)
    solve_peak = fokker_planck.solve_memory_bytes(tuple(shape), num_steps, iteration)
    transport_only = 2 * 8 * table  # zero_score: x^n and its stack
    return num_images * (40 * values + 20 * table) + (solve_peak if solve else transport_only)


# ----------------------------------------------------------------------------- images
def distinct_images(dataset: Dataset, limit: int = MAX_IMAGES) -> torch.Tensor:
    """The distinct images of ``dataset`` (K, C, H, W) in the order of their first occurrence,
    without stacking the copies: an item that is a view of an image already seen (the repeated
    sets are) is recognised by its storage, any other is compared with the K images found.
    Each item is (image, label) and its label must be the image's index in that order (the
    index the method reads from each batch). Stops with a ConfigError beyond ``limit``
    distinct images or at a label that is not the index."""
    found: list[torch.Tensor] = []
    seen: dict[tuple, int] = {}  # where the images found lie (kept alive in found: not reused)
    for i in range(len(dataset)):
        item = dataset[i]
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise ConfigError(
                "method=fp_embedding needs (image, image index) examples: use data=few_images, "
                "data=single_image or an image folder"
            )
        x, label = item
        key = (x.untyped_storage().data_ptr(), x.storage_offset(), x.stride(), x.shape, x.dtype)
        index = seen.get(key)
        if index is None:
            index = next((k for k, image in enumerate(found) if torch.equal(x, image)), len(found))
        check_image_label(i, int(label), index)
        if index < len(found):
            continue
        seen[key] = index
        found.append(x)
        if len(found) > limit:
            raise ConfigError(
                f"the FP embedding is computed per image and the training set holds more than "
                f"{limit} distinct images: use a few images (data=single_image, an image "
                "folder, or data=few_images)"
            )
    return torch.stack(found)


def check_image_label(position: int, label: int, index: int) -> None:
    """A ConfigError unless example ``position``'s label is ``index``, its image's index."""
    if label != index:
        raise ConfigError(
            f"training example {position} is image {index} of the training set (in the order "
            f"of first occurrence) but its label is {label}: the FP embedding reads each "
            "example's image from its label, so the data must label each distinct image by its "
            "index (data=few_images, data=single_image and image folders do, for distinct images)"
        )


class ScoreEmbeddingMethod(DiffusionMethod):
    """A ``DiffusionMethod`` over an ``FPEmbeddingProcess``, trained with eq. 24.

    The process embeds the training images when the run starts (``process.fit``, timed: its
    seconds are :attr:`precompute_seconds`, which ``TimeToTarget`` adds to the training time),
    after :meth:`check_memory` found room for it and for training. A training batch is
    (images, image index): the loss gets the network for those images
    (:class:`ImageScoreModel`: its own time interval per image when ``separate_intervals``) and
    is the loss of the step (``loss.at_step``: Alg. 2 sweeps n = 1..N in order). Sample b
    belongs to image b mod K.
    """

    def check_parts(self) -> None:
        if not isinstance(self.process, FPEmbeddingProcess):
            raise ConfigError("method=fp_embedding needs process=fp_embedding")
        if self.dequantize:
            raise ConfigError(
                "method.dequantize must be false for the FP embedding: the tables are per image"
            )
        if not isinstance(self.loss_fn, ScoreEmbeddingLoss):
            raise ConfigError("method=fp_embedding needs loss=score_embedding (eq. 24)")

    @property
    def batch_alignment(self) -> int:
        """Sample b is image b mod K within its batch: batches of a multiple of K keep sample i
        on image i mod K in any batch."""
        return max(self.process.num_images, 1)

    def on_fit_start(self) -> None:
        """Estimate the memory of the precomputation and of training and stop if it is not
        there; then embed each distinct training image once, found without stacking the copies
        of the repeated data set (in place of ``DiffusionMethod.on_fit_start``, which stacks up
        to 10,000 examples), each example's label checked to be its image's index. A resumed
        run restored the tables: its training images must be the ones they embed."""
        datamodule = self.trainer.datamodule
        shape = tuple(datamodule.data_shape)
        fresh = self.process.needs_fit and self.trainer.ckpt_path is None
        images = distinct_images(datamodule.dataset("train"))
        if not fresh:
            self.check_embedded(self.to_model_range(images))
        estimate = self.memory_estimate(shape, datamodule.batch_size, len(images) if fresh else 0)
        self.check_memory(estimate, shape, datamodule.batch_size)
        unknown = (
            ""
            if estimate.network
            else " (without the network's activations: it does not run on the meta device)"
        )
        log.info(
            "memory estimate: %s for a training step, %s for sampling, %s for the FP embedding "
            "(%s available)%s", gib(estimate.training), gib(estimate.sampling), gib(estimate.fit),
            gib(available_memory_bytes()), unknown,
        )  # fmt: skip
        if fresh:
            log.info(
                "FP embedding of %d image(s) %s: about %.0f s to compute, unless cached (a "
                "rough estimate)", len(images), shape, estimate.solve_seconds * len(images),
            )  # fmt: skip
            self.process.fit(self.to_model_range(images).to(self.device))

    def check_embedded(self, images: torch.Tensor) -> None:
        """A ConfigError unless ``images`` (model range, in index order) are the embedded ones."""
        embedded = self.process.images
        if not torch.equal(images.to(embedded), embedded):
            raise ConfigError(
                f"the training set's {len(images)} distinct image(s) are not the "
                f"{len(embedded)} this checkpoint embedded: resume with the run's own data"
            )

    # ---------------------------------------------------------------- memory
    def memory_estimate(
        self, shape: Sequence[int], batch_size: int, num_images: int
    ) -> MemoryEstimate:
        """The peaks of embedding ``num_images`` (C, H, W) images (0: none, resumed), of a
        training step at ``batch_size`` and of sampling (see :class:`MemoryEstimate`)."""
        process = self.process
        solve = process.embedding == "fokker_planck"
        iteration = process.solver_options["iteration"]
        fit = fit_bytes(shape, num_images, process.num_steps, iteration, solve)
        seconds = fokker_planck.solve_seconds(tuple(shape), process.num_steps) if solve else 0.0
        network = self.model.network
        weights = sum(p.numel() * p.element_size() for p in network.parameters())
        image = 4 * math.prod(shape)
        tables = image * (process.num_steps + 2) * max(num_images, 1)
        samples = max(self.num_eval_samples, int(self.hparams.run_config.get("final_samples", 0)))
        training = PARAMETER_COPIES * weights + BATCH_TENSORS * batch_size * image + tables
        sampling = 2 * weights + BATCH_TENSORS * samples * image + tables
        try:
            training += self.network_peak(shape, batch_size, train=True)
            sampling += self.network_peak(shape, samples, train=False) if samples else 0
        except Exception as exc:  # a network the meta device cannot run: its share is unknown
            log.debug("no activation estimate for %s: %s", type(network).__name__, exc)
            return MemoryEstimate(fit, training, sampling, seconds, network=False)
        return MemoryEstimate(fit, training, sampling, seconds)

    def network_peak(self, shape: Sequence[int], batch_size: int, train: bool) -> int:
        """:func:`step_peak_bytes` of the network for a batch of ``batch_size`` images."""
        label = self.model.label(torch.full((batch_size,), 0.5))
        return step_peak_bytes(self.model.network, (batch_size, *shape), label, train)

    def check_memory(self, estimate: MemoryEstimate, shape: Sequence[int], batch_size: int) -> None:
        """Stop with one line when the estimate exceeds the memory available (the host's, and
        the GPU's when training on one), naming the phase that needs it and the fix."""
        host, device = estimate.peak(self.device)
        local = self.trainer.num_devices if self.device.type == "cpu" else 1  # DDP on one host
        needs = [(host * local, available_memory_bytes(), "memory")]
        if device:
            needs.append((device, device_memory_bytes(self.device), f"{self.device} memory"))
        for need, free, where in needs:
            if need > free:
                solve = f", about {estimate.solve_seconds:.0f} s per image" if estimate.fit else ""
                raise ConfigError(
                    f"this FP embedding run needs about {gib(need)} of {where} but {gib(free)} is "
                    f"available (a training step at data.batch_size={batch_size} on "
                    f"{tuple(shape)} images: {gib(estimate.training)}; sampling: "
                    f"{gib(estimate.sampling)}; the FP solve and tables: {gib(estimate.fit)}"
                    f"{solve}): use a smaller data.image_size (now {shape[-1]}), data.batch_size "
                    "or network, or fewer method.num_eval_samples / final_samples"
                )

    # ---------------------------------------------------------------- training
    @property
    def precompute_seconds(self) -> float:
        """Seconds the embedding took to compute (also when it was read from the cache)."""
        seconds = self.process.precompute_seconds
        return float(seconds) if seconds.numel() else 0.0

    def images_loss(self, x: torch.Tensor, index: torch.Tensor, step: int) -> torch.Tensor:
        """Eq. 24 of examples ``x`` (model range) of the embedded images ``index`` (B,) at
        training step ``step`` (Alg. 2's sweep)."""
        model = ImageScoreModel(self.model, index.to(x.device))
        return self.loss_fn.at_step(step)(model, x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Eq. 24 of a batch of (images, image index)."""
        x, index = batch
        loss = self.images_loss(self.to_model_range(x), index, self.global_step)
        self.check_finite(loss)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        """Eq. 24 on the embedded images (the only ones the method serves), once per validation."""
        if batch_idx > 0:
            return None
        index = torch.arange(self.process.num_images, device=self.device)
        loss = self.images_loss(self.process.images, index, self.global_step)
        self.log("val/loss", loss, on_epoch=True, sync_dist=True)
        return loss

    def sample_metrics(self, samples: torch.Tensor, datamodule: Any = None) -> dict[str, float]:
        """SSIM (windowed, and the paper's global one of eq. 26-29), PSNR and MSE of each sample
        against its own embedded image (data range), whatever the DataModule's held-out split."""
        own = self.process.images[self.process.sample_images(len(samples))]
        targets = self.to_data_range(own).to(samples)
        names = ("ssim", "global_ssim", "psnr", "mse")
        return {name: getattr(image_quality, name)(samples, targets) for name in names}
