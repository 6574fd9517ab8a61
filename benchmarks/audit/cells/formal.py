"""The formal ε a cell reports (DESIGN §5), read from the defenses' typed setting, never re-derived here."""
from __future__ import annotations

from collafuse.defenses import SettingSummary, describe_setting, setting_from_run
from collafuse.runs import Run


def payload_epsilon(config) -> float:
    """The payload channel's formal ε per client image of a configured (untrained) setting."""
    return describe_setting(config.defenses, config).payload_guarantee.epsilon


def run_setting(run: Run) -> SettingSummary:
    """A trained run's setting as its run.json recorded it (it knows the real Poisson rounds under DP-SGD)."""
    return setting_from_run(run.info, run.config)
