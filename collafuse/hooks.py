"""Hook points the core defines and later code (defenses) fills in (DESIGN.md §5).

The core never imports a defense. It calls these hooks in order, and the default
of every method is the identity, so a run without hooks is the plain protocol.

- :class:`ReleaseHook` shapes how a client turns images into a payload: change the
  images before noising (clipping), choose the noise (a per-image seed), or
  transform the finished payload (extra noise, quantisation, dropping labels).
- :class:`TrainingHook` wraps a side's model, optimiser and data loader (DP-SGD)
  and reports per-step metrics (ε spent) for the training log.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

if TYPE_CHECKING:
    from collafuse.protocol import Payload

Role = Literal["server", "client"]


class ReleaseHook:
    """Client-side release transformation. Subclasses override what they need."""

    name = "identity"

    def describe(self) -> dict[str, Any]:
        """What this hook is and did (name, parameters, threats covered, guarantees); stored in run.json."""
        return {"name": self.name}

    def prepare(self, x0: torch.Tensor, member_ids: torch.Tensor) -> torch.Tensor:
        """Images (B,C,H,W) before noising; ``member_ids`` (B,) identify them on the client only."""
        return x0

    def draw_noise(
        self, x0: torch.Tensor, member_ids: torch.Tensor, t: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor | None:
        """The release noise (B,C,H,W), or None to let the client draw fresh N(0, I)."""
        return None

    def transform(self, payload: "Payload", generator: torch.Generator) -> "Payload":
        """The finished payload, just before it crosses to the server."""
        return payload

    def release_step(self, t: int) -> int:
        """The step a payload released at ``t`` sits at once :meth:`transform` is done.

        Identity unless the hook adds noise (payload noise moves p to a later t'). The
        core then hands off the sampling chain at that step: the server owns (t', T]
        and the client 1..t'.
        """
        return t


class TrainingHook:
    """Wraps one side's training objects; identity by default."""

    name = "identity"

    def describe(self) -> dict[str, Any]:
        """What this hook is and did (name, parameters, threats covered, ε spent); stored in run.json."""
        return {"name": self.name}

    def wrap(
        self,
        role: Role,
        model: nn.Module | None,
        optimizer: torch.optim.Optimizer | None,
        loader: torch.utils.data.DataLoader | None,
    ) -> tuple[nn.Module | None, torch.optim.Optimizer | None, torch.utils.data.DataLoader | None]:
        """Return the (model, optimizer, loader) this side trains with. The server has no loader.

        On the client side ``model`` and ``optimizer`` are None when the client owns no
        step (t_c = 0); its loader still picks the batches the server trains on.
        """
        return model, optimizer, loader

    def noise_multiplicity(self, role: Role) -> int:
        """Noise draws (t, ε) per image in one step, averaged per image before any per-sample clipping."""
        return 1

    def metrics(self, role: Role, owner: int | None) -> dict[str, Any]:
        """Numbers to add to the training log after each epoch (e.g. ε spent)."""
        return {}
