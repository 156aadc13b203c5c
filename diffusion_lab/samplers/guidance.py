"""Class-conditional sampling with a time-dependent classifier (Khungurn sec. 7.4.1; Song et
al. 2021 sec. 5 and App. I.1).

The reverse SDE of p_t(x | y) needs grad log p_t(x | y) = grad log p_t(x) + grad log p_t(y | x)
(Khungurn sec. 7.4, Bayes' rule); :func:`guided_score` supplies the second term as a score
transform, for any sampler. Samplers work in model space (the range the score was trained in).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from diffusion_lab.processes.sde import ScoreFn

Classifier = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def classifier_log_prob_grad(
    classifier: Classifier, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """grad_x log p_t(y | x) from a time-dependent classifier's logits (Khungurn sec. 7.4.1).

    Taken with autograd under ``enable_grad`` and ``inference_mode(False)``, so it also works
    inside samplers decorated with ``no_grad`` and in Lightning's validation loop.
    """
    with torch.inference_mode(False), torch.enable_grad():
        x_in = x.detach().clone().requires_grad_(True)
        log_probs = F.log_softmax(classifier(x_in, t.detach().clone()), dim=-1)
        selected = log_probs.gather(1, y.reshape(-1, 1).expand(x.shape[0], 1)).sum()
        (grad,) = torch.autograd.grad(selected, x_in)
    return grad.detach()


def guided_score(
    score_fn: ScoreFn, classifier: Classifier, y: torch.Tensor | int, scale: float = 1.0
) -> ScoreFn:
    """score(x, t) + scale * grad_x log p_t(y | x): the conditional score of sec. 7.4 for class y.

    ``y`` is one class for the whole batch or one per example; ``classifier(x, t) -> logits`` is
    time-dependent (``methods.classifier.NoisyClassifierMethod.classifier_fn()``) and takes x in
    the score's space. ``scale`` = 1 is Bayes' rule; > 1 sharpens p(y | x) (classifier guidance).
    Use the result with any sampler.
    """

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        labels = torch.as_tensor(y, device=x.device, dtype=torch.long)
        grad = classifier_log_prob_grad(classifier, x, t, labels)
        return score_fn(x, t) + scale * grad

    return fn
