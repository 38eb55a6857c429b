//! What every chart shares: writing one figure as both SVG and PNG, colours, number labels.

use super::font::FAMILY;
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::{Path, PathBuf};

/// A figure that can draw itself on any plotters backend.
pub trait Figure {
    /// Pixel size of the whole figure.
    fn size(&self) -> (u32, u32);
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), String>;
}

/// Turn a plotters error into the CLI's message.
pub fn fail<E: std::fmt::Display>(e: E) -> String {
    format!("drawing failed: {e}")
}

/// Write `fig` to `dir/<name>.svg` and `dir/<name>.png` (`name` may hold dots); returns both paths.
pub fn write_svg_png(fig: &impl Figure, dir: &Path, name: &str) -> Result<[PathBuf; 2], String> {
    let svg = dir.join(format!("{name}.svg"));
    let png = dir.join(format!("{name}.png"));
    {
        let root = SVGBackend::new(&svg, fig.size()).into_drawing_area();
        root.fill(&WHITE).map_err(fail)?;
        fig.draw(&root)?;
        root.present().map_err(|e| format!("{}: {}", svg.display(), fail(e)))?;
    }
    fix_embedded_png_mime(&svg)?;
    {
        let root = BitMapBackend::new(&png, fig.size()).into_drawing_area();
        root.fill(&WHITE).map_err(fail)?;
        fig.draw(&root)?;
        root.present().map_err(|e| format!("{}: {}", png.display(), fail(e)))?;
    }
    Ok([svg, png])
}

/// plotters-svg 0.3.7 embeds bitmaps as `data:png;base64,...`; the media type is `image/png`,
/// and strict viewers refuse anything else.
fn fix_embedded_png_mime(svg: &Path) -> Result<(), String> {
    let io = |e: std::io::Error| format!("{}: {e}", svg.display());
    let text = std::fs::read_to_string(svg).map_err(io)?;
    if text.contains("\"data:png;base64,") {
        std::fs::write(svg, text.replace("\"data:png;base64,", "\"data:image/png;base64,")).map_err(io)?;
    }
    Ok(())
}

/// Title (large) and subtitle (smaller, grey) on top of `root`; returns the area below them.
pub fn titled<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    subtitle: &str,
) -> Result<DrawingArea<DB, Shift>, String> {
    let area = root.titled(title, (FAMILY, 26)).map_err(fail)?;
    area.titled(subtitle, (FAMILY, 17).into_font().color(&RGBColor(85, 85, 85))).map_err(fail)
}

/// Tableau 10: distinct, colour-blind-friendlier line colours.
pub const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// Token counts as people say them: 1, 10, 100, 1k, 10k, 100k, 1M (and 8192 stays 8192).
pub fn fmt_tokens(x: f64) -> String {
    let r = x.round();
    if (x - r).abs() > 1e-6 * x.abs().max(1.0) {
        return format!("{x:.1}");
    }
    let n = r as i64;
    match n {
        n if n != 0 && n % 1_000_000 == 0 => format!("{}M", n / 1_000_000),
        n if n != 0 && n % 1000 == 0 => format!("{}k", n / 1000),
        n => n.to_string(),
    }
}

/// A score label with as many decimals as its range needs.
pub fn fmt_value(v: f64, span: f64) -> String {
    match span {
        s if s >= 10.0 => format!("{v:.0}"),
        s if s >= 1.0 => format!("{v:.1}"),
        s if s >= 0.1 => format!("{v:.2}"),
        _ => format!("{v:.3}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_labels() {
        assert_eq!(fmt_tokens(1.0), "1");
        assert_eq!(fmt_tokens(8192.0), "8192");
        assert_eq!(fmt_tokens(10000.0), "10k");
        assert_eq!(fmt_tokens(1e6), "1M");
        assert_eq!(fmt_tokens(0.0), "0");
    }
}
