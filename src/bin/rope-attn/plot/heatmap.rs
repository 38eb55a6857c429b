//! Heatmaps of position-only score matrices: one panel per encoding, each with its colour bar.
//! The cells go in as one bitmap (an embedded PNG in the SVG), not one rectangle per cell.

use super::figure::{fail, fmt_tokens, fmt_value, titled, Figure};
use super::font::FAMILY;
use plotters::coord::Shift;
use plotters::prelude::*;

/// One panel: caption and an `n × n` row-major matrix (query rows, key columns; `-inf` = masked).
pub struct Panel {
    pub caption: String,
    pub values: Vec<f64>,
}

pub struct Heatmaps {
    pub title: String,
    pub subtitle: String,
    /// Positions span `0 .. window` tokens on both axes.
    pub window: usize,
    /// Sampled positions per axis.
    pub n: usize,
    pub panels: Vec<Panel>,
}

const MASKED: RGBColor = RGBColor(228, 228, 228);
const LABEL_AREA: u32 = 50;

fn range(values: &[f64]) -> (f64, f64) {
    let finite = values.iter().copied().filter(|v| v.is_finite());
    let (lo, hi) = finite.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
    if lo >= hi {
        let c = if lo.is_finite() { lo } else { 0.0 };
        return (c - 0.5, c + 0.5);
    }
    (lo, hi)
}

fn color(v: f64, lo: f64, hi: f64) -> RGBColor {
    if !v.is_finite() {
        return MASKED;
    }
    ViridisRGB::get_color_normalized(v, lo, hi)
}

/// An RGB buffer of `w × h` pixels showing the `n × n` matrix, nearest-cell sampling.
fn cells_bitmap(values: &[f64], n: usize, (w, h): (u32, u32), (lo, hi): (f64, f64)) -> Vec<u8> {
    let mut buf = Vec::with_capacity((w * h * 3) as usize);
    for py in 0..h as usize {
        let row = py * n / h as usize;
        for px in 0..w as usize {
            let RGBColor(r, g, b) = color(values[row * n + px * n / w as usize], lo, hi);
            buf.extend([r, g, b]);
        }
    }
    buf
}

fn draw_panel<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, hm: &Heatmaps, p: &Panel) -> Result<(), String> {
    let (lo, hi) = range(&p.values);
    let (width, _) = area.dim_in_pixel();
    let (heat, bar) = area.split_horizontally(width.saturating_sub(105));
    let win = hm.window as f64;
    let mut chart = ChartBuilder::on(&heat)
        .caption(&p.caption, (FAMILY, 19))
        .margin(10)
        .x_label_area_size(LABEL_AREA)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..win, win..0f64)
        .map_err(fail)?;
    chart
        .configure_mesh()
        .disable_mesh()
        .x_labels(6)
        .y_labels(6)
        .x_desc("key position j")
        .y_desc("query position i")
        .x_label_formatter(&|v| fmt_tokens(*v))
        .y_label_formatter(&|v| fmt_tokens(*v))
        .label_style((FAMILY, 15))
        .axis_desc_style((FAMILY, 16))
        .draw()
        .map_err(fail)?;
    let dim = chart.plotting_area().dim_in_pixel();
    let cells = BitMapElement::with_owned_buffer((0.0, 0.0), dim, cells_bitmap(&p.values, hm.n, dim, (lo, hi)));
    chart.draw_series(std::iter::once(cells.ok_or("heatmap bitmap size mismatch")?)).map_err(fail)?;

    let mut cb = ChartBuilder::on(&bar)
        .caption("score", (FAMILY, 19))
        .margin(10)
        .margin_left(2)
        .x_label_area_size(LABEL_AREA)
        .set_label_area_size(LabelAreaPosition::Right, 62)
        .build_cartesian_2d(0f64..1f64, lo..hi)
        .map_err(fail)?;
    cb.configure_mesh()
        .disable_mesh()
        .disable_x_axis()
        .y_labels(7)
        // A tick mark right of the bar would read as a minus sign in front of the label.
        .set_tick_mark_size(LabelAreaPosition::Right, 0)
        .y_label_formatter(&|v| fmt_value(*v, hi - lo))
        .label_style((FAMILY, 14))
        .draw()
        .map_err(fail)?;
    let (bw, bh) = cb.plotting_area().dim_in_pixel();
    let mut grad = Vec::with_capacity((bw * bh * 3) as usize);
    for py in 0..bh {
        let v = hi - (hi - lo) * py as f64 / (bh.max(2) - 1) as f64;
        let RGBColor(r, g, b) = color(v, lo, hi);
        for _ in 0..bw {
            grad.extend([r, g, b]);
        }
    }
    let bar = BitMapElement::with_owned_buffer((0.0, hi), (bw, bh), grad).ok_or("colour bar size mismatch")?;
    cb.draw_series(std::iter::once(bar)).map_err(fail)?;
    Ok(())
}

impl Figure for Heatmaps {
    fn size(&self) -> (u32, u32) {
        (600 * self.panels.len() as u32, 690)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), String> {
        let area = titled(root, &self.title, &self.subtitle)?;
        for (a, p) in area.split_evenly((1, self.panels.len())).iter().zip(&self.panels) {
            draw_panel(a, self, p)?;
        }
        Ok(())
    }
}
