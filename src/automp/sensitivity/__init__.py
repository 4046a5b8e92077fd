"""Sensitivity: one measurement pass per model, saved as a SensitivityTable that every solver reads."""

from automp.sensitivity.table import PROXIES, FormatCost, LayerStats, SensitivityTable

__all__ = ["PROXIES", "FormatCost", "LayerStats", "SensitivityTable"]
