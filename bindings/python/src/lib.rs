//! `sotu_delta._sotu_delta`, the extension module of the Python package: thin wrappers of the
//! library's operations ([`sotu_delta::ops`]), the same functions the command line calls.
//! py_src/sotu_delta/ turns what they return into dicts, numpy arrays and torch tensors.
//!
//! How a call runs ([`run_detached`]): the operation goes to a rayon pool of this module's own
//! on a worker thread, while the calling thread waits without the GIL, taking it back every
//! [`POLL`] to let Python run its signal handlers; a KeyboardInterrupt there sets the
//! operation's [`Cancel`] flag, which its next write sees, and is raised once the operation has
//! stopped and removed its partial output. The pools are dropped (leaked) in a child after
//! `fork`, whose copies of their threads do not exist ([`child_after_fork`]).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::time::Duration;

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use rayon::ThreadPool;
use sotu_delta::io::{AlignedBytes, Cancel, Checkpoint, MemoryImage, MemoryTensor, OutTensor};
use sotu_delta::merge::{Device, Method};
use sotu_delta::ops::{
    self, ExtractSpec, FineTuneMasks, Flags, InputSpec, MergeSpec, Outcome, UsageError,
};
use sotu_delta::release::Operation;

pyo3::import_exception!(sotu_delta, SotuDeltaError);
pyo3::import_exception!(sotu_delta, SotuDeltaUsageError);

/// How often the waiting thread takes the GIL back to run Python's signal handlers.
const POLL: Duration = Duration::from_millis(50);

/// The library's error as the Python exception: a usage error as `SotuDeltaUsageError` (exit
/// code 2 on the command line), any other as `SotuDeltaError`, with the command line's message.
fn to_py(e: anyhow::Error) -> PyErr {
    match e.downcast_ref::<UsageError>() {
        Some(u) => SotuDeltaUsageError::new_err(u.0.clone()),
        None => SotuDeltaError::new_err(format!("{e:#}")),
    }
}

/// The thread pools made so far, by thread count (0: one thread per core).
static POOLS: Mutex<Vec<(usize, Arc<ThreadPool>)>> = Mutex::new(Vec::new());
/// Set in a child process after `fork`: the pools' threads stayed in the parent.
static FORKED: AtomicBool = AtomicBool::new(false);

/// Runs in the child of a `fork` (registered with `pthread_atfork`), so only sets a flag
/// (async-signal-safe); the next call leaks the inherited pools and makes new ones. Without it
/// a child that merges waits forever for threads it does not have.
extern "C" fn child_after_fork() {
    FORKED.store(true, Ordering::SeqCst);
}

/// This module's pool of `threads` workers (one per core when `None`).
fn pool(threads: Option<usize>) -> PyResult<Arc<ThreadPool>> {
    ops::check_threads(threads).map_err(to_py)?;
    let mut pools = POOLS.lock().unwrap_or_else(|e| e.into_inner());
    if FORKED.swap(false, Ordering::SeqCst) {
        // Dropping them would signal threads that are not there; their memory is small.
        std::mem::forget(std::mem::take(&mut *pools));
    }
    let key = threads.unwrap_or(0);
    if let Some((_, p)) = pools.iter().find(|(k, _)| *k == key) {
        return Ok(p.clone());
    }
    let p = rayon::ThreadPoolBuilder::new()
        .num_threads(key)
        .thread_name(|i| format!("sotu-delta-{i}"))
        .build()
        .map_err(|e| PyRuntimeError::new_err(format!("cannot start worker threads: {e}")))?;
    let p = Arc::new(p);
    pools.push((key, p.clone()));
    Ok(p)
}

/// Runs `work` in the pool of `threads` without the GIL (other Python threads run meanwhile)
/// and returns its result. A Python signal handler that raises while it runs (Ctrl-C's
/// KeyboardInterrupt) sets `cancel`, and that exception is raised once `work` has returned.
fn run_detached<T: Send>(
    py: Python<'_>,
    threads: Option<usize>,
    cancel: &Cancel,
    work: impl FnOnce() -> anyhow::Result<T> + Send,
) -> PyResult<T> {
    let pool = pool(threads)?;
    let done = (Mutex::new(false), Condvar::new());
    std::thread::scope(|s| {
        let worker = s.spawn(|| {
            let r = pool.install(work);
            *done.0.lock().unwrap_or_else(|e| e.into_inner()) = true;
            done.1.notify_all();
            r
        });
        let mut raised = None;
        loop {
            let finished = py.detach(|| {
                let guard = done.0.lock().unwrap_or_else(|e| e.into_inner());
                let (guard, _) = done
                    .1
                    .wait_timeout_while(guard, POLL, |finished| !*finished)
                    .unwrap_or_else(|e| e.into_inner());
                *guard
            });
            if finished {
                break;
            }
            if raised.is_none()
                && let Err(e) = py.check_signals()
            {
                cancel.set();
                raised = Some(e);
            }
        }
        let result = py.detach(move || worker.join());
        if let Some(e) = raised {
            return Err(e);
        }
        match result {
            Ok(r) => r.map_err(to_py),
            Err(_) => Err(PyRuntimeError::new_err(
                "sotu-delta: an internal error (a panic) stopped the operation",
            )),
        }
    })
}

/// An outcome's report as JSON (what `--json` prints), its warnings and its notes.
fn reported<R: serde::Serialize>(o: &Outcome<R>) -> PyResult<(String, Vec<String>, Vec<String>)> {
    let json = serde_json::to_string(&o.report)
        .map_err(|e| PyRuntimeError::new_err(format!("cannot write the report: {e}")))?;
    Ok((json, o.warnings.clone(), o.notes.clone()))
}

/// What every operation that writes takes besides its own arguments.
fn flags(quiet: bool, no_sync: bool) -> Flags {
    Flags {
        quiet,
        verbose: true,
        no_sync,
        ..Flags::default()
    }
}

/// Parses a safetensors dtype name (`F32`, `BF16`, …).
fn dtype(name: &str) -> PyResult<safetensors::Dtype> {
    serde_json::from_value(serde_json::Value::String(name.to_string())).map_err(|_| {
        SotuDeltaUsageError::new_err(format!("{name:?} is not a safetensors dtype name"))
    })
}

/// One tensor of a state dict given in memory: name, safetensors dtype name, shape, and an
/// object whose `tobytes()` gives its data in row-major order (a numpy array).
type StateTensor<'py> = (String, String, Vec<usize>, Bound<'py, PyAny>);

/// The checkpoint of an in-memory state dict, called `label` in messages. Each tensor's bytes
/// are copied in one at a time, so only one extra tensor is alive besides the image.
fn state_dict_checkpoint(label: &Path, tensors: &[StateTensor<'_>]) -> PyResult<Checkpoint> {
    let layout = tensors
        .iter()
        .map(|(name, dt, shape, _)| {
            let dtype = dtype(dt)?;
            let bits = shape
                .iter()
                .try_fold(dtype.bitsize() as u64, |n, &d| n.checked_mul(d as u64));
            let len = bits.map(|b| b.div_ceil(8)).ok_or_else(|| {
                SotuDeltaUsageError::new_err(format!("tensor {name}: shape {shape:?} is too large"))
            })?;
            Ok(OutTensor {
                name: name.clone(),
                dtype,
                shape: shape.clone(),
                len,
            })
        })
        .collect::<PyResult<Vec<_>>>()?;
    let at = |e: anyhow::Error| to_py(e.context(label.display().to_string()));
    let mut image = MemoryImage::new(&layout).map_err(at)?;
    for (name, _, _, array) in tensors {
        let data = array.call_method0("tobytes")?;
        let data = data.cast::<PyBytes>()?;
        image.fill(name, data.as_bytes()).map_err(at)?;
    }
    Checkpoint::from_image(label, image).map_err(to_py)
}

/// `extract`: returns the `--json` report, the warnings and the notes. `tuned` is a path, or
/// `None` with `tensors` the fine-tune in memory (called "tuned state dict" in messages).
#[pyfunction]
#[pyo3(signature = (base, tuned, tensors, output, density, seed, slot, include, exclude,
    allow_nonfinite, no_files, shard_size, quiet, no_sync, threads))]
#[allow(clippy::too_many_arguments)]
fn extract(
    py: Python<'_>,
    base: PathBuf,
    tuned: Option<PathBuf>,
    tensors: Option<Vec<StateTensor<'_>>>,
    output: PathBuf,
    density: Option<f64>,
    seed: u64,
    slot: Option<String>,
    include: Vec<String>,
    exclude: Vec<String>,
    allow_nonfinite: bool,
    no_files: bool,
    shard_size: String,
    quiet: bool,
    no_sync: bool,
    threads: Option<usize>,
) -> PyResult<(String, Vec<String>, Vec<String>)> {
    let (tuned_path, in_memory) = match (tuned, tensors) {
        (Some(p), None) => (p, None),
        (None, Some(t)) => {
            let label = PathBuf::from("tuned state dict");
            let ckpt = state_dict_checkpoint(&label, &t)?;
            (label, Some(ckpt))
        }
        _ => {
            return Err(SotuDeltaUsageError::new_err(
                "give the fine-tune as a path or as tensors, not both",
            ));
        }
    };
    let spec = ExtractSpec {
        shard_size,
        density,
        seed,
        slot,
        include,
        exclude,
        allow_nonfinite,
        fingerprint_output: true,
        own_files: !no_files,
        ..ExtractSpec::new(&base, &tuned_path, &output)
    };
    let flags = flags(quiet, no_sync);
    let outcome = run_detached(py, threads, &flags.cancel, || {
        ops::extract(&spec, in_memory, &flags)
    })?;
    reported(&outcome)
}

/// A merge as the Python package states it (`merge`, `apply`, `load_merged`): the keyword
/// arguments of the same names, as a dict from py_src/sotu_delta/__init__.py (`None` where not
/// given). `inputs` are `(path, is_fine_tune)` in the merge's order.
#[derive(FromPyObject)]
#[pyo3(from_item_all)]
struct StatedMerge {
    base: Option<PathBuf>,
    inputs: Vec<(PathBuf, bool)>,
    config: Option<PathBuf>,
    method: Option<String>,
    weights: Option<Vec<f64>>,
    rescale: Option<bool>,
    alpha: Option<f64>,
    trim: Option<f64>,
    density: Option<f64>,
    seed: Option<u64>,
    slots: bool,
    allow_nonfinite: bool,
    dtype: Option<String>,
    force: bool,
    device: String,
    files_from: Option<usize>,
}

impl StatedMerge {
    /// The [`MergeSpec`] stated, and the configuration's warnings: from the listed inputs as
    /// `merge --base B D --tuned T ...` takes them ([`MergeSpec::listed`]), or from a mergekit
    /// configuration as `merge --config` takes it, refusing the same options beside it
    /// ([`MergeSpec::from_config`]).
    fn spec(self) -> anyhow::Result<(MergeSpec, Vec<String>)> {
        let masks = FineTuneMasks {
            density: self.density,
            seed: self.seed,
            slots: self.slots,
            allow_nonfinite: self.allow_nonfinite,
        };
        let device = ops::parse_choice::<Device>("--device", &self.device)?;
        let (stated, warnings) = match &self.config {
            Some(config) => {
                let given = [
                    ("base", self.base.is_some()),
                    ("deltas", self.inputs.iter().any(|(_, tuned)| !tuned)),
                    ("tuned", self.inputs.iter().any(|(_, tuned)| *tuned)),
                    ("weights", self.weights.is_some()),
                    ("rescale", self.rescale.is_some()),
                    ("method", self.method.is_some()),
                    ("alpha", self.alpha.is_some()),
                    ("trim", self.trim.is_some()),
                    ("dtype", self.dtype.is_some()),
                ];
                let given: Vec<&str> = given.iter().filter(|g| g.1).map(|g| g.0).collect();
                MergeSpec::from_config(config, masks, &given)?
            }
            None => {
                let base = self.base.as_deref().ok_or_else(|| {
                    ops::usage("give the base (base=), or a mergekit configuration (config=)")
                })?;
                let method = self.method.as_deref().unwrap_or("sum");
                let spec = MergeSpec {
                    weights: self.weights.unwrap_or_default(),
                    rescale: self.rescale.unwrap_or(false),
                    method: ops::parse_choice::<Method>("--method", method)?,
                    alpha: self.alpha,
                    trim: self.trim,
                    dtype: self.dtype,
                    ..MergeSpec::listed(base, &self.inputs, masks)?
                };
                (spec, Vec::new())
            }
        };
        let spec = MergeSpec {
            force: self.force,
            device,
            files_from: self.files_from,
            ..stated
        };
        Ok((spec, warnings))
    }
}

/// `merge` and `apply` (one delta, `rescale` its default, `files_from` 0, `apply` true, which a
/// folder output's recipe records): returns the `--json` report, the warnings and the notes.
#[pyfunction]
#[pyo3(signature = (stated, output, shard_size, quiet, no_sync, threads, apply))]
#[allow(clippy::too_many_arguments)]
fn merge(
    py: Python<'_>,
    stated: StatedMerge,
    output: PathBuf,
    shard_size: String,
    quiet: bool,
    no_sync: bool,
    threads: Option<usize>,
    apply: bool,
) -> PyResult<(String, Vec<String>, Vec<String>)> {
    let (stated, config_warnings) = stated.spec().map_err(to_py)?;
    let spec = MergeSpec {
        operation: if apply {
            Operation::Apply
        } else {
            Operation::Merge
        },
        // `apply` also takes a LoRA adapter folder, as the command line does.
        deltas: match apply {
            true => stated
                .deltas
                .iter()
                .map(|d| InputSpec::applied(d.path()))
                .collect(),
            false => stated.deltas.clone(),
        },
        ..stated
    };
    let flags = flags(quiet, no_sync);
    let mut outcome = run_detached(py, threads, &flags.cancel, || {
        ops::merge(&spec, &output, &shard_size, true, &flags)
    })?;
    outcome.warnings.splice(0..0, config_warnings);
    reported(&outcome)
}

/// One merged tensor in memory, handed to numpy without a copy: `__array_interface__` shows
/// its bytes as a writable 1-D uint8 array that keeps this object alive.
#[pyclass(frozen, module = "sotu_delta._sotu_delta")]
struct Tensor {
    /// Tensor key.
    #[pyo3(get)]
    name: String,
    /// The safetensors dtype name (`BF16`, `F32`, …).
    #[pyo3(get)]
    dtype: String,
    /// Shape.
    #[pyo3(get)]
    shape: Vec<usize>,
    /// The bytes; reached only through `address` from here on.
    _data: AlignedBytes,
    /// The address of the bytes, taken while they were borrowed mutably: numpy writes there.
    address: usize,
    len: usize,
}

impl Tensor {
    fn new(mut t: MemoryTensor) -> Self {
        let address = t.data.as_mut_bytes().as_mut_ptr() as usize;
        let dtype = serde_json::to_value(t.dtype)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        Tensor {
            name: t.name,
            dtype,
            shape: t.shape,
            len: t.data.len(),
            _data: t.data,
            address,
        }
    }
}

#[pymethods]
impl Tensor {
    /// numpy's array interface (version 3) of the bytes.
    #[getter]
    fn __array_interface__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("version", 3)?;
        d.set_item("shape", (self.len,))?;
        d.set_item("typestr", "|u1")?;
        d.set_item("data", (self.address, false))?;
        Ok(d)
    }
}

/// The merge of `merge`, into memory: returns the tensors (in name order), the report as JSON,
/// the warnings and the notes.
#[pyfunction]
#[pyo3(signature = (stated, threads))]
#[allow(clippy::type_complexity)]
fn merge_in_memory(
    py: Python<'_>,
    stated: StatedMerge,
    threads: Option<usize>,
) -> PyResult<(Vec<Tensor>, String, Vec<String>, Vec<String>)> {
    let (spec, config_warnings) = stated.spec().map_err(to_py)?;
    let flags = flags(true, false);
    let outcome = run_detached(py, threads, &flags.cancel, || {
        ops::merge_in_memory(&spec, &flags)
    })?;
    let Outcome {
        report,
        mut warnings,
        notes,
    } = outcome;
    warnings.splice(0..0, config_warnings);
    let json = serde_json::to_string(&report.report)
        .map_err(|e| PyRuntimeError::new_err(format!("cannot write the report: {e}")))?;
    let tensors = report.tensors.into_iter().map(Tensor::new).collect();
    Ok((tensors, json, warnings, notes))
}

/// `inspect`: returns the `--json` report.
#[pyfunction]
#[pyo3(signature = (deltas, base, subspaces, threads))]
fn inspect(
    py: Python<'_>,
    deltas: Vec<PathBuf>,
    base: Option<PathBuf>,
    subspaces: bool,
    threads: Option<usize>,
) -> PyResult<String> {
    let flags = flags(true, false);
    let report = run_detached(py, threads, &flags.cancel, || {
        ops::inspect(&deltas, base.as_deref(), subspaces, &flags)
    })?;
    serde_json::to_string(&report)
        .map_err(|e| PyRuntimeError::new_err(format!("cannot write the report: {e}")))
}

/// `verify`: returns the `--json` verdicts.
#[pyfunction]
#[pyo3(signature = (base, deltas, threads))]
fn verify(
    py: Python<'_>,
    base: PathBuf,
    deltas: Vec<PathBuf>,
    threads: Option<usize>,
) -> PyResult<String> {
    let flags = flags(true, false);
    let verdicts = run_detached(py, threads, &flags.cancel, || {
        ops::verify(&base, &deltas, &flags)
    })?;
    serde_json::to_string(&verdicts)
        .map_err(|e| PyRuntimeError::new_err(format!("cannot write the report: {e}")))
}

/// The `sotu-delta` command: runs the command line `argv` (program name first) as the binary
/// does, and returns its exit status. It owns the process from here: its Ctrl-C handler
/// removes partial outputs and exits with status 130.
#[pyfunction]
fn run_cli(py: Python<'_>, argv: Vec<OsString>) -> u8 {
    py.detach(|| sotu_delta::cli::main(argv))
}

#[pymodule]
fn _sotu_delta(m: &Bound<'_, PyModule>) -> PyResult<()> {
    static AT_FORK: Once = Once::new();
    // SAFETY: registers a child handler that only stores to an atomic.
    AT_FORK.call_once(|| unsafe {
        libc::pthread_atfork(None, None, Some(child_after_fork));
    });
    m.add_function(wrap_pyfunction!(extract, m)?)?;
    m.add_function(wrap_pyfunction!(merge, m)?)?;
    m.add_function(wrap_pyfunction!(merge_in_memory, m)?)?;
    m.add_function(wrap_pyfunction!(inspect, m)?)?;
    m.add_function(wrap_pyfunction!(verify, m)?)?;
    m.add_function(wrap_pyfunction!(run_cli, m)?)?;
    m.add_class::<Tensor>()?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
