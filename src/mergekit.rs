//! mergekit configurations: the YAML subset that `merge --config` reads (docs/MERGEKIT.md),
//! turned into this tool's merge: the base, the inputs with their weights and densities, the
//! method and its options. Nothing here merges; the command line then opens the inputs and runs
//! the one merge.
//!
//! mergekit's semantics are followed where this tool's arithmetic can express them, and every
//! difference is refused or written in docs/MERGEKIT.md: `task_arithmetic`, `linear` and
//! `dare_linear` are `sum` with weights folded from `weight`, `normalize` and `lambda`; `ties`
//! and `dare_ties` are `ties`; `sotu`, `iso` and `tsv` are this tool's own.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

use crate::dtype::Float;
use crate::merge::Method;

/// The largest configuration read: real ones are a few kilobytes.
const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// mergekit's divisor floor: a weight sum smaller than this in magnitude divides by 1.
const MIN_DIVISOR: f64 = 1e-8;

/// One model of the configuration that the merge adds to the base.
#[derive(Clone, Debug, PartialEq)]
pub struct ConfigInput {
    /// The fine-tune (a checkpoint or a LoRA adapter folder) or delta file.
    pub path: PathBuf,
    /// Whether `path` is a delta file (its own mask applies; it takes no density).
    pub delta_file: bool,
    /// The fraction its mask keeps, where the configuration gives it and the method masks at
    /// random (`dare_*`, `sotu`, `iso`, `tsv`); `None` for the default
    /// ([`ConfigMerge::density`], or a whole slot under `--slots`).
    pub density: Option<f64>,
    /// Its weight in this tool's merge (`weight` with `normalize` and `lambda` folded in, for
    /// the `sum` methods; `weight` itself for `ties`, `iso` and `tsv`).
    pub weight: f64,
}

/// A configuration, read and translated.
#[derive(Clone, Debug, PartialEq)]
pub struct ConfigMerge {
    /// `merge_method` as written.
    pub merge_method: String,
    /// The base checkpoint.
    pub base: PathBuf,
    /// The models merged onto it, in the configuration's order.
    pub inputs: Vec<ConfigInput>,
    /// This tool's method.
    pub method: Method,
    /// `--rescale` (DARE's 1/density), for `sum`.
    pub rescale: bool,
    /// `--alpha` (`lambda`), for `ties`, `iso` and `tsv`.
    pub alpha: f64,
    /// `--trim` (the models' `density`), for `ties`.
    pub trim: f64,
    /// The disjoint mean of `ties` (`normalize`).
    pub normalize: bool,
    /// The output dtype of float tensors (`out_dtype`, else `dtype`).
    pub dtype: Option<Float>,
    /// The mask density of a model that gives none: 1/T for `sotu` (T models merged), 1
    /// otherwise (every element kept).
    pub density: f64,
    /// What the configuration asks that is ignored, one sentence each.
    pub warnings: Vec<String>,
}

/// How mergekit and this tool read one `merge_method`.
struct MethodSpec {
    method: Method,
    /// The model parameters it reads, besides `weight`.
    density: Density,
    /// Whether `weight` is required (mergekit's methods) or defaults to 1 (this tool's).
    weight_required: bool,
    /// Its top-level parameters, with mergekit's defaults.
    normalize: Option<bool>,
    lambda: bool,
    rescale: Option<bool>,
    int8_mask: bool,
}

/// What a model's `density` means to a method.
#[derive(Clone, Copy, PartialEq)]
enum Density {
    /// Not a parameter.
    None,
    /// Read and ignored, as mergekit ignores it (`task_arithmetic`).
    Ignored,
    /// The magnitude trim (`ties`).
    Trim,
    /// The random mask (`dare_*`, `sotu`, `iso`, `tsv`), default 1 (1/T for `sotu`).
    Mask,
}

fn spec(name: &str) -> Option<MethodSpec> {
    let m = |method, density, weight_required, normalize, lambda, rescale, int8_mask| MethodSpec {
        method,
        density,
        weight_required,
        normalize,
        lambda,
        rescale,
        int8_mask,
    };
    Some(match name {
        "linear" => m(
            Method::Sum,
            Density::None,
            true,
            Some(true),
            false,
            None,
            false,
        ),
        "task_arithmetic" => m(
            Method::Sum,
            Density::Ignored,
            true,
            Some(false),
            true,
            None,
            true,
        ),
        "ties" => m(
            Method::Ties,
            Density::Trim,
            true,
            Some(true),
            true,
            None,
            true,
        ),
        "dare_linear" => m(
            Method::Sum,
            Density::Mask,
            true,
            Some(false),
            true,
            Some(true),
            true,
        ),
        "dare_ties" => m(
            Method::Ties,
            Density::Mask,
            true,
            Some(false),
            true,
            Some(true),
            true,
        ),
        "sotu" => m(
            Method::Sum,
            Density::Mask,
            false,
            None,
            true,
            Some(false),
            false,
        ),
        "iso" => m(Method::Iso, Density::Mask, false, None, true, None, false),
        "tsv" => m(Method::Tsv, Density::Mask, false, None, true, None, false),
        _ => return None,
    })
}

/// The mergekit merge methods this tool does not read, for the message.
const OTHER_MERGEKIT_METHODS: &[&str] = &[
    "slerp",
    "nuslerp",
    "multislerp",
    "karcher",
    "passthrough",
    "model_stock",
    "nearswap",
    "arcee_fusion",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "sce",
    "ram",
    "ramplus_tl",
];

/// Reads and translates the configuration at `path`. Model paths are local: relative ones are
/// taken from the working directory, as mergekit takes them.
pub fn read(path: &Path) -> Result<ConfigMerge> {
    let at = path.display().to_string();
    let text = crate::io::read_small_file(path, MAX_CONFIG_BYTES)?;
    let text = std::str::from_utf8(&text).with_context(|| format!("{at}: not UTF-8 text"))?;
    let value: Value = serde_saphyr::from_str(text).map_err(|e| {
        anyhow!(
            "{at}: not a valid YAML configuration: {}",
            e.without_snippet()
                .to_string()
                .trim_start_matches("error: ")
        )
    })?;
    translate(&value, &at)
}

/// Translates a parsed configuration; `at` names it in messages.
fn translate(value: &Value, at: &str) -> Result<ConfigMerge> {
    let Some(top) = value.as_object() else {
        bail!("{at}: not a mapping of keys (merge_method, base_model, models, …)");
    };
    let (merge_method, spec) = method(top, at)?;
    let base_given = match top.get("base_model") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(local_path(s, &format!("{at}: base_model"))?),
        Some(v) => bail!("{at}: base_model: {v} is not a path"),
    };
    let Some(Value::Array(models)) = top.get("models") else {
        bail!("{at}: models: a list of models is required");
    };
    if models.is_empty() {
        bail!("{at}: models: the list is empty");
    }
    let merge_dtype = dtype_of(top, "dtype", at)?;
    let dtype = dtype_of(top, "out_dtype", at)?.or(merge_dtype);
    let mut warnings = Vec::new();
    let Global {
        normalize,
        lambda,
        rescale,
    } = global_parameters(top, &spec, &merge_method, at, &mut warnings)?;
    // The models; for mergekit's task-vector methods, the base model listed among them is
    // skipped, as mergekit skips it (`linear` averages it like any other).
    let entries = models_of(models, &spec, &merge_method, base_given.as_deref(), at)?;
    let base = match &base_given {
        Some(b) => b.clone(),
        None if merge_method == "linear" => entries[0].path.clone(),
        None => {
            bail!("{at}: base_model: {merge_method} merges task vectors and needs a base model")
        }
    };
    let is_base = |p: &Path| same_file(p, &base);
    let linear = merge_method == "linear";
    // The models that take part, and their weights (mergekit requires `weight` of each).
    let mut parts = Vec::new();
    for Model {
        here,
        path,
        adapter,
        weight,
        density,
    } in entries
    {
        let base_itself = adapter.is_none() && is_base(&path);
        if base_itself && !linear {
            continue;
        }
        let weight = match weight {
            Some(w) => w,
            None if !spec.weight_required => 1.0,
            None => bail!("{here}.parameters.weight: required by {merge_method}"),
        };
        parts.push((here, adapter.unwrap_or(path), base_itself, weight, density));
    }
    if parts.iter().all(|p| p.2) {
        bail!("{at}: models: no model other than the base model to merge");
    }
    let count = parts.iter().filter(|p| !p.2).count();
    let weight_sum: f64 = parts.iter().map(|p| p.3).fold(0.0, |a, w| a + w);

    // The sum methods fold normalize and lambda into each weight: mergekit's
    // (Σ w·δ / divisor) · λ, one weight per model, w / divisor · λ.
    let divisor = match (spec.method, normalize) {
        (Method::Sum, Some(true)) if linear => {
            if weight_sum == 0.0 {
                bail!("{at}: linear with normalize: the weights sum to 0");
            }
            weight_sum
        }
        (Method::Sum, Some(true)) if weight_sum.abs() < MIN_DIVISOR => 1.0,
        (Method::Sum, Some(true)) => weight_sum,
        _ => 1.0,
    };
    if linear && normalize == Some(false) && weight_sum != 1.0 {
        bail!(
            "{at}: linear with normalize: false and weights summing to {weight_sum}: mergekit then scales the base itself by that sum, which a merge of deltas onto the base cannot; set normalize: true or make the weights sum to 1"
        );
    }
    let scale = |w: f64| match spec.method {
        Method::Sum => w / divisor * lambda,
        _ => w,
    };
    let (inputs, trims) = inputs_of(parts, &spec, &merge_method, &scale, &mut warnings)?;
    let trim = trim_of(spec.method, &trims, at)?;
    if spec.method != Method::Sum && inputs.len() < 2 {
        bail!("{at}: {merge_method} needs two models or more besides the base model");
    }
    let sotu_density = if merge_method == "sotu" {
        1.0 / count as f64
    } else {
        1.0
    };
    Ok(ConfigMerge {
        merge_method,
        base,
        inputs,
        method: spec.method,
        rescale: spec.method == Method::Sum && rescale == Some(true),
        alpha: if spec.method == Method::Sum {
            1.0
        } else {
            lambda
        },
        trim,
        normalize: normalize.unwrap_or(true),
        dtype,
        density: sotu_density,
        warnings,
    })
}

/// The inputs that `parts` (the models taking part: where each was written, its path, whether
/// it is the base itself, its weight and density) make, their weights scaled by `scale`; and
/// the densities that `ties` trims to.
fn inputs_of(
    parts: Vec<(String, PathBuf, bool, f64, Option<f64>)>,
    spec: &MethodSpec,
    merge_method: &str,
    scale: &dyn Fn(f64) -> f64,
    warnings: &mut Vec<String>,
) -> Result<(Vec<ConfigInput>, Vec<f64>)> {
    let mut inputs = Vec::new();
    let mut trims = Vec::new();
    for (here, path, base_itself, weight, density) in parts {
        if base_itself {
            // linear: the base's own term is zero; its weight counts in the sum above.
            continue;
        }
        let delta_file = is_delta_file(&path);
        if delta_file && density.is_some() {
            bail!(
                "{here}.parameters.density: {} is a delta file, whose mask is its own",
                path.display()
            );
        }
        let weight = scale(weight);
        let mask_density = match spec.density {
            Density::Mask => density,
            _ => None,
        };
        if spec.density == Density::Ignored && density.is_some() {
            warnings.push(format!(
                "{here}.parameters.density: ignored by {merge_method}, as mergekit ignores it"
            ));
        }
        if spec.density == Density::Trim {
            trims.push(density.unwrap_or(1.0));
        }
        inputs.push(ConfigInput {
            path,
            delta_file,
            density: mask_density,
            weight,
        });
    }
    Ok((inputs, trims))
}

/// `ties`' one trim fraction from the models' densities (`trims`).
fn trim_of(method: Method, trims: &[f64], at: &str) -> Result<f64> {
    Ok(match (method, trims.first()) {
        (Method::Ties, Some(&t)) if trims.iter().all(|&x| x == t) => t,
        (Method::Ties, Some(_)) => bail!(
            "{at}: models: ties here trims every model to one density, and these differ ({trims:?}); give them one density (docs/MERGEKIT.md)"
        ),
        // dare_ties: the random mask is the only sparsification; keep every element.
        (Method::Ties, None) => 1.0,
        // Not a ties merge: the option's default, which the merge does not read.
        _ => crate::merge::MergeOptions::default().trim,
    })
}

/// The dtype named by `key` (`dtype`, `out_dtype`), if any.
fn dtype_of(top: &serde_json::Map<String, Value>, key: &str, at: &str) -> Result<Option<Float>> {
    match top.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => match s.trim_start_matches("torch.") {
            "bfloat16" => Ok(Some(Float::BF16)),
            "float16" => Ok(Some(Float::F16)),
            "float32" => Ok(Some(Float::F32)),
            other => bail!("{at}: {key}: {other:?} is not one of bfloat16, float16, float32"),
        },
        Some(v) => bail!("{at}: {key}: {v} is not a dtype name"),
    }
}

/// The configuration's keys checked, and its `merge_method` with what this tool makes of it.
fn method(top: &serde_json::Map<String, Value>, at: &str) -> Result<(String, MethodSpec)> {
    for key in top.keys() {
        match key.as_str() {
            "merge_method" | "base_model" | "models" | "parameters" | "dtype" | "out_dtype" => {}
            "slices" | "modules" | "tokenizer_source" | "tokenizer" | "chat_template" => bail!(
                "{at}: {key}: a mergekit key this tool does not read (it reads merge_method, base_model, models, parameters, dtype and out_dtype; docs/MERGEKIT.md)"
            ),
            _ => bail!("{at}: {key}: unknown key"),
        }
    }
    let merge_method = match top.get("merge_method") {
        Some(Value::String(s)) => s.clone(),
        Some(v) => bail!("{at}: merge_method: {v} is not a method name"),
        None => bail!("{at}: no merge_method"),
    };
    let Some(spec) = spec(&merge_method) else {
        if OTHER_MERGEKIT_METHODS.contains(&merge_method.as_str()) {
            bail!(
                "{at}: merge_method {merge_method}: a mergekit method this tool does not implement (it reads task_arithmetic, ties, dare_linear, dare_ties, linear, sotu, iso and tsv)"
            );
        }
        bail!(
            "{at}: merge_method {merge_method}: unknown (this tool reads task_arithmetic, ties, dare_linear, dare_ties, linear, sotu, iso and tsv)"
        );
    };
    Ok((merge_method, spec))
}

/// The top-level `parameters` a method takes.
struct Global {
    normalize: Option<bool>,
    lambda: f64,
    rescale: Option<bool>,
}

/// Reads the top-level `parameters` of `merge_method` (`spec`), adding its warnings.
fn global_parameters(
    top: &serde_json::Map<String, Value>,
    spec: &MethodSpec,
    merge_method: &str,
    at: &str,
    warnings: &mut Vec<String>,
) -> Result<Global> {
    let params = parameters(top.get("parameters"), &format!("{at}: parameters"))?;
    let mut normalize = spec.normalize;
    let mut lambda = 1.0;
    let mut rescale = spec.rescale;
    for (key, v) in &params {
        let here = format!("{at}: parameters.{key}");
        match key.as_str() {
            "normalize" if spec.normalize.is_some() => normalize = Some(flag(v, &here)?),
            "lambda" if spec.lambda => lambda = number(v, &here)?,
            "rescale" if spec.rescale.is_some() => rescale = Some(flag(v, &here)?),
            "int8_mask" if spec.int8_mask => {
                flag(v, &here)?;
                warnings.push(format!(
                    "{here}: ignored (in mergekit it only stores the sign masks in 8 bits)"
                ));
            }
            _ => bail!("{here}: not a parameter of {merge_method} in this tool (docs/MERGEKIT.md)"),
        }
    }
    if merge_method == "dare_ties" && rescale == Some(false) {
        bail!(
            "{at}: parameters.rescale: false is not supported by dare_ties here: its ties acts on each model's unbiased estimate, the DARE rescale (docs/MERGEKIT.md)"
        );
    }

    Ok(Global {
        normalize,
        lambda,
        rescale,
    })
}

/// One entry of `models` as written: where it is and its parameters.
struct Model {
    /// `models[k]`, for messages.
    here: String,
    path: PathBuf,
    /// A LoRA adapter's folder, when the model is `base+adapter`.
    adapter: Option<PathBuf>,
    weight: Option<f64>,
    density: Option<f64>,
}

/// Reads every entry of `models`, checking its keys and parameters against `merge_method`.
fn models_of(
    models: &[Value],
    spec: &MethodSpec,
    merge_method: &str,
    base_given: Option<&Path>,
    at: &str,
) -> Result<Vec<Model>> {
    let mut entries = Vec::new();
    for (k, m) in models.iter().enumerate() {
        let here = format!("{at}: models[{k}]");
        let Some(m) = m.as_object() else {
            bail!("{here}: not a mapping with model and parameters");
        };
        if let Some(key) = m.keys().find(|k| *k != "model" && *k != "parameters") {
            bail!("{here}.{key}: unknown key (a model has model and parameters)");
        }
        let Some(Value::String(name)) = m.get("model") else {
            bail!("{here}: model: a path is required");
        };
        let params = parameters(m.get("parameters"), &format!("{here}.parameters"))?;
        let mut weight = None;
        let mut density = None;
        for (key, v) in &params {
            let here = format!("{here}.parameters.{key}");
            match key.as_str() {
                "weight" => weight = Some(number(v, &here)?),
                "density" if spec.density != Density::None => {
                    let d = number(v, &here)?;
                    if !(d > 0.0 && d <= 1.0) {
                        bail!("{here}: {d} is not in (0, 1]");
                    }
                    density = Some(d);
                }
                _ => bail!(
                    "{here}: not a model parameter of {merge_method} in this tool (docs/MERGEKIT.md)"
                ),
            }
        }
        let (path, adapter) = model_path(name, base_given, &format!("{here}.model"))?;
        entries.push(Model {
            here,
            path,
            adapter,
            weight,
            density,
        });
    }
    Ok(entries)
}

/// A `parameters` mapping: numbers and flags by name; a mergekit gradient (a list) or
/// conditional value (a list of filters) is refused.
fn parameters(v: Option<&Value>, at: &str) -> Result<BTreeMap<String, Value>> {
    let map = match v {
        None | Some(Value::Null) => return Ok(BTreeMap::new()),
        Some(Value::Object(m)) => m,
        Some(v) => bail!("{at}: {v} is not a mapping of parameters"),
    };
    map.iter()
        .map(|(k, v)| match v {
            Value::Number(_) | Value::Bool(_) => Ok((k.clone(), v.clone())),
            Value::Array(_) | Value::Object(_) => bail!(
                "{at}.{k}: a gradient or filtered value; this tool reads one number per parameter"
            ),
            _ => bail!("{at}.{k}: {v} is not a number"),
        })
        .collect()
}

fn number(v: &Value, at: &str) -> Result<f64> {
    v.as_f64()
        .filter(|x| x.is_finite())
        .ok_or_else(|| anyhow!("{at}: {v} is not a finite number"))
}

fn flag(v: &Value, at: &str) -> Result<bool> {
    v.as_bool()
        .ok_or_else(|| anyhow!("{at}: {v} is not true or false"))
}

/// A model reference as a local path. mergekit also takes Hugging Face Hub ids
/// (`org/name`, downloaded on the fly); this tool reads local files only.
fn local_path(name: &str, at: &str) -> Result<PathBuf> {
    let path = PathBuf::from(name);
    if std::fs::symlink_metadata(&path).is_ok() {
        return Ok(path);
    }
    let hub_like = {
        let parts: Vec<&str> = name.split('/').collect();
        parts.len() == 2
            && parts.iter().all(|p| {
                !p.is_empty()
                    && p.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                    && !p.starts_with('.')
            })
    };
    if hub_like {
        bail!(
            "{at}: {name} is not a local path; it looks like a Hugging Face Hub id, and this tool reads local files only: download it first (e.g. `huggingface-cli download {name} --local-dir DIR`) and give DIR"
        );
    }
    bail!("{at}: {name}: no such file or folder")
}

/// A model's path, and for mergekit's `MODEL+LORA` form the adapter folder (over the base
/// model: an adapter over another model is no delta of this base).
fn model_path(name: &str, base: Option<&Path>, at: &str) -> Result<(PathBuf, Option<PathBuf>)> {
    if std::fs::symlink_metadata(name).is_err()
        && let Some((model, lora)) = name.split_once('+')
    {
        let model = local_path(model, at)?;
        let lora = local_path(lora, at)?;
        if !base.is_some_and(|b| same_file(&model, b)) {
            bail!(
                "{at}: {name}: a LoRA over {} rather than over the base model; this tool merges adapters of the base only",
                model.display()
            );
        }
        if !crate::tuned::lora::is_adapter(&lora) {
            bail!(
                "{at}: {}: not a PEFT adapter folder (no adapter_config.json)",
                lora.display()
            );
        }
        return Ok((model, Some(lora)));
    }
    Ok((local_path(name, at)?, None))
}

/// Whether two paths name the same file or folder.
fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// Whether `path` holds a delta file (`__metadata__["format"]` is the delta format's), rather
/// than a checkpoint or an adapter.
fn is_delta_file(path: &Path) -> bool {
    if crate::tuned::lora::is_adapter(path) {
        return false;
    }
    crate::io::Checkpoint::open(path).is_ok_and(|c| {
        c.metadata().get("format").map(String::as_str) == Some(crate::format::FORMAT_NAME)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<ConfigMerge> {
        let v: Value = serde_saphyr::from_str(yaml).unwrap();
        translate(&v, "merge.yml")
    }

    fn err(yaml: &str) -> String {
        format!("{:#}", parse(yaml).unwrap_err())
    }

    #[test]
    fn unknown_and_unsupported_keys_are_named() {
        assert!(err("merge_method: ties\nfoo: 1\n").contains("foo: unknown key"));
        assert!(err("merge_method: ties\nslices: []\n").contains("slices: a mergekit key"));
        assert!(err("merge_method: slerp\nmodels: [{model: x}]\n").contains("slerp"));
        assert!(err("merge_method: bogus\nmodels: [{model: x}]\n").contains("bogus: unknown"));
    }

    #[test]
    fn hub_ids_are_refused_with_a_download_hint() {
        let e = err(
            "merge_method: task_arithmetic\nbase_model: meta-llama/Llama-3.1-8B\nmodels: [{model: x}]\n",
        );
        assert!(
            e.contains("Hugging Face Hub id") && e.contains("download it first"),
            "{e}"
        );
    }
}
