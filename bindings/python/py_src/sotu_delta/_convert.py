"""dtype conversions between safetensors, numpy and ml_dtypes, shared by the numpy and torch
modules and by ``extract`` of a state dict."""

from __future__ import annotations

import numpy as np

# safetensors dtypes numpy has.
NUMPY = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "I16": np.dtype("<i2"),
    "U16": np.dtype("<u2"),
    "F16": np.dtype("<f2"),
    "I32": np.dtype("<i4"),
    "U32": np.dtype("<u4"),
    "F32": np.dtype("<f4"),
    "C64": np.dtype("<c8"),
    "F64": np.dtype("<f8"),
    "I64": np.dtype("<i8"),
    "U64": np.dtype("<u8"),
}

# safetensors dtypes numpy lacks: their ml_dtypes name, and the unsigned integer of their bits.
EXTENDED = {
    "BF16": ("bfloat16", np.dtype("<u2")),
    "F8_E4M3": ("float8_e4m3fn", np.dtype(np.uint8)),
    "F8_E5M2": ("float8_e5m2", np.dtype(np.uint8)),
    "F8_E4M3FNUZ": ("float8_e4m3fnuz", np.dtype(np.uint8)),
    "F8_E5M2FNUZ": ("float8_e5m2fnuz", np.dtype(np.uint8)),
    "F8_E8M0": ("float8_e8m0fnu", np.dtype(np.uint8)),
}


def ml_dtypes():
    """The ml_dtypes module, or None when it is not installed."""
    try:
        import ml_dtypes as m
    except ImportError:
        return None
    return m


def numpy_dtype(dtype: str, extended: bool):
    """The numpy dtype of safetensors ``dtype``: with ``extended``, ml_dtypes' type where
    numpy has none and ml_dtypes is installed; otherwise the unsigned integer of its bits. None
    for the sub-byte dtypes (F4, F6), returned as their packed bytes."""
    if dtype in NUMPY:
        return NUMPY[dtype]
    if dtype in EXTENDED:
        name, bits = EXTENDED[dtype]
        m = ml_dtypes() if extended else None
        if m is not None and hasattr(m, name):
            return np.dtype(getattr(m, name))
        return bits
    return None


def array_of(tensor, extended: bool) -> np.ndarray:
    """A merged tensor (sotu_delta._sotu_delta.Tensor) as a numpy array over its own memory
    (no copy; the array keeps the tensor alive)."""
    raw = np.asarray(tensor)
    dt = numpy_dtype(tensor.dtype, extended)
    if dt is None:
        return raw
    return raw.view(dt).reshape(tensor.shape)


def _safetensors_dtype(name, dtype: np.dtype) -> str:
    for st, dt in NUMPY.items():
        if dtype == dt:
            return st
    m = ml_dtypes()
    if m is not None:
        for st, (ml_name, _) in EXTENDED.items():
            if hasattr(m, ml_name) and dtype == np.dtype(getattr(m, ml_name)):
                return st
    from . import SotuDeltaUsageError

    raise SotuDeltaUsageError(f"tuned state dict: tensor {name}: dtype {dtype} has no safetensors dtype")


def to_numpy(name, value):
    """A state dict's tensor as (safetensors dtype, numpy array): a numpy array as it is, a
    torch tensor through sotu_delta.torch (on the CPU, without a copy where it can)."""
    if type(value).__module__.startswith("torch"):
        from .torch import to_numpy as torch_to_numpy

        return torch_to_numpy(name, value)
    array = np.asarray(value)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return _safetensors_dtype(name, array.dtype), array
