"""Type stubs of sotu_delta (the package's functions; the extension module is private)."""

import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

_Path = str | os.PathLike[str]
_Paths = _Path | Sequence[_Path]

class FineTune:
    """A fine-tune given to merge in place of a delta file (``merge --tuned``)."""

    path: _Path
    def __init__(self, path: _Path) -> None: ...

_Input = _Path | FineTune
_Inputs = _Input | Sequence[_Input]
_Method = Literal["sum", "ties", "iso", "tsv"]
_Device = Literal["auto", "cpu", "cuda"]
_DType = Literal["f32", "f16", "bf16", "f64"]

__version__: str

class SotuDeltaError(Exception): ...
class SotuDeltaUsageError(SotuDeltaError, ValueError): ...
class SotuDeltaWarning(UserWarning): ...

def extract(
    base: _Path,
    tuned: _Path | Mapping[str, Any],
    out: _Path,
    density: float | None = None,
    seed: int = 2411,
    slot: str | None = None,
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    allow_nonfinite: bool = False,
    no_files: bool = False,
    shard_size: str = "5GB",
    quiet: bool = False,
    no_sync: bool = False,
    threads: int | None = None,
) -> dict[str, Any]: ...
def merge(
    base: _Path | None = None,
    deltas: _Inputs | None = None,
    out: _Path | None = None,
    method: _Method | None = None,
    weights: Sequence[float] | None = None,
    *,
    config: _Path | None = None,
    density: float | None = None,
    seed: int | None = None,
    slots: bool = False,
    allow_nonfinite: bool = False,
    rescale: bool | None = None,
    alpha: float | None = None,
    trim: float | None = None,
    dtype: _DType | None = None,
    force: bool = False,
    device: _Device = "auto",
    files_from: int | None = None,
    shard_size: str = "5GB",
    quiet: bool = False,
    no_sync: bool = False,
    threads: int | None = None,
) -> dict[str, Any]: ...
def apply(
    base: _Path,
    delta: _Path,
    out: _Path,
    *,
    rescale: bool = True,
    dtype: _DType | None = None,
    force: bool = False,
    device: _Device = "auto",
    shard_size: str = "5GB",
    quiet: bool = False,
    no_sync: bool = False,
    threads: int | None = None,
) -> dict[str, Any]: ...
def inspect(
    deltas: _Paths, base: _Path | None = None, *, subspaces: bool = False, threads: int | None = None
) -> dict[str, Any]: ...
def verify(base: _Path, deltas: _Paths, *, threads: int | None = None) -> list[dict[str, Any]]: ...
