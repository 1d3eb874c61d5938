"""Reducers: per-model pruning schedules derived from findings, applied for real and verified."""

from attnflow.reducers.apply import apply
from attnflow.reducers.schedule import Schedule, ScheduleError, load_schedule, save_schedule

__all__ = ["Schedule", "ScheduleError", "apply", "load_schedule", "save_schedule"]
