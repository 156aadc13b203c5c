"""Instance normalisation++ (NCSN, Song & Ermon 2019 App. A; Khungurn sec. 5.3), conditional or not.

For a feature map x with C channels, channel means mu_k and standard deviations s_k,

    z_k = gamma[k] (x_k - mu_k) / s_k + beta[k] + alpha[k] (mu_k - m) / v,

where m and v are the mean and standard deviation of (mu_1, ..., mu_C) over the channels: the
"++" term gives back the channel means that plain instance norm removes (colour shifts). NCSN's
*conditional* version (CIN++) has one (gamma, beta, alpha) per noise level i:
gamma[i, k], beta[i, k], alpha[i, k]. NCSNv2 (Technique 3) uses the unconditional version.

Standard deviations are population ones with eps = 1e-5 under the square root (as
``torch.nn.InstanceNorm2d``), so a single channel (v = 0) is well defined. Initialisation as in
the authors' code: gamma, alpha ~ N(1, 0.02), beta = 0. The authors' code writes
gamma (h + alpha' (mu - m)/v) + beta, i.e. alpha = gamma alpha'; the form above is the paper's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-5


class InstanceNormPlusPlus(nn.Module):
    """Instance norm++ over (B, C, H, W); with ``num_classes`` set, conditional on a level index.

    ``forward(x, y=None)``: ``y`` is a (B,) long tensor of level indices in [0, num_classes) for
    the conditional layer, and must be None for the unconditional one.
    """

    def __init__(self, num_features: int, num_classes: int | None = None) -> None:
        super().__init__()
        self.num_features = num_features
        self.num_classes = num_classes
        rows = 1 if num_classes is None else num_classes
        weight = torch.empty(rows, 3 * num_features)
        nn.init.normal_(weight[:, : 2 * num_features], 1.0, 0.02)  # gamma, alpha
        nn.init.zeros_(weight[:, 2 * num_features :])  # beta
        if num_classes is None:
            self.weight = nn.Parameter(weight[0])
        else:
            self.embed = nn.Embedding(num_classes, 3 * num_features)
            self.embed.weight.data.copy_(weight)

    def coefficients(self, y: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """(gamma, alpha, beta), each (B or 1, C, 1, 1)."""
        if self.num_classes is None:
            if y is not None:
                raise ValueError("unconditional instance norm++ takes no level index")
            params = self.weight[None]
        else:
            if y is None:
                raise ValueError("conditional instance norm++ needs a level index y of shape (B,)")
            params = self.embed(y)
        return tuple(p[:, :, None, None] for p in params.chunk(3, dim=1))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        gamma, alpha, beta = self.coefficients(y)
        mu = x.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
        m = mu.mean(dim=1, keepdim=True)
        v = (mu.var(dim=1, keepdim=True, unbiased=False) + EPS).sqrt()
        # F.instance_norm is (x - mu) / s with s = sqrt(var + EPS), fused into one kernel.
        return gamma * F.instance_norm(x, eps=EPS) + (beta + alpha * (mu - m) / v)
