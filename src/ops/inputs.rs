//! The inputs of a merge as a user states them: delta files, and fine-tunes whose deltas are
//! taken as they are read (docs/FORMAT.md section 14), each with the mask it is taken with.

use std::path::{Path, PathBuf};

use anyhow::Result;

use super::usage;
use crate::format::Delta;
use crate::io::{Checkpoint, IoMode};
use crate::mask::{DEFAULT_SEED, Interval};
use crate::merge::{FineTune, Input};
use crate::tuned::Tuned;

/// One input of a merge as stated: a delta file, or a fine-tune whose delta is taken as it is
/// read (`merge --tuned`, `apply` of a LoRA adapter; docs/FORMAT.md section 14).
#[derive(Clone, Debug)]
pub enum InputSpec {
    /// A delta file or folder.
    Delta(PathBuf),
    /// A fine-tune (a checkpoint, or a PEFT LoRA adapter folder) and the mask its delta is
    /// taken with.
    Tuned {
        /// The fine-tune.
        path: PathBuf,
        /// Mask seed.
        seed: u64,
        /// Keep interval.
        interval: Interval,
        /// `K/N` when masked with a slot, for the record.
        slot: Option<String>,
        /// Merge NaN and infinite values (extract's `--allow-nonfinite`).
        allow_nonfinite: bool,
    },
}

impl InputSpec {
    /// What `apply` takes: a delta, or a PEFT LoRA adapter folder, applied as the fine-tune it
    /// stands for (docs/LORA.md).
    pub fn applied(path: &Path) -> InputSpec {
        match crate::tuned::lora::is_adapter(path) {
            true => InputSpec::fine_tune(path),
            false => InputSpec::Delta(path.to_path_buf()),
        }
    }

    /// A fine-tune taken whole (density 1, the default seed): what `apply` of an adapter
    /// rebuilds.
    pub fn fine_tune(path: &Path) -> InputSpec {
        InputSpec::Tuned {
            path: path.to_path_buf(),
            seed: DEFAULT_SEED,
            interval: Interval::from_density(1.0).expect("density 1 is valid"),
            slot: None,
            allow_nonfinite: false,
        }
    }

    /// The path given.
    pub fn path(&self) -> &Path {
        match self {
            InputSpec::Delta(p) | InputSpec::Tuned { path: p, .. } => p,
        }
    }

    /// Opens the input over `base`.
    pub(super) fn open<'b>(&self, base: &'b Checkpoint, io: IoMode) -> Result<Input<'b>> {
        Ok(match self {
            InputSpec::Delta(p) => Input::Delta(Delta::open_with(p, io)?),
            InputSpec::Tuned {
                path,
                seed,
                interval,
                slot,
                allow_nonfinite,
            } => {
                let tuned = Tuned::open(path, base, io)?;
                // The own files extract would store (a fine-tune folder's), for --files-from.
                let own_files = crate::extract::files::own_files(base, tuned.checkpoint())?;
                Input::Tuned(FineTune::new(
                    base,
                    tuned,
                    *seed,
                    *interval,
                    slot.clone(),
                    *allow_nonfinite,
                    own_files,
                )?)
            }
        })
    }
}

/// The inputs given as `(path, density)`, in order: a delta file where the density is `None`,
/// else a fine-tune. Fine-tune t (counting the fine-tunes from 0) is masked with seed
/// `seed + t` at its density, or under `slots` with slot t/T of `seed` (a density below 1 then
/// narrowing the slot, as `extract --slot` does).
pub fn fine_tune_inputs(
    given: &[(PathBuf, Option<f64>)],
    seed: u64,
    slots: bool,
    allow_nonfinite: bool,
) -> Result<Vec<InputSpec>> {
    let count = given.iter().filter(|s| s.1.is_some()).count() as u64;
    let mut t = 0u64;
    let mut inputs = Vec::with_capacity(given.len());
    for (path, density) in given {
        let Some(density) = *density else {
            inputs.push(InputSpec::Delta(path.clone()));
            continue;
        };
        let (seed, interval, slot) = if slots {
            let narrow = (density != 1.0).then_some(density);
            let interval = Interval::from_slot(t, count, narrow)
                .map_err(|e| usage(format!("--slots: fine-tune {t} of {count}: {e}")))?;
            (seed, interval, Some(format!("{t}/{count}")))
        } else {
            let seed = seed.checked_add(t).ok_or_else(|| {
                usage(format!(
                    "--seed {seed}: fine-tune {t} would be masked with seed {seed} + {t}, past the largest seed"
                ))
            })?;
            let interval =
                Interval::from_density(density).map_err(|e| usage(format!("--density: {e}")))?;
            (seed, interval, None)
        };
        inputs.push(InputSpec::Tuned {
            path: path.clone(),
            seed,
            interval,
            slot,
            allow_nonfinite,
        });
        t += 1;
    }
    Ok(inputs)
}

/// How the fine-tunes among a merge's inputs are masked, as stated (`merge --density D --seed S
/// --slots --allow-nonfinite`, and the Python package's keyword arguments of those names): one
/// rule for them all, which [`fine_tune_inputs`] applies.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FineTuneMasks {
    /// `--density`: the fraction of each fine-tune's elements kept (1, or under `slots` its
    /// whole slot, when `None`).
    pub density: Option<f64>,
    /// `--seed` (`DEFAULT_SEED` when `None`).
    pub seed: Option<u64>,
    /// `--slots`: fine-tune t of T masked with slot t/T of one seed.
    pub slots: bool,
    /// `--allow-nonfinite`: merge fine-tunes that hold NaN or infinite values.
    pub allow_nonfinite: bool,
}

impl FineTuneMasks {
    /// The seed stated, or the default one.
    pub fn seed(&self) -> u64 {
        self.seed.unwrap_or(DEFAULT_SEED)
    }

    /// The command-line flags that state these masks (none for the defaults).
    pub(super) fn flags(&self) -> Vec<String> {
        let mut flags = Vec::new();
        if let Some(d) = self.density {
            flags.extend(["--density".to_string(), d.to_string()]);
        }
        if let Some(s) = self.seed {
            flags.extend(["--seed".to_string(), s.to_string()]);
        }
        if self.slots {
            flags.push("--slots".into());
        }
        if self.allow_nonfinite {
            flags.push("--allow-nonfinite".into());
        }
        flags
    }
}

/// The inputs of a merge listed as `(path, is_fine_tune)`, in the merge's order (the command
/// line's order of positional deltas among `--tuned`; the Python package's list): delta files,
/// and fine-tunes masked as `masks` says. Mask options without a fine-tune, and no input at
/// all, are usage errors.
pub fn listed_inputs(listed: &[(PathBuf, bool)], masks: &FineTuneMasks) -> Result<Vec<InputSpec>> {
    if !listed.iter().any(|(_, tuned)| *tuned) && *masks != FineTuneMasks::default() {
        return Err(usage(
            "--density, --seed, --slots and --allow-nonfinite say how --tuned fine-tunes are masked; give --tuned",
        ));
    }
    if listed.is_empty() {
        return Err(usage(
            "give at least one delta, or a fine-tune with --tuned",
        ));
    }
    let given: Vec<(PathBuf, Option<f64>)> = listed
        .iter()
        .map(|(path, tuned)| (path.clone(), tuned.then(|| masks.density.unwrap_or(1.0))))
        .collect();
    fine_tune_inputs(&given, masks.seed(), masks.slots, masks.allow_nonfinite)
}
