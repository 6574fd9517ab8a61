"""Linkage attacks on the server's view (DESIGN.md §3 T1, §5 (d)): who sent a payload.

- :mod:`.sender`: sender identification. :func:`identify_senders` is the attack (the
  server view and the public protocol only); :func:`score_sender_identification` is the
  scorer (it alone takes the true senders, from the audit key or a simulation).
"""
from collafuse.attacks.linkage.sender import (
    ANONYMOUS_SENDER, SenderIdentification, SenderPredictions, identify_senders, score_sender_identification,
)

__all__ = [
    "ANONYMOUS_SENDER", "SenderIdentification", "SenderPredictions", "identify_senders",
    "score_sender_identification",
]
