"""Merges into memory as torch tensors: no file written. torch is imported here, at run time
only; the extension module never links it."""

from __future__ import annotations

import numpy as np
import torch

from . import _merged_in_memory, _stated
from ._convert import array_of

__all__ = ["load_merged"]

# safetensors dtype -> torch dtype, for those held as raw bits in numpy.
_BITS = {
    "BF16": (torch.int16, torch.bfloat16),
    "F8_E4M3": (torch.uint8, getattr(torch, "float8_e4m3fn", None)),
    "F8_E5M2": (torch.uint8, getattr(torch, "float8_e5m2", None)),
    "F8_E4M3FNUZ": (torch.uint8, getattr(torch, "float8_e4m3fnuz", None)),
    "F8_E5M2FNUZ": (torch.uint8, getattr(torch, "float8_e5m2fnuz", None)),
    "F8_E8M0": (torch.uint8, getattr(torch, "float8_e8m0fnu", None)),
}


def _tensor(t) -> torch.Tensor:
    """A merged tensor as a torch tensor over its own memory (no copy)."""
    array = array_of(t, extended=False)
    if t.dtype in _BITS and _BITS[t.dtype][1] is not None:
        signed, dtype = _BITS[t.dtype]
        if signed == torch.int16:
            array = array.view(np.int16)
        return torch.from_numpy(array).view(dtype)
    if array.dtype in (np.uint16, np.uint32, np.uint64) and not hasattr(torch, "uint16"):
        array = array.view(array.dtype.str.replace("u", "i"))
    return torch.from_numpy(array)


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
) -> dict[str, torch.Tensor]:
    """Merge ``deltas`` onto ``base`` in memory and return the merged checkpoint as a dict of
    tensor name -> torch tensor (on the CPU), ready for ``model.load_state_dict``. Takes
    :func:`sotu_delta.numpy.load_merged`'s arguments; every tensor holds exactly the bytes
    that ``sotu-delta merge`` writes for it, bfloat16 included.
    """
    stated = _stated(base, deltas, config, method, weights, rescale, alpha, trim, density, seed,
                     slots, allow_nonfinite, dtype, force, device, None)
    tensors = _merged_in_memory(stated, threads)
    return {t.name: _tensor(t) for t in tensors}


# torch dtype -> (safetensors dtype, the numpy dtype of its bits when numpy lacks it).
_TO_SAFETENSORS = {
    torch.bfloat16: ("BF16", torch.int16),
    **{
        getattr(torch, name): (st, torch.uint8)
        for name, st in [
            ("float8_e4m3fn", "F8_E4M3"),
            ("float8_e5m2", "F8_E5M2"),
            ("float8_e4m3fnuz", "F8_E4M3FNUZ"),
            ("float8_e5m2fnuz", "F8_E5M2FNUZ"),
            ("float8_e8m0fnu", "F8_E8M0"),
        ]
        if hasattr(torch, name)
    },
}


def to_numpy(name, value: torch.Tensor):
    """A torch tensor of a state dict as (safetensors dtype, numpy array), on the CPU; a view
    without a copy where the tensor is already a contiguous CPU tensor."""
    from ._convert import _safetensors_dtype

    t = value.detach().to("cpu").contiguous()
    if t.dtype in _TO_SAFETENSORS:
        st, bits = _TO_SAFETENSORS[t.dtype]
        return st, t.view(bits).numpy()
    array = t.numpy()
    return _safetensors_dtype(name, array.dtype), array
