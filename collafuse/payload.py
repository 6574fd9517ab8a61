"""The one message between the two roles of split diffusion (DESIGN.md §2.2).

A :class:`Payload` is what a client releases and the only thing the server ever
receives (:meth:`collafuse.protocol.Server.receive` refuses anything else). It is a
frozen value with no dependency on either role, so the hook points
(:mod:`collafuse.hooks`) and the transcript can name it without importing the
protocol. Which member image a row came from is NOT part of it: the client hands
those ids to the audit key separately (see :mod:`collafuse.transcript`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

PayloadKind = Literal["cut", "trajectory", "naive"]
PAYLOAD_KINDS: tuple[str, ...] = ("cut", "trajectory", "naive")


@dataclass(frozen=True)
class Payload:
    """One client → server message: a batch of noised images and what the server must know.

    tensor: (B, C, H, W) in its wire dtype; t: (B,) int64 step each row sits at;
    label: (B,) int64 or None (not sent); noise: (B, C, H, W) or None — only the
    ``naive`` kind sends the noise, which makes x0 exactly recoverable.
    scale, offset: set only for a quantised payload, whose tensor holds integer
    codes; the values are code·scale + offset (see :meth:`values`). Both are a
    function of the public schedule and ``t``, so they are not counted as sent.
    """

    client_id: int
    step: int
    kind: str
    t: torch.Tensor
    tensor: torch.Tensor
    label: torch.Tensor | None = None
    noise: torch.Tensor | None = None
    scale: float | None = None
    offset: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in PAYLOAD_KINDS:
            raise ValueError(f"unknown payload kind {self.kind!r}; valid: {', '.join(PAYLOAD_KINDS)}")
        b = self.tensor.shape[0]
        if self.tensor.ndim != 4 or self.t.shape != (b,):
            raise ValueError(f"payload tensor must be (B,C,H,W) with t of shape (B,), got {tuple(self.tensor.shape)} and {tuple(self.t.shape)}")
        if self.label is not None and self.label.shape != (b,):
            raise ValueError(f"payload label must have shape ({b},), got {tuple(self.label.shape)}")
        if self.noise is not None and self.noise.shape != self.tensor.shape:
            raise ValueError("payload noise must have the shape of the tensor")
        if self.scale is not None and self.tensor.is_floating_point():
            raise ValueError("a quantised payload (scale set) must carry integer codes")

    def values(self) -> torch.Tensor:
        """The payload's values: the tensor itself, or code·scale + offset (float32) when quantised."""
        if self.scale is None:
            return self.tensor
        return self.tensor.to(torch.float32) * self.scale + self.offset

    def __len__(self) -> int:
        return int(self.tensor.shape[0])

    def row_wire_bytes(self) -> torch.Tensor:
        """Bytes each row occupies on the wire: every array it carries, at its real dtype. (B,) int64."""
        per_row = self.tensor[0].nbytes + self.t[0].nbytes
        if self.label is not None:
            per_row += self.label[0].nbytes
        if self.noise is not None:
            per_row += self.noise[0].nbytes
        return torch.full((len(self),), per_row, dtype=torch.int64)
