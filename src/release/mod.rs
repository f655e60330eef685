//! What makes a merged or applied model folder ready to upload, beside its weights: the model
//! card ([`card`], `README.md`, replacing the base's) and the recipe ([`recipe`],
//! `sotu-delta.json`) that makes the same tensors again.

pub mod card;
pub mod recipe;

use std::path::Path;

pub use card::{CARD_NAME, Card, render};
pub use recipe::{Operation, RECIPE_NAME, Recipe};

/// The files a folder output of `recipe` gets beside its weights, (name, bytes), and the
/// warnings of reading the base's card. `base` is the base as given.
pub fn folder_files(recipe: &Recipe, base: &Path) -> (Vec<(String, Vec<u8>)>, Vec<String>) {
    let card = render(recipe, base);
    (
        vec![
            (CARD_NAME.to_string(), card.text.into_bytes()),
            (RECIPE_NAME.to_string(), recipe.to_bytes()),
        ],
        card.warnings,
    )
}
