"""SFT and SOAR losses as pure functions of per-point losses (docs/method.md#step-6-normalisation).

Total = (Σ main + lambda_aux Σ aux) / max(N_main + lambda_aux N_aux, 1), with the counts summed
over all processes. Data-parallel training averages gradients over W processes, so each process
returns its local sums scaled by W / denominator: the averaged gradient is then the gradient of
the global objective, whatever W is.
"""

from __future__ import annotations

import torch


def loss_denominator(n_main: torch.Tensor, n_aux: torch.Tensor, lambda_aux: float) -> torch.Tensor:
    """max(N_main + lambda_aux N_aux, 1) from the global point counts."""
    return (n_main + lambda_aux * n_aux).clamp_min(1.0)


def soar_loss(point_loss: torch.Tensor, is_aux: torch.Tensor, lambda_aux: float,
              normaliser: torch.Tensor | float) -> torch.Tensor:
    """(Σ main + lambda_aux Σ aux) * normaliser for per-point losses ``[P]`` and mask ``is_aux [P]``.

    ``normaliser`` is world_size / loss_denominator(...); with one process and only main points
    this is the SFT mean loss.
    """
    weights = torch.where(is_aux, torch.as_tensor(lambda_aux, dtype=point_loss.dtype), 1.0)
    return (weights * point_loss).sum() * normaliser
