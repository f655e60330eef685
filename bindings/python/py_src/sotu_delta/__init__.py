"""sotu-delta: sparse task deltas of model checkpoints (SoTU), from Python.

The functions here are the command line's subcommands, run by the same Rust library (no
subprocess): each takes the same arguments, returns what ``--json`` prints as a dict, and
raises :class:`SotuDeltaError` with the command line's message, which names the file and the
tensor at fault. Warnings the command line prints go to :mod:`warnings` as
:class:`SotuDeltaWarning`; the ``--verbose`` notes go to the ``sotu_delta`` logger at INFO.

While one runs, the GIL is released (other Python threads keep running); Ctrl-C stops it within
a write, removes its partial output and raises :class:`KeyboardInterrupt`. ``threads`` is
``--threads`` (one worker per core by default).

In memory, with nothing written: :func:`sotu_delta.numpy.load_merged` and
:func:`sotu_delta.torch.load_merged`. :func:`extract` also takes the fine-tune as a state dict
(name -> numpy array or torch tensor).

A merge's inputs are delta files and fine-tunes (:class:`FineTune`, ``merge --tuned``) in one
list, in the merge's order; or a mergekit configuration (``config=``, ``merge --config``).
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

from . import _sotu_delta

__all__ = [
    "FineTune",
    "SotuDeltaError",
    "SotuDeltaUsageError",
    "SotuDeltaWarning",
    "apply",
    "extract",
    "inspect",
    "merge",
    "verify",
    "__version__",
]

__version__ = _sotu_delta.__version__

_log = logging.getLogger("sotu_delta")


class SotuDeltaError(Exception):
    """An operation failed (the command line's exit status 1). The message is the command
    line's: it names the file, and the tensor where one is at fault."""


class SotuDeltaUsageError(SotuDeltaError, ValueError):
    """The arguments are wrong (the command line's exit status 2)."""


class SotuDeltaWarning(UserWarning):
    """What the command line prints as ``sotu-delta: warning: ...``."""


@dataclass(frozen=True)
class FineTune:
    """A fine-tune of the base given to :func:`merge` (or ``load_merged``) in place of a delta
    file: ``sotu-delta merge --tuned PATH``. ``path`` is a checkpoint (a ``.safetensors`` file
    or a model folder) or a PEFT LoRA adapter folder (docs/LORA.md). Its delta is taken as the
    merge reads it, as ``extract`` would store it (docs/FORMAT.md section 14): the output is the
    bytes of ``extract`` followed by ``merge``.

    How it is masked is the merge's ``density``, ``seed``, ``slots`` and ``allow_nonfinite``,
    one rule for all the fine-tunes of a merge, as on the command line: fine-tune t (counting
    the fine-tunes from 0, delta files left out) is masked with seed ``seed + t``, or with slot
    t/T of ``seed`` under ``slots=True``.
    """

    path: str | os.PathLike


def _paths(deltas):
    """One path or a sequence of paths, as a list."""
    if isinstance(deltas, (str, bytes, os.PathLike, FineTune)):
        return [deltas]
    return list(deltas)


def _inputs(deltas):
    """A merge's inputs (one, or a sequence, of paths and :class:`FineTune`) as the extension
    takes them: ``(path, is_fine_tune)`` in order. ``None`` is no input."""
    if deltas is None:
        return []
    if isinstance(deltas, Mapping):
        raise SotuDeltaUsageError(
            "a state dict is not a merge input: merge takes delta files and fine-tunes "
            "(sotu_delta.FineTune) as paths; save the state dict, or extract a delta from it "
            "(sotu_delta.extract takes a state dict)"
        )
    return [
        (d.path, True) if isinstance(d, FineTune) else (d, False) for d in _paths(deltas)
    ]


def _stated(base, deltas, config, method, weights, rescale, alpha, trim, density, seed, slots,
            allow_nonfinite, dtype, force, device, files_from):
    """A merge as the extension takes it: the keyword arguments by name, ``None`` where not
    given (a mergekit configuration refuses what it gives, as ``merge --config`` does)."""
    return {
        "base": base,
        "inputs": _inputs(deltas),
        "config": config,
        "method": method,
        "weights": None if weights is None else list(weights),
        "rescale": rescale,
        "alpha": alpha,
        "trim": trim,
        "density": density,
        "seed": seed,
        "slots": slots,
        "allow_nonfinite": allow_nonfinite,
        "dtype": dtype,
        "force": force,
        "device": device,
        "files_from": files_from,
    }


def _finish(report_json, warns, notes, stacklevel=3):
    """The report as a dict, after emitting the warnings (attributed `stacklevel` frames up: the
    caller of the public function) and logging the notes."""
    for n in notes:
        _log.info("%s", n)
    for w in warns:
        warnings.warn(w, SotuDeltaWarning, stacklevel=stacklevel)
    return json.loads(report_json)


def _merged_in_memory(stated, threads):
    """The merged tensors of an in-memory merge (`numpy.load_merged`, `torch.load_merged`) of
    the merge `stated` (:func:`_stated`), after emitting its warnings and logging its notes."""
    tensors, report, warns, notes = _sotu_delta.merge_in_memory(stated, threads)
    _finish(report, warns, notes, stacklevel=4)
    return tensors


def _state_dict_tensors(state_dict):
    """(name, safetensors dtype, shape, numpy array) for each tensor of a state dict."""
    from ._convert import to_numpy

    out = []
    for name, value in state_dict.items():
        dtype, array = to_numpy(name, value)
        out.append((str(name), dtype, list(array.shape), array))
    return out


def extract(
    base,
    tuned,
    out,
    density=None,
    seed=2411,
    slot=None,
    *,
    include=(),
    exclude=(),
    allow_nonfinite=False,
    no_files=False,
    shard_size="5GB",
    quiet=False,
    no_sync=False,
    threads=None,
):
    """Diff a fine-tune against its base and write a sparse, seeded delta to ``out``
    (``sotu-delta extract``). Returns the ``--json`` summary.

    ``tuned`` is a checkpoint path (a ``.safetensors`` file or a model folder), or a state
    dict: a mapping of tensor name to numpy array or torch tensor (a model fine-tuned in this
    process, ``model.state_dict()``), called "tuned state dict" in messages. ``density`` is
    0.1 by default, or the whole slot with ``slot="K/N"``.
    """
    if isinstance(tuned, Mapping):
        tuned_path, tensors = None, _state_dict_tensors(tuned)
    else:
        tuned_path, tensors = tuned, None
    return _finish(
        *_sotu_delta.extract(
            base,
            tuned_path,
            tensors,
            out,
            density,
            seed,
            slot,
            list(include),
            list(exclude),
            allow_nonfinite,
            no_files,
            shard_size,
            quiet,
            no_sync,
            threads,
        )
    )


def merge(
    base=None,
    deltas=None,
    out=None,
    method=None,
    weights=None,
    *,
    config=None,
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
    files_from=None,
    shard_size="5GB",
    quiet=False,
    no_sync=False,
    threads=None,
):
    """Merge ``deltas`` onto ``base`` and write one checkpoint to ``out`` (``sotu-delta
    merge``). Returns the ``--json`` summary.

    ``deltas`` is one input or a sequence of them, merged in that order (``weights`` follow
    it): a path is a delta file or folder; :class:`FineTune` ``(path)`` is a fine-tune (a
    checkpoint, or a PEFT LoRA adapter folder) whose delta is taken as it is read
    (``--tuned``), masked as ``density`` (1, or the whole slot under ``slots``), ``seed``
    (2411; fine-tune t gets ``seed + t``), ``slots=True`` (fine-tune t of T gets slot t/T of
    ``seed``) and ``allow_nonfinite`` say; those four are refused without a fine-tune.

    ``method`` is ``sum`` (the SoTU sum, the default), ``ties``, ``iso`` or ``tsv``
    (docs/METHODS.md); ``weights`` one weight per input; ``rescale`` scales kept values by
    1/density (``sum`` only); ``alpha`` and ``trim`` are the methods' parameters; ``dtype`` is
    the output dtype of float tensors (``f32``, ``f16``, ``bf16``, ``f64``; the base's by
    default); ``files_from=K`` gives a folder output input K's own files (config, tokenizer)
    instead of the base's.

    ``config`` is a mergekit configuration (``merge --config``, docs/MERGEKIT.md): it gives the
    base, the inputs, the method, its parameters and the dtype, so ``base``, ``deltas``,
    ``method``, ``weights``, ``rescale``, ``alpha``, ``trim``, ``density`` and ``dtype`` are
    refused beside it (:class:`SotuDeltaUsageError`); ``seed``, ``slots``, ``allow_nonfinite``
    mask its fine-tunes: ``merge(config="merge.yml", out="merged", seed=7)``.
    """
    if out is None:
        raise TypeError("merge() needs the output: out=")
    stated = _stated(base, deltas, config, method, weights, rescale, alpha, trim, density, seed,
                     slots, allow_nonfinite, dtype, force, device, files_from)
    return _finish(
        *_sotu_delta.merge(stated, out, shard_size, quiet, no_sync, threads, False)
    )


def apply(
    base,
    delta,
    out,
    *,
    rescale=True,
    dtype=None,
    force=False,
    device="auto",
    shard_size="5GB",
    quiet=False,
    no_sync=False,
    threads=None,
):
    """Add one delta (or a PEFT LoRA adapter folder, applied as its fine-tune) onto its base and
    write the fine-tune to ``out`` (``sotu-delta apply``).
    Returns the ``--json`` summary. ``rescale=False`` is ``--no-rescale``: kept values exact,
    the base elsewhere. A folder output gets the delta's own files (config, tokenizer)."""
    stated = _stated(base, [delta], None, None, None, rescale, None, None, None, None, False,
                     False, dtype, force, device, 0)
    return _finish(
        *_sotu_delta.merge(stated, out, shard_size, quiet, no_sync, threads, True)
    )


def inspect(deltas, base=None, *, subspaces=False, threads=None):
    """What deltas hold, and how their masks collide and their values align (``sotu-delta
    inspect --json``). Cosines of overlapping deltas need ``base``; so does ``subspaces``."""
    return json.loads(_sotu_delta.inspect(_paths(deltas), base, subspaces, threads))


def verify(base, deltas, *, threads=None):
    """Check deltas against a base (``sotu-delta verify --json``): a list with one verdict
    per delta. A delta that does not match has ``"ok": False`` (the command line exits 1);
    only a file that cannot be read raises."""
    return json.loads(_sotu_delta.verify(base, _paths(deltas), threads))
