//! The one font every chart uses, embedded so that PNG text needs no fontconfig or freetype.

use plotters::style::{register_font, FontStyle};
use std::sync::Once;

/// DejaVu Sans 2.37 (Bitstream Vera license, see assets/fonts/LICENSE-DejaVu.txt).
static DEJAVU_SANS: &[u8] = include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/fonts/DejaVuSans.ttf"));

/// The family name charts ask for.
pub const FAMILY: &str = "sans-serif";

/// Register the embedded font under [`FAMILY`] (idempotent).
pub fn register() -> Result<(), String> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_font(FAMILY, FontStyle::Normal, DEJAVU_SANS)
            .map_err(|_| "the embedded font does not load".to_string());
    });
    result
}
