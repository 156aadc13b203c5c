"""What the LightningModule and Trainer cost per training step (issue 12 item 5): the default run's
training step through the project's method and Trainer against a plain PyTorch loop with the same
network, optimizer, EMA, gradient clipping, loss and batches, side by side in one process.

Both start from the same initial weights. The Lightning arm is ``python -m diffusion_lab.run``'s
configuration (callbacks, CSV logger, progress bar) with validation and checkpoint writing
switched off (they are not per-step costs); the plain arm is a ``for`` loop over the same
DataLoader: the method's loss, backward, ``clip_grad_norm_(1.0)``, Adam, and the EMA update of
``callbacks.ema`` (``torch.optim.swa_utils.AveragedModel`` with the same warm-up decay). A step
is timed from the start of step ``--warmup`` to the end of the last one, so the start-up (model
summary, data set-up) is not counted; the arms alternate for ``--rounds`` rounds and the ratio
of the medians is reported. If it exceeds 5%, Lightning arms with single parts switched off
(progress bar, logger, EMA callback) say where the difference goes.

Usage: ``python experiments/overhead.py [--steps 300] [--rounds 3] [--quick]``. Writes
``experiments/results/overhead.json``. Run it on a quiet machine: it is a timing.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from torch.optim.swa_utils import AveragedModel

from diffusion_lab.build import build_datamodule, build_method, build_trainer, compose_config
from diffusion_lab.callbacks.ema import WarmupEMA
from diffusion_lab.run import config_dir

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = {
    "lightning (the default run)": [],
    "lightning, no progress bar": ["trainer.enable_progress_bar=false"],
    "lightning, no logger": ["~logger"],
    "lightning, no EMA callback": ["callbacks.ema=null"],
}


class StepClock(L.Callback):
    """Seconds per step from the start of step ``warmup`` to the end of the last step."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start = self.end = 0.0
        self.steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.end = time.perf_counter()
        self.steps = trainer.global_step - self.warmup

    @property
    def seconds_per_step(self) -> float:
        return (self.end - self.start) / self.steps


def configure(extra: list[str], steps: int, run_dir: str):
    overrides = [f"run_dir={run_dir}", f"trainer.max_steps={steps}",
                 "trainer.check_val_every_n_epoch=100000", "trainer.enable_model_summary=false",
                 "callbacks.checkpoint=null", "callbacks.sample_grid=null", "callbacks.curves=null",
                 *extra]  # fmt: skip
    return compose_config(config_dir(), overrides)


def lightning_arm(extra: list[str], steps: int, warmup: int, initial: dict) -> float:
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = configure(extra, steps, run_dir)
        datamodule, _ = build_datamodule(cfg)
        method = build_method(cfg, [])
        method.model.network.load_state_dict(initial)
        trainer = build_trainer(cfg)
        clock = StepClock(warmup)
        trainer.callbacks.append(clock)
        trainer.fit(method, datamodule=datamodule)
        return clock.seconds_per_step


def plain_arm(steps: int, warmup: int, initial: dict) -> float:
    cfg = configure([], steps, "unused")
    datamodule, _ = build_datamodule(cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")
    method = build_method(cfg, [])
    network = method.model.network
    network.load_state_dict(initial)
    optimizer = cfg.optimizer
    adam = torch.optim.Adam(network.parameters(), lr=float(optimizer.lr))
    decay = float(cfg.callbacks.ema.decay)
    ema = AveragedModel(network, use_buffers=False, multi_avg_fn=WarmupEMA(decay)._average)
    loader = datamodule.train_dataloader()
    method.train()
    step, start = 0, 0.0
    while step < steps:
        for batch in loader:
            if step == warmup:
                start = time.perf_counter()
            loss = method.loss_fn(method.model, method.to_model_range(batch[0]))
            adam.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(
                network.parameters(), float(cfg.trainer.gradient_clip_val)
            )
            adam.step()
            ema.update_parameters(network)
            step += 1
            if step == steps:
                break
    return (time.perf_counter() - start) / (steps - warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="40 steps, 1 round")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup, args.rounds = 40, 10, 1
    torch.manual_seed(0)
    cfg = configure([], args.steps, "unused")
    initial = copy.deepcopy(build_method(cfg, []).model.network.state_dict())
    times: dict[str, list[float]] = {"plain PyTorch loop": [], "lightning (the default run)": []}
    for _ in range(args.rounds):
        times["lightning (the default run)"].append(
            lightning_arm([], args.steps, args.warmup, initial)
        )
        times["plain PyTorch loop"].append(plain_arm(args.steps, args.warmup, initial))
    median = {name: statistics.median(values) for name, values in times.items()}
    ratio = median["lightning (the default run)"] / median["plain PyTorch loop"]
    result = {"steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
              "quick": args.quick, "seconds_per_step": times, "median": median,
              "ratio_lightning_to_plain": ratio, "threads": torch.get_num_threads()}  # fmt: skip
    if ratio > 1.05:
        for name, extra in VARIANTS.items():
            if extra:
                runs = [lightning_arm(extra, args.steps, args.warmup, initial)
                        for _ in range(args.rounds)]  # fmt: skip
                result["seconds_per_step"][name] = runs
                result["median"][name] = statistics.median(runs)
    print(json.dumps(result["median"], indent=1), f"\nratio {ratio:.3f}")
    name = "overhead_quick" if args.quick else "overhead"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
