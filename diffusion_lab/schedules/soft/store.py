"""Saved blur schedules: the JSON file of a schedule, the cache path keyed by its settings and the
hash of the images it was computed from."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffusion_lab.errors import ConfigError

SCHEDULE_FORMAT = 1


def data_hash(x0: torch.Tensor) -> str:
    """sha256 of the images the schedule was computed from (shape, dtype and float32 bytes)."""
    x = torch.as_tensor(x0).detach().to(torch.float32).contiguous().cpu()
    digest = hashlib.sha256(repr(tuple(x.shape)).encode())
    digest.update(x.numpy().tobytes())
    return digest.hexdigest()


@dataclass
class BlurSchedule:
    """A found schedule as saved: its levels, the settings that produced them, the data's hash
    (None for ``linear``, which needs no data) and what the scheduler reported."""

    name: str
    levels: list[float]
    settings: dict[str, Any]
    data_hash: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    format: int = SCHEDULE_FORMAT


def save_schedule(path: str | Path, schedule: BlurSchedule) -> Path:
    """Write ``schedule`` as JSON to ``path`` (atomically: a temporary file, then a rename)."""
    from diffusion_lab.cache import write_atomic

    path = Path(path)
    text = json.dumps(asdict(schedule), indent=1, sort_keys=True) + "\n"
    write_atomic(path, lambda handle: handle.write(text.encode()))
    return path


def load_schedule(path: str | Path) -> BlurSchedule:
    """Read a schedule written by :func:`save_schedule`; a ConfigError naming the file if it is
    missing or not a schedule."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"blur schedule file {path} does not exist: write it with "
            "`python -m diffusion_lab.soft_schedule [data overrides] --out PATH`"
        )
    try:
        raw = json.loads(path.read_text())
        schedule = BlurSchedule(**raw)
        levels = [float(v) for v in schedule.levels]
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"blur schedule file {path} is not a schedule: {exc}") from None
    if len(levels) < 2 or any(b < a for a, b in zip(levels, levels[1:])):
        raise ConfigError(f"blur schedule file {path}: levels must be >= 2 and non-decreasing")
    schedule.levels = levels
    return schedule


def schedule_cache_path(name: str, key: dict[str, Any]) -> Path:
    """``<cache>/blur_schedules/<name>-<hash of key>.json``."""
    from diffusion_lab.cache import cache_dir

    text = json.dumps(key, sort_keys=True, default=str)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return cache_dir() / "blur_schedules" / f"{name}-{digest}.json"
