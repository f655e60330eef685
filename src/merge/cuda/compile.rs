//! Compiling the kernels of `kernels/` with NVRTC, loaded at run time: the whole source for
//! the tests, or one entry point at a time, as the GPU path does on first use.

use crate::dtype::Float;

/// The kernel sources, embedded in the binary: `(file name, CUDA C source)`.
pub const SOURCES: &[(&str, &str)] = &[("merge.cu", include_str!("../../../kernels/merge.cu"))];

/// NVRTC options: IEEE f64 throughout, no contraction into FMA, subnormals kept.
pub const NVRTC_OPTIONS: &[&str] = &[
    "--fmad=false",
    "--ftz=false",
    "--prec-div=true",
    "--std=c++17",
];

/// The kernel dtype code of `f` (`SOTU_F16`… in kernels/merge.cu).
pub fn dtype_code(f: Float) -> u64 {
    match f {
        Float::F16 => 0,
        Float::BF16 => 1,
        Float::F32 => 2,
        Float::F64 => 3,
    }
}

fn dtype_name(f: Float) -> &'static str {
    match f {
        Float::F16 => "f16",
        Float::BF16 => "bf16",
        Float::F32 => "f32",
        Float::F64 => "f64",
    }
}

/// A family of merge kernels, one entry point per `(from, to)` pair; all take the same
/// arguments (`driver::launch_merge`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    /// `round(base + Σ terms)` (docs/FORMAT.md section 8): `sotu_merge_<from>_<to>`.
    Merge,
    /// The elementwise half of `ties` (docs/METHODS.md): `sotu_ties_<from>_<to>`.
    Ties,
}

impl Family {
    /// Both families.
    pub const ALL: [Family; 2] = [Family::Merge, Family::Ties];

    /// The entry point from stored dtype `from` to output dtype `to`.
    pub fn entry(self, from: Float, to: Float) -> String {
        format!("{}_{}_{}", self.prefix(), dtype_name(from), dtype_name(to))
    }

    fn prefix(self) -> &'static str {
        match self {
            Family::Merge => "sotu_merge",
            Family::Ties => "sotu_ties",
        }
    }

    /// The macro of kernels/merge.cu that defines one entry point.
    fn entry_macro(self) -> &'static str {
        match self {
            Family::Merge => "SOTU_MERGE_ENTRY",
            Family::Ties => "SOTU_TIES_ENTRY",
        }
    }
}

/// The entry point of the merge kernel from stored dtype `from` to output dtype `to`.
pub fn merge_entry(from: Float, to: Float) -> String {
    Family::Merge.entry(from, to)
}

/// The entry point of the ties kernel from stored dtype `from` to output dtype `to`.
pub fn ties_entry(from: Float, to: Float) -> String {
    Family::Ties.entry(from, to)
}

/// Every kernel entry point of [`SOURCES`].
pub fn kernel_entries() -> Vec<String> {
    let all = [Float::F16, Float::BF16, Float::F32, Float::F64];
    let mut v = Vec::new();
    for k in Family::ALL {
        for f in all {
            v.extend(all.map(|t| k.entry(f, t)));
        }
    }
    v.extend(["sotu_mix32_kernel", "sotu_u_kernel", "sotu_round_kernel"].map(String::from));
    v
}

/// Runs `f`, turning a panic (cudarc panics when a library it loads lacks a symbol) into an
/// error.
pub(super) fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    std::panic::set_hook(hook);
    match r {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(format!("{what} failed: {msg}"))
        }
    }
}

/// Whether the NVRTC library (`libnvrtc.so.13`, found through `LD_LIBRARY_PATH` and the
/// loader's usual paths) can be loaded.
pub fn nvrtc_available() -> Result<(), String> {
    guarded("loading NVRTC", || {
        // SAFETY: only dlopens the library.
        if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            Ok(())
        } else {
            Err(
                "the NVRTC library (libnvrtc.so.13) was not found; install the CUDA 13 toolkit or \
                 the nvidia-cuda-nvrtc wheel and add its lib folder to LD_LIBRARY_PATH"
                    .into(),
            )
        }
    })
}

/// Compiles all of [`SOURCES`], every entry point, with NVRTC to PTX for `arch` (e.g.
/// `compute_90`).
pub fn compile_ptx(arch: &'static str) -> Result<String, String> {
    compile_selected(arch, &[], "")
}

/// Compiles only the merge kernel from `from` to `to`, as the GPU path does on first use.
pub fn compile_merge_ptx(arch: &'static str, from: Float, to: Float) -> Result<String, String> {
    compile_entry_ptx(arch, Family::Merge, from, to)
}

/// Compiles only the ties kernel from `from` to `to`, as the GPU path does on first use.
pub fn compile_ties_ptx(arch: &'static str, from: Float, to: Float) -> Result<String, String> {
    compile_entry_ptx(arch, Family::Ties, from, to)
}

/// Compiles only the entry point of `family` from `from` to `to`.
pub fn compile_entry_ptx(
    arch: &'static str,
    family: Family,
    from: Float,
    to: Float,
) -> Result<String, String> {
    let tail = format!(
        "{}({}, {}, {}, {})",
        family.entry_macro(),
        dtype_name(from),
        dtype_name(to),
        dtype_code(from),
        dtype_code(to)
    );
    compile_selected(arch, &["SOTU_SELECTED_ENTRIES"], &tail)
}

/// Compiles only the helper kernels (known answers, rounding), as the GPU path does at setup.
pub fn compile_helpers_ptx(arch: &'static str) -> Result<String, String> {
    compile_selected(arch, &["SOTU_SELECTED_ENTRIES", "SOTU_HELPERS"], "")
}

/// Compiles [`SOURCES`] with extra `defines` (`-D…`) and `tail` appended to the source.
fn compile_selected(arch: &'static str, defines: &[&str], tail: &str) -> Result<String, String> {
    nvrtc_available()?;
    let mut src: String = SOURCES
        .iter()
        .map(|(_, s)| *s)
        .collect::<Vec<_>>()
        .join("\n");
    src.push('\n');
    src.push_str(tail);
    src.push('\n');
    let mut options: Vec<String> = NVRTC_OPTIONS.iter().map(|s| s.to_string()).collect();
    options.extend(defines.iter().map(|d| format!("-D{d}")));
    guarded("NVRTC", move || {
        let opts = cudarc::nvrtc::CompileOptions {
            arch: Some(arch),
            options,
            name: Some("merge.cu".into()),
            ..Default::default()
        };
        match cudarc::nvrtc::compile_ptx_with_opts(src, opts) {
            Ok(ptx) => Ok(ptx.to_src()),
            Err(cudarc::nvrtc::CompileError::CompileError { log, .. }) => Err(format!(
                "the kernels do not compile for {arch}:\n{}",
                log.to_string_lossy()
            )),
            Err(e) => Err(format!("NVRTC failed for {arch}: {e}")),
        }
    })
}
