"""The EMA update: the formula with the warm-up, for any update count and dtype, by foreach
kernels that never wait for the device (no host sync per parameter)."""

import torch
from hypothesis import given
from hypothesis import strategies as st

from diffusion_lab.callbacks.ema import WarmupEMA, warmup_ema_decay

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@given(
    n=st.integers(0, 10**7),
    decay=st.floats(1e-4, 1 - 1e-6),
    warmup=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_update_is_the_per_parameter_formula_bit_for_bit(n, decay, warmup, dtype, seed):
    """decay * averaged + (1 - decay) * current with the Python float decay, as the
    per-parameter update computed it."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [(3, 5), (7,), (2, 1, 4)]
    averaged = [torch.randn(s, generator=generator).to(dtype) for s in shapes]
    current = [torch.randn(s, generator=generator).to(dtype) for s in shapes]
    d = warmup_ema_decay(decay, n) if warmup else decay
    expected = [d * a + (1 - d) * c for a, c in zip(averaged, current)]
    WarmupEMA(decay=decay, warmup=warmup)._average(averaged, current, torch.tensor(n))
    for got, want in zip(averaged, expected):
        assert got.dtype == dtype and torch.equal(got, want)


def test_warmup_decay_is_the_tensorflow_schedule():
    assert warmup_ema_decay(0.9999, 0) == 0.1
    assert warmup_ema_decay(0.9999, 10) == 11 / 20
    assert warmup_ema_decay(0.9999, 10**6) == 0.9999  # (1 + n) / (10 + n) > decay from n ~ 90k


def test_an_update_of_the_ddpm_unet_makes_no_host_sync(monkeypatch):
    """The per-parameter update read ``int(num_averaged)`` once per parameter: 304 host syncs
    per step for the DDPM CIFAR-10 U-Net on a GPU. Now: none from the average itself."""
    from helpers import CONF
    from helpers.syncs import count_host_syncs

    from diffusion_lab.build import compose_config, instantiate

    cfg = compose_config(str(CONF), ["data=cifar10", "network=unet_ddpm_cifar10"])
    network = instantiate(cfg.network)
    params = [p.detach() for p in network.parameters()]
    averaged = [p.clone() for p in params]
    syncs = count_host_syncs(monkeypatch)
    WarmupEMA(decay=0.999)._average(averaged, params, torch.tensor(3))
    monkeypatch.undo()
    assert len(params) == 304 and syncs == []
    d = warmup_ema_decay(0.999, 3)
    assert all(torch.equal(a, d * p + (1 - d) * p) for a, p in zip(averaged, params))
