"""Save and load Traces as netCDF (h5netcdf), atomically, chunked by sample, with schema checks.

A trace is one ``.nc`` file, or — recorded by several processes (attnflow.parallel) — one folder
of shards ``shard-RRRRR-of-WWWWW.nc``, each a contiguous block of samples, read back as one
dataset in input order. On disk every variable is chunked along ``sample`` (about
``CHUNK_BYTES`` per chunk), so ``load_trace(path, chunks=N)`` can hand the analyses dask arrays
that are read N samples at a time instead of the whole trace.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import xarray as xr

from attnflow import parallel
from attnflow.errors import UserError
from attnflow.fileio import OutputError, atomic_path
from attnflow.probes import schema

CHUNK_BYTES = 16 * 2**20


class TraceError(UserError, ValueError):
    """A file is not a readable attnflow trace of the current schema."""


def _encoding(trace: xr.Dataset) -> dict[str, dict[str, tuple[int, ...]]]:
    """netCDF chunk sizes: whole along every dim but ``sample``, about CHUNK_BYTES per chunk."""
    out = {}
    for name, var in trace.variables.items():
        if "sample" not in var.dims or var.dtype == object:
            continue
        per_sample = var.dtype.itemsize * int(np.prod([n for d, n in var.sizes.items() if d != "sample"]))
        rows = int(np.clip(CHUNK_BYTES // max(per_sample, 1), 1, var.sizes["sample"]))
        out[name] = {"chunksizes": tuple(rows if d == "sample" else max(n, 1) for d, n in var.sizes.items())}
    return out


def _write(trace: xr.Dataset, path: Path) -> None:
    trace.to_netcdf(path, engine="h5netcdf", encoding=_encoding(trace))


def shard_name(rank: int, size: int) -> str:
    """The file a rank's shard has inside a sharded trace's folder."""
    return f"shard-{rank:05d}-of-{size:05d}.nc"


def save_trace(trace: xr.Dataset, path: str | Path) -> Path:
    """Write ``trace`` to ``path`` atomically: a temp file in the same folder, then a rename.

    Under a launcher (``attnflow.parallel``: every rank calls this with the shard it recorded),
    ``path`` becomes a folder holding one shard per rank, which appears only once every rank has
    written its shard."""
    path = Path(path)
    world = parallel.world()
    if world.size == 1:
        if path.is_dir():
            raise OutputError(f"cannot write {path}: a folder (a sharded trace?) is in the way")
        with atomic_path(path) as tmp:
            _write(trace, tmp)
        return path
    if path.exists() and not path.is_dir():
        raise OutputError(f"cannot write the sharded trace {path}: a file is in the way")
    with parallel.atomic_shared_dir(path) as folder:
        _write(trace, folder / shard_name(world.rank, world.size))
    return path


def _shards(path: Path) -> list[Path]:
    """A sharded trace's files in rank order, checked to be the whole set."""
    files = sorted(path.glob("shard-*-of-*.nc"))
    if not files:
        raise TraceError(f"{str(path)!r} is a folder without trace shards (shard-*-of-*.nc)")
    size = int(files[0].stem.rsplit("-", 1)[1])
    expected = [path / shard_name(r, size) for r in range(size)]
    if files != expected:
        missing = sorted({p.name for p in expected} - {p.name for p in files})
        raise TraceError(f"{str(path)!r} is not a whole sharded trace: "
                         + (f"missing {', '.join(missing)}" if missing else "shards of different runs"))
    return files


def _open(path: Path, chunks: dict[str, int] | None) -> xr.Dataset:
    """A trace file or folder of shards opened (dask arrays for a folder, or with ``chunks``)."""
    if path.is_dir():
        return xr.open_mfdataset(_shards(path), engine="h5netcdf", combine="nested", concat_dim="sample",
                                 data_vars="minimal", coords="minimal", compat="override",
                                 combine_attrs="override", chunks=chunks or {})
    return xr.open_dataset(path, engine="h5netcdf", chunks=chunks)


def load_trace(path: str | Path, chunks: int | None = None) -> xr.Dataset:
    """Read a trace (a .nc file or a folder of shards): into memory, or with ``chunks`` as dask
    arrays of ``chunks`` samples each (read lazily). A corrupt file or another schema is a
    TraceError."""
    path = Path(path)
    if not path.exists():
        raise TraceError(f"trace {str(path)!r} does not exist")
    lazy = {"sample": chunks} if chunks else None
    try:
        with warnings.catch_warnings():  # asking for fewer samples than a stored chunk is what chunks= is for
            warnings.filterwarnings("ignore", message="The specified chunks separate the stored chunks")
            trace = _open(path, lazy)
        if not chunks:
            with trace:
                trace = trace.load()
    except TraceError:
        raise
    except Exception as exc:  # h5py/netCDF raise many types for a damaged file
        raise TraceError(f"{str(path)!r} is not a readable attnflow trace (.nc): {exc}") from exc
    wrong = schema.problems(trace)
    if wrong:
        raise TraceError(f"{str(path)!r} is a netCDF file but not a usable attnflow trace: {'; '.join(wrong)}")
    return trace
