//! The recipe (`sotu-delta.json`) beside a folder output's model card: the inputs with their
//! fingerprints, every parameter that shapes the output's bytes, and the tool's version, so that
//! `merge --recipe sotu-delta.json -o OUT` makes the same tensors again, and refuses inputs that
//! changed since.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::io::Checkpoint;
use crate::merge::Input as MergeInput;
use crate::merge::{MergeOptions, Method};

/// The recipe's file name in an output folder.
pub const RECIPE_NAME: &str = "sotu-delta.json";
/// `format` of a recipe.
pub const RECIPE_FORMAT: &str = "sotu-delta-recipe";
/// The recipe version this build writes and reads.
pub const RECIPE_VERSION: u64 = 1;

/// Which operation made the output.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Operation {
    /// `merge`: base + many deltas.
    Merge,
    /// `apply`: base + one delta, the fine-tune rebuilt.
    Apply,
}

/// One input: where it was, and what it held.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Input {
    /// The path as given on the command line.
    pub path: String,
    /// The same, absolute, for a replay from another folder.
    pub absolute: String,
    /// The fingerprint of its tensors: BLAKE3 of the BLAKE3 of every tensor's bytes in name
    /// order (docs/FORMAT.md section 7; for the base, its base fingerprint; for a delta, the
    /// `output_fingerprint` that `extract --json` reported).
    pub fingerprint: String,
}

/// One delta: the input, and what its metadata says (for the model card; the fingerprint
/// covers it).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct DeltaInput {
    /// The delta file or folder.
    #[serde(flatten)]
    pub input: Input,
    /// Mask seed.
    pub seed: u64,
    /// Keep interval `[lo, hi)`.
    pub lo: u64,
    /// Keep interval end.
    pub hi: u64,
    /// `(hi − lo) / 2^32`.
    pub density: f64,
    /// `K/N` when extracted in a slot.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub slot: Option<String>,
    /// Its weight in the merge.
    pub weight: f64,
    /// The fingerprint of the base it was taken against (for a fine-tune, the base merged).
    pub base_fingerprint: String,
    /// `fine-tune` or `lora` for a fine-tune whose delta the merge took as it read it
    /// (docs/FORMAT.md section 14); absent for a delta file.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub kind: Option<String>,
    /// A fine-tune's NaN and infinite values were merged (`--allow-nonfinite`).
    #[serde(skip_serializing_if = "std::ops::Not::not", default)]
    pub allow_nonfinite: bool,
}

/// Every parameter that shapes the output's bytes. Threads, `--device` and `--io` do not.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Parameters {
    /// `sum`, `ties`, `iso` or `tsv`.
    pub method: Method,
    /// One weight per delta.
    pub weights: Vec<f64>,
    /// Kept values scaled by 1/density (`--rescale`; `apply` without `--no-rescale`).
    pub rescale: bool,
    /// `ties`, `iso`, `tsv`: the scale of the merged delta.
    pub alpha: f64,
    /// `ties`: the fraction kept by magnitude.
    pub trim: f64,
    /// The output dtype of float tensors (`None`: the base's).
    pub dtype: Option<String>,
    /// Merged onto a base other than the deltas' (`--force`).
    pub force: bool,
    /// The largest shard, in tensor bytes.
    pub shard_size: u64,
    /// The delta whose own files the output takes (`--files-from`; `apply` takes its delta's).
    #[serde(default)]
    pub files_from: Option<usize>,
    /// `ties`: the disjoint mean (true), or the agreeing tasks' sum (a mergekit
    /// configuration's `normalize: false`).
    #[serde(default = "yes", skip_serializing_if = "Clone::clone")]
    pub normalize: bool,
}

fn yes() -> bool {
    true
}

/// A recipe: everything needed to make an output again.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Recipe {
    /// Always [`RECIPE_FORMAT`].
    pub format: String,
    /// [`RECIPE_VERSION`].
    pub version: u64,
    /// The writer, with its version ([`crate::TOOL`]).
    pub tool: String,
    /// The operation.
    pub operation: Operation,
    /// The command line, as given.
    pub command: Vec<String>,
    /// The base checkpoint.
    pub base: Input,
    /// The deltas, in merge order.
    pub deltas: Vec<DeltaInput>,
    /// The parameters.
    pub parameters: Parameters,
}

/// The absolute form of `path` (the current folder joined), for a replay elsewhere.
fn absolute(path: &Path) -> String {
    std::path::absolute(path)
        .unwrap_or_else(|_| path.to_path_buf())
        .display()
        .to_string()
}

impl Recipe {
    /// The recipe of a merge (or an apply) of `deltas` onto `base` with `opts`, written to
    /// folders of `shard_size` shards by `command`. `base_fingerprint` is the base's as read
    /// by the merge; `delta_fingerprints` each delta's ([`Checkpoint::fingerprint`]), or none
    /// yet (a part of a merge: `finalize` fills them in).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        operation: Operation,
        command: Vec<String>,
        base: &Checkpoint,
        base_fingerprint: &str,
        deltas: &[MergeInput],
        delta_fingerprints: &[String],
        opts: &MergeOptions,
        shard_size: u64,
    ) -> Recipe {
        let weight = |d: usize| opts.weights.get(d).copied().unwrap_or(1.0);
        let deltas = deltas
            .iter()
            .enumerate()
            .map(|(d, delta)| {
                let fp = delta_fingerprints.get(d).cloned().unwrap_or_default();
                let p = delta.params();
                DeltaInput {
                    input: Input {
                        path: delta.path().display().to_string(),
                        absolute: absolute(delta.path()),
                        fingerprint: fp,
                    },
                    seed: p.seed,
                    lo: p.interval.lo(),
                    hi: p.interval.hi(),
                    density: p.interval.density(),
                    slot: p.slot.clone(),
                    weight: weight(d),
                    base_fingerprint: match delta.delta() {
                        Some(file) => file.fingerprint(),
                        None => base_fingerprint.to_string(),
                    },
                    kind: delta.delta().is_none().then(|| delta.kind().to_string()),
                    allow_nonfinite: delta.allows_nonfinite(),
                }
            })
            .collect::<Vec<_>>();
        Recipe {
            format: RECIPE_FORMAT.into(),
            version: RECIPE_VERSION,
            tool: crate::TOOL.into(),
            operation,
            command,
            base: Input {
                path: base.path().display().to_string(),
                absolute: absolute(base.path()),
                fingerprint: base_fingerprint.into(),
            },
            parameters: Parameters {
                method: opts.method,
                weights: (0..deltas.len()).map(weight).collect(),
                rescale: opts.rescale,
                alpha: opts.alpha,
                trim: opts.trim,
                dtype: opts.dtype.map(|f| f.name().to_string()),
                force: opts.force,
                shard_size,
                files_from: opts.files_from,
                normalize: opts.normalize,
            },
            deltas,
        }
    }

    /// The recipe as written: pretty JSON and a final newline.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("a recipe serializes");
        v.push(b'\n');
        v
    }

    /// Reads and checks the recipe at `path`.
    pub fn read(path: &Path) -> Result<Recipe> {
        let at = path.display();
        let text = std::fs::read(path).with_context(|| format!("{at}: cannot read the recipe"))?;
        let value: serde_json::Value =
            serde_json::from_slice(&text).with_context(|| format!("{at}: not valid JSON"))?;
        if value.get("format").and_then(|f| f.as_str()) != Some(RECIPE_FORMAT) {
            bail!("{at}: not a sotu-delta recipe (no \"format\": \"{RECIPE_FORMAT}\")");
        }
        let version = value.get("version").and_then(|v| v.as_u64());
        if version != Some(RECIPE_VERSION) {
            bail!(
                "{at}: recipe version {}; this build reads version {RECIPE_VERSION}",
                value
                    .get("version")
                    .map_or("none".into(), |v| v.to_string())
            );
        }
        let recipe: Recipe =
            serde_json::from_value(value).with_context(|| format!("{at}: not a valid recipe"))?;
        if recipe.deltas.is_empty() {
            bail!("{at}: the recipe names no delta");
        }
        if recipe.parameters.weights.len() != recipe.deltas.len() {
            bail!(
                "{at}: {} weights for {} deltas",
                recipe.parameters.weights.len(),
                recipe.deltas.len()
            );
        }
        Ok(recipe)
    }

    /// The merge options the recipe records.
    pub fn options(&self, at: &Path) -> Result<MergeOptions> {
        let p = &self.parameters;
        let dtype = p
            .dtype
            .as_deref()
            .map(crate::dtype::Float::parse)
            .transpose()
            .map_err(|e| anyhow::anyhow!("{}: dtype: {e}", at.display()))?;
        Ok(MergeOptions {
            weights: p.weights.clone(),
            rescale: p.rescale,
            dtype,
            force: p.force,
            method: p.method,
            alpha: p.alpha,
            trim: p.trim,
            files_from: p.files_from,
            normalize: p.normalize,
            ..MergeOptions::default()
        })
    }
}

impl Recipe {
    /// The command line without `--part K/N`: the whole merge that the parts of one make.
    pub fn whole_command(&mut self) {
        let mut words = Vec::with_capacity(self.command.len());
        let mut it = self.command.iter();
        while let Some(w) = it.next() {
            if w == "--part" {
                it.next();
            } else if !w.starts_with("--part=") {
                words.push(w.clone());
            }
        }
        self.command = words;
    }

    /// Whether `other` records the same inputs and parameters (commands aside).
    pub fn same_merge(&self, other: &Recipe) -> bool {
        (self.operation, &self.base, &self.deltas, &self.parameters)
            == (
                other.operation,
                &other.base,
                &other.deltas,
                &other.parameters,
            )
    }
}

impl Input {
    /// Where the input is now: the path as given, where it exists (relative to the current
    /// folder), else the absolute path recorded.
    pub fn locate(&self) -> PathBuf {
        let given = PathBuf::from(&self.path);
        if given.exists() {
            given
        } else {
            PathBuf::from(&self.absolute)
        }
    }

    /// Fails, naming the input and `recipe`, unless `fingerprint` is the one recorded.
    pub fn check(&self, fingerprint: &str, recipe: &Path) -> Result<()> {
        if fingerprint != self.fingerprint {
            bail!(
                "{}: no longer matches the recipe {}: its fingerprint is {fingerprint}, the recipe records {}; refusing to replay it (nothing was written)",
                self.path,
                recipe.display(),
                self.fingerprint
            );
        }
        Ok(())
    }
}
