"""collafuse: split-learning ("collaborative") diffusion, and how much it leaks.

The core package trains and samples the system under audit and records exactly
what crossed to the server. It never imports ``collafuse.attacks``,
``collafuse.defenses`` or ``collafuse.benchmarks``; only the command line and ``collafuse.api`` do.
"""
__version__ = "0.1.0"
