"""Analyses of a Trace: sinks, redundant layers, exit points and cross-modal flow."""

from attnflow.analyses.analyze import analyze
from attnflow.analyses.findings import Findings
from attnflow.analyses.thresholds import Thresholds

__all__ = ["analyze", "Findings", "Thresholds"]
