"""The errors attnflow raises for bad input; the CLI prints them as one line."""

from attnflow.analyses.findings import FindingsError
from attnflow.analyses.knockout import KnockoutError
from attnflow.models import ModelSpecError
from attnflow.pipeline import RunExistsError
from attnflow.probes.adapters import UnsupportedModelError
from attnflow.probes.inputs import InputError
from attnflow.probes.io import TraceError
from attnflow.reducers.schedule import ScheduleError
from attnflow.reports.rundir import ReportError

USER_ERRORS: tuple[type[Exception], ...] = (ModelSpecError, UnsupportedModelError, InputError, TraceError,
                                            FindingsError, KnockoutError, ScheduleError, ReportError, RunExistsError)
