"""Save and load Traces as netCDF (h5netcdf), atomically and with schema checks."""

from __future__ import annotations

from pathlib import Path

import xarray as xr

from attnflow.errors import UserError
from attnflow.fileio import atomic_path
from attnflow.probes import schema


class TraceError(UserError, ValueError):
    """A file is not a readable attnflow trace of the current schema."""


def save_trace(trace: xr.Dataset, path: str | Path) -> Path:
    """Write ``trace`` to ``path`` (.nc): a temp file in the same folder, then a rename."""
    with atomic_path(path) as tmp:
        trace.to_netcdf(tmp, engine="h5netcdf")
    return Path(path)


def load_trace(path: str | Path) -> xr.Dataset:
    """Read a trace fully into memory; a corrupt file or another schema is a TraceError."""
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"trace file {str(path)!r} does not exist")
    try:
        with xr.open_dataset(path, engine="h5netcdf") as ds:
            trace = ds.load()
    except Exception as exc:  # h5py/netCDF raise many types for a damaged file
        raise TraceError(f"{str(path)!r} is not a readable attnflow trace (.nc): {exc}") from exc
    wrong = schema.problems(trace)
    if wrong:
        raise TraceError(f"{str(path)!r} is a netCDF file but not a usable attnflow trace: {'; '.join(wrong)}")
    return trace
