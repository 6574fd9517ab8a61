"""Membership inference on payloads (T1), the server model (T2), client models (T3) and
generated samples (T4), with metrics and empirical ε (DESIGN.md §3, §4.2, §4.3)."""
