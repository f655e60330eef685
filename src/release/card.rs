//! The model card (`README.md`) of a merged or applied model folder, for the Hugging Face Hub.
//! It replaces the base's card, which would claim the folder is the base: YAML front matter
//! (`base_model`, `base_model_relation`, `tags`, `library_name`, `license`) and a body that says
//! what went in and how, rendered from the [`Recipe`].
//!
//! The base's card is read only for its `license` (with serde-saphyr, the YAML reader of
//! `merge --config`). A card that cannot be read (not UTF-8, front matter that is not a YAML
//! mapping, YAML aliases) gets a warning, never a failed merge. The front matter is written a key
//! a line, each value in JSON, which is YAML's flow style: any YAML reader (the Hub's, PyYAML)
//! reads it, and no string needs quoting rules of its own.

use std::fmt::Write as _;
use std::path::Path;

use serde_json::{Value, json};

use super::recipe::{Operation, Recipe};
use crate::merge::Method;

/// The card's file name in a model folder.
pub const CARD_NAME: &str = "README.md";
/// The largest base card read for its front matter.
const MAX_CARD_BYTES: u64 = 1 << 20;
/// The license keys of a Hub card carried over from the base's.
const LICENSE_KEYS: [&str; 3] = ["license", "license_name", "license_link"];

/// A model card, and what went wrong reading the base's.
#[derive(Clone, Debug)]
pub struct Card {
    /// The README.md text.
    pub text: String,
    /// Warnings for the user (a base card that could not be read).
    pub warnings: Vec<String>,
}

/// The base's repository id: `_name_or_path` of its config.json when it names one, else the
/// name of the base folder (or file, without `.safetensors`).
fn base_model(base: &Path) -> String {
    let from_config = std::fs::read(base.join("config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v.get("_name_or_path")?.as_str().map(str::to_string))
        .filter(|s| !s.trim().is_empty());
    from_config.unwrap_or_else(|| {
        let name = base
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| base.display().to_string());
        name.strip_suffix(".safetensors")
            .map(str::to_string)
            .unwrap_or(name)
    })
}

/// The YAML front matter of a card (between a first line `---` and the next `---` line), if it
/// has one.
fn front_matter(text: &str) -> Option<&str> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let rest = text
        .strip_prefix("---\n")
        .or_else(|| text.strip_prefix("---\r\n"))?;
    let mut at = 0;
    for line in rest.split_inclusive('\n') {
        if line.trim_end() == "---" {
            return Some(&rest[..at]);
        }
        at += line.len();
    }
    None
}

/// The license keys of the base card at `path` with their values (a string or a list): none
/// where there is no card or it has no front matter, `Err(why)` where it cannot be read.
fn base_license(path: &Path) -> Result<Vec<(String, Value)>, String> {
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(Vec::new());
    };
    if meta.len() > MAX_CARD_BYTES {
        return Err(format!("larger than {MAX_CARD_BYTES} bytes"));
    }
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    let text = String::from_utf8(bytes).map_err(|_| "not UTF-8".to_string())?;
    let Some(yaml) = front_matter(&text) else {
        if text.starts_with("---") {
            return Err("its front matter does not end with a `---` line".into());
        }
        return Ok(Vec::new());
    };
    // A loader expands each alias by copying its anchor, so a few nested ones in a small card
    // (a "billion laughs") would take all memory; a card's front matter has no use for them.
    let options = serde_saphyr::options! {
        budget: serde_saphyr::budget! { max_aliases: 0 },
    };
    let front: Value = serde_saphyr::from_str_with_options(yaml, options).map_err(|e| {
        let why = e.without_snippet().to_string();
        format!(
            "its front matter is not YAML without aliases: {}",
            why.trim_start_matches("error: ")
        )
    })?;
    let map = match front {
        Value::Null => return Ok(Vec::new()),
        Value::Object(map) => map,
        _ => return Err("its front matter is not a YAML mapping".into()),
    };
    Ok(LICENSE_KEYS
        .iter()
        .filter_map(|k| {
            let v = map.get(*k)?;
            matches!(v, Value::String(_) | Value::Array(_)).then(|| (k.to_string(), v.clone()))
        })
        .collect())
}

/// The card of the output of `recipe`. `base` is the base checkpoint as given (a folder, or a
/// file whose folder holds no card).
pub fn render(recipe: &Recipe, base: &Path) -> Card {
    let mut warnings = Vec::new();
    let base_dir = base.is_dir().then_some(base);
    let license = match base_dir.map(|d| base_license(&d.join(CARD_NAME))) {
        Some(Err(why)) => {
            warnings.push(format!(
                "{}: cannot read the base's model card ({why}); writing a fresh card without its license",
                base.join(CARD_NAME).display()
            ));
            Vec::new()
        }
        Some(Ok(l)) => l,
        None => Vec::new(),
    };
    let base_model = base_model(base);
    let merge = recipe.operation == Operation::Merge;
    let mut front = vec![
        ("base_model".to_string(), json!(base_model)),
        (
            "base_model_relation".to_string(),
            json!(if merge { "merge" } else { "finetune" }),
        ),
        (
            "tags".to_string(),
            if merge {
                json!(["sotu-delta", "merge"])
            } else {
                json!(["sotu-delta"])
            },
        ),
    ];
    if base_dir.is_some_and(|d| d.join("config.json").is_file()) {
        front.push(("library_name".to_string(), json!("transformers")));
    }
    front.extend(license);
    let mut text = String::from("---\n");
    for (key, value) in front {
        let _ = writeln!(text, "{key}: {value}");
    }
    text.push_str("---\n\n");
    body(&mut text, recipe, &base_model);
    Card { text, warnings }
}

/// The card's body: what went in, how, and how to make it again.
fn body(s: &mut String, r: &Recipe, base_model: &str) {
    let p = &r.parameters;
    let n = r.deltas.len();
    let _ = match r.operation {
        Operation::Merge => writeln!(
            s,
            "# {base_model}, merged with {n} task deltas\n\nThis model is `{base_model}` with {n} sparse task deltas added by [sotu-delta](https://arxiv.org/abs/2411.02813) (SoTU: each delta keeps a seeded random fraction of a fine-tune's changes; deltas in disjoint slots of one seed never touch the same element)."
        ),
        Operation::Apply => writeln!(
            s,
            "# {base_model}, fine-tuned\n\nThis model is a fine-tune of `{base_model}`, rebuilt by [sotu-delta](https://arxiv.org/abs/2411.02813) from the base and one sparse task delta."
        ),
    };
    let _ = writeln!(s, "\n## Inputs\n");
    let _ = writeln!(
        s,
        "| input | seed | density | slot | weight | fingerprint |\n| --- | --- | --- | --- | --- | --- |"
    );
    let _ = writeln!(
        s,
        "| base `{}` | | | | | `{}` |",
        r.base.path, r.base.fingerprint
    );
    for d in &r.deltas {
        let _ = writeln!(
            s,
            "| {} `{}` | {} | {:.6} | {} | {} | `{}` |",
            // A fine-tune's delta was taken as the merge read it (docs/FORMAT.md section 14).
            d.kind.as_deref().unwrap_or("delta"),
            d.input.path,
            d.seed,
            d.density,
            d.slot.as_deref().unwrap_or(""),
            d.weight,
            d.input.fingerprint
        );
    }
    let _ = writeln!(
        s,
        "\nThe deltas were taken against the base fingerprint {} (BLAKE3 of the BLAKE3 of every base tensor, in name order); this base's is `{}`.",
        distinct(r.deltas.iter().map(|d| d.base_fingerprint.as_str())),
        r.base.fingerprint
    );
    let _ = writeln!(s, "\n## Method\n");
    let method = match p.method {
        Method::Sum => format!(
            "`sum`: base + Σ weight × {}(kept values − base), in f64, rounded once",
            if p.rescale { "1/density × " } else { "" }
        ),
        Method::Ties => format!(
            "`ties` on each delta's unbiased estimate: trim {}, alpha {}",
            p.trim, p.alpha
        ),
        Method::Iso => format!("`iso` (Iso-C) on the summed estimates: alpha {}", p.alpha),
        Method::Tsv => format!("`tsv` (TSV-M) on the estimates: alpha {}", p.alpha),
    };
    let _ = writeln!(s, "- method: {method}");
    let weights: Vec<String> = p.weights.iter().map(|w| w.to_string()).collect();
    let _ = writeln!(s, "- weights: {}", weights.join(", "));
    let _ = writeln!(s, "- rescale by 1/density: {}", p.rescale);
    let _ = writeln!(
        s,
        "- output dtype: {}",
        p.dtype.as_deref().unwrap_or("the base's")
    );
    if p.force {
        let _ = writeln!(s, "- forced onto a base other than the deltas' (`--force`)");
    }
    let _ = writeln!(s, "\n## Reproduce\n");
    let _ = writeln!(
        s,
        "Made by {} with:\n\n```sh\n{}\n```\n\n`sotu-delta.json` beside this card records the inputs with their fingerprints and every parameter: `sotu-delta merge --recipe sotu-delta.json -o OUT` makes the same tensors again, and refuses inputs that changed.",
        r.tool,
        shell_words(&r.command)
    );
}

/// The distinct values of `it`, as `a` or `a, b`.
fn distinct<'a>(it: impl Iterator<Item = &'a str>) -> String {
    let mut v: Vec<&str> = it.collect();
    v.sort_unstable();
    v.dedup();
    v.iter()
        .map(|x| format!("`{x}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A command line as a shell would take it back: words with shell syntax in single quotes.
pub fn shell_words(words: &[String]) -> String {
    words
        .iter()
        .map(|w| {
            let plain = !w.is_empty()
                && w.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,@%+".contains(&b));
            if plain {
                w.clone()
            } else {
                format!("'{}'", w.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn front_matter_is_found_between_dash_lines() {
        assert_eq!(front_matter("---\na: 1\n---\nbody"), Some("a: 1\n"));
        assert_eq!(front_matter("---\r\na: 1\r\n---\r\nbody"), Some("a: 1\r\n"));
        assert_eq!(front_matter("---\na: 1\n"), None);
        assert_eq!(front_matter("# title\n---\n"), None);
        assert_eq!(front_matter("---\n---\n"), Some(""));
    }

    #[test]
    fn shell_words_quote_what_a_shell_would_split() {
        let w = |v: &[&str]| shell_words(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(w(&["merge", "-o", "out/x.st"]), "merge -o out/x.st");
        assert_eq!(w(&["a b", "it's", ""]), r"'a b' 'it'\''s' ''");
    }
}
