"""The setup check of image files (diffusion_lab.data.verify) under DDP: the ranks share the
decoding out (rank r of K decodes every K-th file) and all reach the same verdict; a rank whose
cache was warm still takes part, and files no rank decoded are decoded where they are missing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch.distributed as dist
from helpers.formats import write_jpeg
from helpers.gloo import run_gloo_ranks

from diffusion_lab.data.pixels import load_image
from diffusion_lab.data.verify import readable_files
from diffusion_lab.errors import DataError


def write_images(root: Path, count: int = 9, truncated: int = 4) -> list[Path]:
    paths = [root / "images" / f"{i:03d}.jpg" for i in range(count)]
    for i, path in enumerate(paths):
        write_jpeg(path, (20, 16), i)
    paths[truncated].write_bytes(paths[truncated].read_bytes()[:300])
    return paths


def checking_reader(reads: list[str]):
    def read(path: Path) -> None:
        reads.append(path.name)
        load_image(path, 8, 3, None)

    return read


def verify_worker() -> None:
    """One gloo rank: readable_files on the images of $ROOT with its own cache folder; writes
    what it decoded and its verdict to $OUT/rank{r}.json."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    root = Path(os.environ["ROOT"])
    paths = sorted((root / "images").glob("*.jpg"))
    reads: list[str] = []
    readable = readable_files(paths, checking_reader(reads), "skip", root)
    out = Path(os.environ["OUT"]) / f"rank{rank}.json"
    out.write_text(json.dumps({"reads": reads, "readable": readable}))
    dist.destroy_process_group()


def run_ranks(tmp_path: Path, root: Path, caches: list[Path]) -> list[dict]:
    """One gloo rank per cache folder; what each decoded and decided."""
    envs = [{"OUT": str(tmp_path), "ROOT": str(root), "DIFFUSION_LAB_CACHE": str(cache)}
            for cache in caches]  # fmt: skip
    run_gloo_ranks(__file__, "verify_worker", envs)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(len(caches))]


def test_two_ranks_decode_half_the_files_each_and_agree(tmp_path):
    root = tmp_path / "data"
    paths = write_images(root)
    zero, one = run_ranks(tmp_path, root, [tmp_path / "cache", tmp_path / "cache"])
    names = [p.name for p in paths]
    assert zero["reads"] == names[0::2] and one["reads"] == names[1::2]  # every file once
    assert zero["readable"] == one["readable"] == [i for i in range(9) if i != 4]


def test_a_rank_with_a_warm_cache_still_takes_part(tmp_path, monkeypatch):
    """Two nodes, two caches: rank 1's already knows every file, rank 0's knows none. Rank 1
    decodes nothing; rank 0 decodes what rank 1 did not (all of it), and both agree."""
    root = tmp_path / "data"
    paths = write_images(root)
    monkeypatch.setenv("DIFFUSION_LAB_CACHE", str(tmp_path / "warm"))
    readable_files(paths, checking_reader([]), "skip", root)  # rank 1's node checked before
    zero, one = run_ranks(tmp_path, root, [tmp_path / "cold", tmp_path / "warm"])
    assert one["reads"] == [] and sorted(zero["reads"]) == sorted(p.name for p in paths)
    assert zero["readable"] == one["readable"] == [i for i in range(9) if i != 4]


def test_one_process_decodes_every_file_once_and_then_none(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUSION_LAB_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "data"
    paths = write_images(root)
    reads: list[str] = []
    assert readable_files(paths, checking_reader(reads), "skip", root) == [0, 1, 2, 3, 5, 6, 7, 8]
    assert reads == [p.name for p in paths]
    reads.clear()
    with pytest.raises(DataError, match="004.jpg"):  # the cached verdict: nothing decoded
        readable_files(paths, checking_reader(reads), "error", root)
    assert reads == []
