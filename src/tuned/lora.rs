//! PEFT LoRA adapters, read as the fine-tune they stand for (docs/LORA.md).
//!
//! An adapter folder holds `adapter_config.json` and `adapter_model.safetensors`, whose keys
//! are `base_model.model.<module>.lora_A.weight` and `.lora_B.weight` (`lora_embedding_A` and
//! `lora_embedding_B` for an embedding), plus whole tensors (`modules_to_save`, trained biases).
//! The fine-tune it stands for has, for the weight `W` of each adapted module,
//!
//! ```text
//! δ[i, j] = s · Σ_k B[i, k]·A[k, j]       (transposed for fan_in_fan_out and embeddings)
//! v[i, j] = W[i, j]                        where δ[i, j] = 0
//!           round_to_dtype(W[i, j] + δ)    elsewhere
//! ```
//!
//! with `s = lora_alpha / r` (`/ √r` under `use_rslora`), every operation in f64 in that order
//! (products rounded, then the sum over `k` ascending, then the scale, then the base), rounded
//! once to the base's dtype. Its whole tensors are the adapter's, rounded to the base's dtype.
//! Its other tensors are the base's. The values are formed as they are read, a range at a time,
//! in buffers of the reading thread: memory stays bounded whatever the model's size.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use regex::Regex;
use serde_json::Value;

use super::{TunedInfo, TunedTensor};
use crate::dtype::Float;
use crate::dtype::elem::Elem;
use crate::io::{Checkpoint, IoMode, Pairs, Tensor, with_buffer};

/// The file that marks a folder as a PEFT adapter.
pub const CONFIG_NAME: &str = "adapter_config.json";
/// The adapter's weights.
pub const WEIGHTS_NAME: &str = "adapter_model.safetensors";
/// The prefix of every key PEFT saves for a model wrapped by `get_peft_model`.
const PREFIX: &str = "base_model.model.";
/// The largest configuration read: real ones are a few kilobytes.
const MAX_CONFIG_BYTES: u64 = 16 << 20;
/// Elements formed at a time when a whole tensor is compared with the base.
const PIECE: u64 = 1 << 16;

/// Whether `path` is a PEFT adapter folder (it holds [`CONFIG_NAME`]).
pub fn is_adapter(path: &Path) -> bool {
    path.is_dir() && std::fs::symlink_metadata(path.join(CONFIG_NAME)).is_ok()
}

/// One adapted module: the base weight it changes and how.
struct Factors {
    /// Key of `A` (r × in) in the adapter's weights.
    a: String,
    /// Key of `B` (out × r).
    b: String,
    /// The rank `r`.
    rank: usize,
    /// `lora_alpha / r`, or `lora_alpha / √r` under `use_rslora`.
    scale: f64,
    /// `δ = (B·A)ᵀ`: `fan_in_fan_out` (GPT-2's Conv1D stores its weight as in × out) and
    /// embeddings (PEFT's `lora_embedding_A` is r × num_embeddings).
    transposed: bool,
}

/// A PEFT LoRA adapter over its base, read as the fine-tune it stands for.
pub struct Adapter<'b> {
    base: &'b Checkpoint,
    dir: PathBuf,
    config: PathBuf,
    weights: Checkpoint,
    /// Base tensor name → its factors.
    adapted: BTreeMap<String, Factors>,
    /// Tensor name → key of a tensor the adapter stores whole (`modules_to_save`, biases).
    whole: BTreeMap<String, String>,
}

/// The parts of `adapter_config.json` that decide the delta.
struct Config {
    rank: usize,
    alpha: f64,
    rslora: bool,
    fan_in_fan_out: bool,
    rank_pattern: Vec<(Regex, String, usize)>,
    alpha_pattern: Vec<(Regex, String, f64)>,
}

impl<'b> Adapter<'b> {
    /// Opens the adapter folder `dir` over `base`, refusing what it cannot read as a plain
    /// LoRA exactly (another PEFT type, DoRA, a factor whose shape does not fit its base
    /// weight, …) with a message that names the folder and what is wrong.
    pub fn open(dir: &Path, base: &'b Checkpoint, io: IoMode) -> Result<Adapter<'b>> {
        let config_path = dir.join(CONFIG_NAME);
        let config = read_config(&config_path)?;
        let weights_path = dir.join(WEIGHTS_NAME);
        if std::fs::symlink_metadata(&weights_path).is_err() {
            bail!(
                "{}: a PEFT adapter folder without {WEIGHTS_NAME} (an adapter saved as adapter_model.bin must be converted to safetensors first)",
                dir.display()
            );
        }
        let weights = Checkpoint::open_with(&weights_path, io)?;
        let at = dir.display();
        let mut pairs: BTreeMap<String, (Option<String>, Option<String>, bool)> = BTreeMap::new();
        let mut whole = BTreeMap::new();
        for key in weights.tensors().keys() {
            let Some(rest) = key.strip_prefix(PREFIX) else {
                bail!("{at}: tensor {key} does not begin with {PREFIX}: not a PEFT adapter's key");
            };
            let (module, part) = match rest.rsplit_once(".lora_") {
                Some((m, p)) => (m, Some(p)),
                None => (rest, None),
            };
            match part {
                None => {
                    // PEFT saves an adapted layer's own weight under its wrapper's `base_layer`
                    // (an embedding, with save_embedding_layers): it is the module's weight.
                    let name = rest.replacen(".base_layer.", ".", 1);
                    if whole.insert(name.clone(), key.clone()).is_some() {
                        bail!("{at}: tensor {name} is stored twice (also as {key})");
                    }
                }
                Some("A.weight") => pairs.entry(module.into()).or_default().0 = Some(key.clone()),
                Some("B.weight") => pairs.entry(module.into()).or_default().1 = Some(key.clone()),
                Some("embedding_A") => {
                    let e = pairs.entry(module.into()).or_default();
                    (e.0, e.2) = (Some(key.clone()), true);
                }
                Some("embedding_B") => {
                    let e = pairs.entry(module.into()).or_default();
                    (e.1, e.2) = (Some(key.clone()), true);
                }
                Some(p) if p.starts_with("magnitude_vector") => bail!(
                    "{at}: tensor {key}: a DoRA magnitude vector; DoRA adapters are not supported (only plain LoRA)"
                ),
                Some("B.bias") => bail!(
                    "{at}: tensor {key}: a LoRA bias (lora_bias); not supported (only plain LoRA)"
                ),
                Some(_) => bail!("{at}: tensor {key}: not a LoRA factor this tool reads"),
            }
        }
        let mut adapted = BTreeMap::new();
        for (module, (a, b, embedding)) in pairs {
            let (Some(a), Some(b)) = (a, b) else {
                bail!("{at}: module {module} has only one of its two LoRA factors");
            };
            let weight = format!("{module}.weight");
            let factors = factors(&config, &weights, base, &module, &weight, a, b, embedding)
                .with_context(|| format!("{at}: module {module}"))?;
            if let Some(key) = whole.remove(&weight) {
                // The weight the change is added to, saved with the adapter: it must be the
                // base's own, which is all this tool can add the change to.
                let (w, b) = (
                    weights.tensor(&key).expect("listed"),
                    base.tensor(&weight).expect("checked"),
                );
                if w.info().dtype != b.info().dtype
                    || w.info().shape != b.info().shape
                    || !w.same_bytes(&b)?
                {
                    bail!(
                        "{at}: tensor {key}: the adapter saves the weight module {module} was trained from, and it is not the base {}'s {weight} (a resized or retrained layer); not supported",
                        base.path().display()
                    );
                }
            }
            adapted.insert(weight, factors);
        }
        for (name, key) in &whole {
            let t = weights.info(key).expect("listed");
            if let Some(b) = base.info(name) {
                let cast = Float::of(t.dtype).is_some() && Float::of(b.dtype).is_some();
                if t.shape != b.shape || (t.dtype != b.dtype && !cast) {
                    bail!(
                        "{at}: tensor {key} is {:?} {:?}, but the base {} has {name} as {:?} {:?}",
                        t.dtype,
                        t.shape,
                        base.path().display(),
                        b.dtype,
                        b.shape
                    );
                }
            }
        }
        Ok(Adapter {
            base,
            dir: dir.to_path_buf(),
            config: config_path,
            weights,
            adapted,
            whole,
        })
    }

    /// The folder given.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The adapter's weights file.
    pub fn checkpoint(&self) -> &Checkpoint {
        &self.weights
    }

    /// The fingerprint of its weights' tensors (docs/FORMAT.md section 7) and of its
    /// configuration's bytes (rank, alpha and patterns scale the product), BLAKE3 over both.
    pub fn fingerprint(&self) -> Result<String> {
        let config = crate::io::read_small_file(&self.config, MAX_CONFIG_BYTES)?;
        let mut h = blake3::Hasher::new();
        h.update(self.weights.fingerprint()?.as_bytes());
        h.update(&config);
        Ok(h.finalize().to_hex().to_string())
    }

    /// The folder and its configuration, which an output must not overwrite.
    pub fn protected_paths(&self) -> Vec<&Path> {
        vec![self.dir.as_path(), self.config.as_path()]
    }

    /// The fine-tune's tensors, in name order: the base's (adapted, stored whole, or
    /// unchanged), then those only the adapter has.
    pub fn tensors(&self) -> Vec<(&str, TunedInfo)> {
        let mut all: Vec<(&str, TunedInfo)> = self
            .base
            .tensors()
            .keys()
            .map(|n| (n.as_str(), self.info(n).expect("a base tensor")))
            .collect();
        all.extend(
            self.whole
                .keys()
                .filter(|n| self.base.info(n).is_none())
                .map(|n| (n.as_str(), self.info(n).expect("stored"))),
        );
        all.sort_by(|a, b| a.0.cmp(b.0));
        all
    }

    /// One tensor's header entry: the base's dtype and shape for a base tensor (a whole tensor
    /// is cast to the base's dtype), the adapter's for a new one.
    pub fn info(&self, name: &str) -> Option<TunedInfo> {
        let i = match self.base.info(name) {
            Some(i) => i,
            None => self.weights.info(self.whole.get(name)?)?,
        };
        Some(TunedInfo {
            dtype: i.dtype,
            shape: i.shape.clone(),
            len: i.range.len() as u64,
        })
    }

    /// Tensor `name` of the fine-tune.
    pub fn tensor(&self, name: &str) -> Option<TunedTensor<'_>> {
        let base = self.base.info(name);
        if let Some(f) = self.adapted.get(name) {
            let b = base.expect("checked at open");
            let w = |key: &str| {
                let t = self.weights.tensor(key).expect("checked at open");
                (t, Float::of(t.info().dtype).expect("checked at open"))
            };
            let ((a, a_float), (bf, b_float)) = (w(&f.a), w(&f.b));
            return Some(TunedTensor::Computed(Computed::Product(Product {
                base: self.base.tensor(name).expect("checked at open"),
                float: Float::of(b.dtype).expect("checked at open"),
                cols: b.shape[1],
                a_cols: self.weights.info(&f.a).expect("checked at open").shape[1],
                a,
                a_float,
                b: bf,
                b_float,
                rank: f.rank,
                scale: f.scale,
                transposed: f.transposed,
            })));
        }
        if let Some(key) = self.whole.get(name) {
            let tensor = self.weights.tensor(key).expect("listed");
            let dtype = tensor.info().dtype;
            return Some(match base.map(|b| b.dtype) {
                Some(to) if to != dtype => TunedTensor::Computed(Computed::Cast {
                    tensor,
                    from: Float::of(dtype).expect("checked at open"),
                    to: Float::of(to).expect("checked at open"),
                }),
                _ => TunedTensor::Stored {
                    tensor,
                    float: Float::of(dtype),
                },
            });
        }
        let tensor = self.base.tensor(name)?;
        Some(TunedTensor::Stored {
            float: Float::of(tensor.info().dtype),
            tensor,
        })
    }

    /// Whether tensor `name` (a base tensor) of the fine-tune is byte for byte the base's:
    /// formed a piece at a time, and only up to the first difference.
    pub fn same_as_base(&self, name: &str) -> Result<bool> {
        if !self.adapted.contains_key(name) && !self.whole.contains_key(name) {
            return Ok(true);
        }
        let base = self.base.tensor(name).expect("a base tensor");
        let tensor = self.tensor(name).expect("a base tensor");
        if let Some(stored) = tensor.stored() {
            return stored.same_bytes(&base);
        }
        let float = tensor.float().expect("a computed tensor is a float tensor");
        let size = float.size();
        let numel = base.info().numel();
        for p in 0..numel.div_ceil(PIECE) {
            let range = p * PIECE..numel.min((p + 1) * PIECE);
            let bytes = range.start as usize * size..range.end as usize * size;
            let same = with_buffer(|buf| {
                let want = base.read(bytes, buf)?;
                tensor.with_values(range, |got| Ok(got == want))
            })?;
            if !same {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Whether tensor `name` is one the adapter stores whole (`modules_to_save`, biases): it is
    /// carried whole by a delta, never masked (docs/LORA.md).
    pub fn stored_whole(&self, name: &str) -> bool {
        self.whole.contains_key(name)
    }
}

/// Reads and checks `adapter_config.json`.
fn read_config(path: &Path) -> Result<Config> {
    let at = path.display();
    let text = crate::io::read_small_file(path, MAX_CONFIG_BYTES)?;
    let value: Value =
        serde_json::from_slice(&text).with_context(|| format!("{at}: not valid JSON"))?;
    let Some(obj) = value.as_object() else {
        bail!("{at}: not a JSON object");
    };
    refuse_unsupported(obj, &at)?;
    let int = |key: &str, default: usize| -> Result<usize> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v
                .as_u64()
                .filter(|&r| r > 0)
                .map(|r| r as usize)
                .ok_or_else(|| anyhow!("{at}: {key} {v} is not a positive integer")),
        }
    };
    let number = |key: &str, v: &Value| -> Result<f64> {
        v.as_f64()
            .filter(|x| x.is_finite())
            .ok_or_else(|| anyhow!("{at}: {key} {v} is not a finite number"))
    };
    let flag = |key: &str| -> Result<bool> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => bail!("{at}: {key} {v} is not true or false"),
        }
    };
    // PEFT's defaults where a key is absent: r 8, lora_alpha 8.
    let rank = int("r", 8)?;
    let alpha = match obj.get("lora_alpha") {
        None | Some(Value::Null) => 8.0,
        Some(v) => number("lora_alpha", v)?,
    };
    let patterns = |key: &str| -> Result<Vec<(Regex, String, Value)>> {
        let Some(v) = obj.get(key).filter(|v| !v.is_null()) else {
            return Ok(Vec::new());
        };
        if !v.is_object() {
            bail!("{at}: {key} is not a JSON object");
        }
        // In file order: PEFT takes the first pattern that matches.
        let Pairs(pairs) = serde_json::from_value(v.clone())
            .with_context(|| format!("{at}: {key} is not a JSON object"))?;
        pairs
            .into_iter()
            .map(|(p, v)| {
                // PEFT: re.match(rf"(.*\.)?({key})$", module): the whole name, or a suffix
                // after a dot.
                let re = Regex::new(&format!(r"^(?:.*\.)?(?:{p})$")).with_context(|| {
                    format!(
                        "{at}: {key}: pattern {p:?} is not a regular expression this tool reads"
                    )
                })?;
                Ok((re, p, v))
            })
            .collect()
    };
    let rank_pattern = patterns("rank_pattern")?
        .into_iter()
        .map(|(re, p, v)| {
            let r = v.as_u64().filter(|&r| r > 0).ok_or_else(|| {
                anyhow!("{at}: rank_pattern {p:?}: {v} is not a positive integer")
            })?;
            Ok((re, p, r as usize))
        })
        .collect::<Result<_>>()?;
    let alpha_pattern = patterns("alpha_pattern")?
        .into_iter()
        .map(|(re, p, v)| Ok((re, p.clone(), number(&format!("alpha_pattern {p:?}"), &v)?)))
        .collect::<Result<_>>()?;
    Ok(Config {
        rank,
        alpha,
        rslora: flag("use_rslora")?,
        fan_in_fan_out: flag("fan_in_fan_out")?,
        rank_pattern,
        alpha_pattern,
    })
}

/// Fails unless configuration `obj` (of the file shown as `at`) is a plain LoRA adapter: one
/// whose merged weight is `W + s·B·A` on the base as it is.
fn refuse_unsupported(
    obj: &serde_json::Map<String, Value>,
    at: &dyn std::fmt::Display,
) -> Result<()> {
    match obj.get("peft_type").and_then(Value::as_str) {
        Some("LORA") => {}
        Some(other) => bail!(
            "{at}: peft_type {other}: only LoRA adapters (peft_type LORA) are supported, not {other}"
        ),
        None => bail!("{at}: no peft_type: not a PEFT adapter configuration"),
    }
    // Variants of LoRA whose merged weight is not W + s·B·A, or that change the base itself.
    let truthy = |v: &Value| {
        !matches!(v, Value::Null | Value::Bool(false))
            && !v.as_array().is_some_and(|a| a.is_empty())
            && !v.as_object().is_some_and(|o| o.is_empty())
    };
    let refused = [
        ("use_dora", "DoRA"),
        ("lora_bias", "a LoRA bias"),
        ("use_qalora", "QALoRA"),
        ("layer_replication", "layer replication"),
        ("alora_invocation_tokens", "activated LoRA (aLoRA)"),
        (
            "target_parameters",
            "LoRA on parameters (target_parameters)",
        ),
        ("trainable_token_indices", "trainable tokens"),
        ("megatron_config", "Megatron-sharded LoRA"),
        ("use_bdlora", "block-diagonal LoRA"),
        ("arrow_config", "Arrow routing"),
        ("kasa_config", "KaSA"),
        ("velora_config", "VeLoRA"),
        ("monteclora_config", "MonteCLoRA"),
    ];
    for (key, what) in refused {
        if obj.get(key).is_some_and(truthy) {
            bail!("{at}: {key}: {what} is not supported (only plain LoRA)");
        }
    }
    match obj.get("init_lora_weights") {
        None | Some(Value::Bool(_)) => {}
        Some(Value::String(s))
            if ["gaussian", "eva", "orthogonal", "mica"].contains(&s.as_str()) => {}
        Some(v) => bail!(
            "{at}: init_lora_weights {v}: an adapter initialised this way was trained from a changed base (PiSSA, OLoRA, CorDA, LoftQ and LoRA-GA change the base weights); convert it to a plain LoRA first (PEFT's path_initial_model_for_weight_conversion)"
        ),
    }
    Ok(())
}

/// The factors of `module` (whose weight is the base tensor `weight`), checked against the
/// configuration and the base: `A` (r × in) and `B` (out × r) of a float dtype, `r` the rank
/// the configuration gives this module, and `B·A` (or its transpose) the base weight's shape.
#[allow(clippy::too_many_arguments)]
fn factors(
    config: &Config,
    weights: &Checkpoint,
    base: &Checkpoint,
    module: &str,
    weight: &str,
    a: String,
    b: String,
    embedding: bool,
) -> Result<Factors> {
    let (ai, bi) = (
        weights.info(&a).expect("listed"),
        weights.info(&b).expect("listed"),
    );
    for (key, i) in [(&a, ai), (&b, bi)] {
        if Float::of(i.dtype).is_none() {
            bail!("factor {key} is {:?}, not a float dtype", i.dtype);
        }
        if i.shape.len() != 2 {
            bail!(
                "factor {key} has shape {:?}: only the LoRA of linear and embedding layers (2-D factors) is supported",
                i.shape
            );
        }
    }
    let Some(w) = base.info(weight) else {
        bail!(
            "the base {} has no tensor {weight} for it to change",
            base.path().display()
        );
    };
    if Float::of(w.dtype).is_none() || w.shape.len() != 2 {
        bail!(
            "its base weight {weight} is {:?} {:?}, not a float matrix",
            w.dtype,
            w.shape
        );
    }
    let (r, inner, out) = (ai.shape[0], ai.shape[1], bi.shape[0]);
    if bi.shape[1] != r {
        bail!(
            "{a} has shape {:?} but {b} has shape {:?}: their rank differs",
            ai.shape,
            bi.shape
        );
    }
    // PEFT's get_pattern_key: the first pattern, in the file's order, that matches.
    let want = config
        .rank_pattern
        .iter()
        .find(|(re, ..)| re.is_match(module))
        .map_or(config.rank, |p| p.2);
    if want != r {
        bail!("the configuration gives it rank {want} (r, rank_pattern) but {a} has {r} rows");
    }
    let alpha = config
        .alpha_pattern
        .iter()
        .find(|(re, ..)| re.is_match(module))
        .map_or(config.alpha, |p| p.2);
    let scale = if config.rslora {
        alpha / (r as f64).sqrt()
    } else {
        alpha / r as f64
    };
    let transposed = embedding || config.fan_in_fan_out;
    let shape = if transposed {
        [inner, out]
    } else {
        [out, inner]
    };
    if w.shape[..] != shape {
        bail!(
            "{} gives a {shape:?} change but its base weight {weight} is {:?}{}",
            if transposed { "(B·A)ᵀ" } else { "B·A" },
            w.shape,
            if embedding {
                ""
            } else if config.fan_in_fan_out {
                " (fan_in_fan_out is set)"
            } else {
                " (fan_in_fan_out is not set)"
            }
        );
    }
    Ok(Factors {
        a,
        b,
        rank: r,
        scale,
        transposed,
    })
}

/// A tensor of an adapter's fine-tune whose values are formed as they are read.
pub enum Computed<'a> {
    /// The LoRA product over a base weight.
    Product(Product<'a>),
    /// A whole tensor stored in another float dtype than the base's, rounded to it.
    Cast {
        /// The stored tensor.
        tensor: Tensor<'a>,
        /// Their dtype.
        from: Float,
        /// The base's dtype.
        to: Float,
    },
}

/// `W + s·B·A` (or its transpose) over a base weight, as the module documentation defines it.
pub struct Product<'a> {
    base: Tensor<'a>,
    float: Float,
    cols: usize,
    /// Columns of `A`.
    a_cols: usize,
    a: Tensor<'a>,
    a_float: Float,
    b: Tensor<'a>,
    b_float: Float,
    rank: usize,
    scale: f64,
    transposed: bool,
}

thread_local! {
    /// Each thread's buffers for values formed as they are read: the values, and the product's
    /// accumulator, column factors and base values.
    static BUFFERS: RefCell<Buffers> = RefCell::default();
}

#[derive(Default)]
struct Buffers {
    values: Vec<u8>,
    acc: Vec<f64>,
    cols: Vec<f64>,
    load: Vec<f64>,
}

impl Computed<'_> {
    /// The element type of its values.
    pub fn float(&self) -> Float {
        match self {
            Computed::Product(p) => p.float,
            Computed::Cast { to, .. } => *to,
        }
    }

    /// Calls `f` with the values of elements `range`, formed in this thread's buffer.
    pub fn with_values<R>(
        &self,
        range: Range<u64>,
        f: impl FnOnce(&[u8]) -> Result<R>,
    ) -> Result<R> {
        BUFFERS.with_borrow_mut(|buf| {
            let Buffers {
                values,
                acc,
                cols,
                load,
            } = buf;
            match self {
                Computed::Product(p) => {
                    crate::with_elem!(p.float, E => p.fill::<E>(range, values, acc, cols, load))?
                }
                Computed::Cast { tensor, from, to } => {
                    let (s, e) = (range.start as usize, range.end as usize);
                    with_buffer(|raw| -> Result<()> {
                        from.load_all(tensor.read(s * from.size()..e * from.size(), raw)?, load);
                        Ok(())
                    })?;
                    to.store_all(load, values);
                }
            }
            f(values)
        })
    }
}

impl Product<'_> {
    /// Forms the values of elements `range` (row-major) into `out`, a row segment at a time:
    /// for each row, the accumulator over the segment's columns takes `B[i, k]·A[k, j]` for
    /// `k` ascending (one rounding per product and per sum, the same order for every element,
    /// so the bytes do not depend on how the tensor is cut), then the scale and the base.
    fn fill<E: Elem>(
        &self,
        range: Range<u64>,
        out: &mut Vec<u8>,
        acc: &mut Vec<f64>,
        cols: &mut Vec<f64>,
        load: &mut Vec<f64>,
    ) -> Result<()> {
        let (n, r) = (self.cols as u64, self.rank);
        out.clear();
        out.resize((range.end - range.start) as usize * E::SIZE, 0);
        if range.is_empty() {
            return Ok(());
        }
        // The factors are small (rank × a side): read whole, in place under `--io mmap`.
        let (fa, fb) = (self.a.whole()?, self.b.whole()?);
        let (fa, fb) = (&fa[..], &fb[..]);
        // The columns this range touches: all of them once it spans a row end.
        let (first_row, last_row) = (range.start / n, (range.end - 1) / n);
        let (j0, j1) = if first_row == last_row {
            (
                (range.start % n) as usize,
                ((range.end - 1) % n + 1) as usize,
            )
        } else {
            (0, self.cols)
        };
        let width = j1 - j0;
        // Column factors as f64, `k`-major over the columns: `A[k, j]` (or `B[j, k]`).
        cols.clear();
        cols.resize(r * width, 0.0);
        for k in 0..r {
            let dst = &mut cols[k * width..(k + 1) * width];
            if self.transposed {
                for (j, c) in dst.iter_mut().enumerate() {
                    *c = self.b_float.load(fb, (j0 + j) * r + k);
                }
            } else {
                let size = self.a_float.size();
                let row = k * self.cols;
                self.a_float
                    .load_all(&fa[(row + j0) * size..(row + j1) * size], load);
                dst.copy_from_slice(load);
            }
        }
        with_buffer(|raw| -> Result<()> {
            let base_all = self.base.read(
                range.start as usize * E::SIZE..range.end as usize * E::SIZE,
                raw,
            )?;
            for i in first_row..=last_row {
                let row_start = (i * n).max(range.start);
                let row_end = ((i + 1) * n).min(range.end);
                let (c0, c1) = ((row_start - i * n) as usize, (row_end - i * n) as usize);
                acc.clear();
                acc.resize(c1 - c0, -0.0);
                for k in 0..r {
                    // Row factor `B[i, k]` (or `A[k, i]`).
                    let x = if self.transposed {
                        self.a_float.load(fa, k * self.a_cols + i as usize)
                    } else {
                        self.b_float.load(fb, i as usize * r + k)
                    };
                    let col = &cols[k * width + (c0 - j0)..k * width + (c1 - j0)];
                    for (a, &c) in acc.iter_mut().zip(col) {
                        *a += x * c;
                    }
                }
                let at = (row_start - range.start) as usize;
                let base = &base_all[at * E::SIZE..(row_end - range.start) as usize * E::SIZE];
                let dst = &mut out[at * E::SIZE..(at + acc.len()) * E::SIZE];
                for ((o, b), &p) in dst
                    .chunks_exact_mut(E::SIZE)
                    .zip(base.chunks_exact(E::SIZE))
                    .zip(acc.iter())
                {
                    let delta = self.scale * p;
                    let bits = E::bits(b);
                    // No change leaves the base's bits, −0.0 and NaN payloads included.
                    E::put(
                        o,
                        if delta == 0.0 {
                            bits
                        } else {
                            E::round(E::value(bits) + delta)
                        },
                    );
                }
            }
            Ok(())
        })
    }
}
