"""Merges into memory as numpy arrays: no file written."""

from __future__ import annotations

import numpy as np

from . import _merged_in_memory, _stated
from ._convert import array_of

__all__ = ["load_merged"]


def load_merged(
    base=None,
    deltas=None,
    *,
    config=None,
    method=None,
    weights=None,
    density=None,
    seed=None,
    slots=False,
    allow_nonfinite=False,
    rescale=None,
    alpha=None,
    trim=None,
    dtype=None,
    force=False,
    device="auto",
    threads=None,
) -> dict[str, np.ndarray]:
    """Merge ``deltas`` onto ``base`` in memory and return the merged checkpoint as a dict of
    tensor name -> numpy array. Takes :func:`sotu_delta.merge`'s arguments (without the
    output's and ``files_from``, as there are no files) and runs the same merge: every array
    holds exactly the bytes that ``sotu-delta merge`` writes for that tensor. ``deltas`` may
    hold :class:`sotu_delta.FineTune` inputs (``--tuned``), and ``config=`` a mergekit
    configuration in place of ``base`` and ``deltas`` (``--config``), as for
    :func:`sotu_delta.merge`. For an apply, pass one delta and ``rescale=True``.

    numpy has no bfloat16 (nor float8): a BF16 tensor is an ``ml_dtypes.bfloat16`` array when
    ml_dtypes is installed, and otherwise a uint16 array of its raw bits (the float8 types
    likewise, as uint8). ``arr.view(ml_dtypes.bfloat16)`` turns raw bits into values.

    Each array is a view of memory the merge filled (no copy); it stays alive as long as the
    array does.
    """
    stated = _stated(base, deltas, config, method, weights, rescale, alpha, trim, density, seed,
                     slots, allow_nonfinite, dtype, force, device, None)
    tensors = _merged_in_memory(stated, threads)
    return {t.name: array_of(t, extended=True) for t in tensors}
