"""The leakage audit (DESIGN.md §7)."""
