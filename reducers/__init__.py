"""Reducers: per-model pruning schedules derived from findings, applied for real and verified."""

from attnflow.reducers.apply import apply
from attnflow.reducers.derive import Budget, derive
from attnflow.reducers.schedule import Schedule, ScheduleError, load_schedule, save_schedule
from attnflow.reducers.verdict import Verdict, load_verdict
from attnflow.reducers.verify import verify

__all__ = ["Budget", "Schedule", "ScheduleError", "Verdict", "apply", "derive", "load_schedule", "load_verdict",
           "save_schedule", "verify"]
