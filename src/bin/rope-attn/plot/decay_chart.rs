//! The decay chart: `Σ_i cos(rel·θ_i) / (r/2)` against log-distance, one curve per schedule.

use super::figure::{fail, fmt_tokens, titled, Figure, PALETTE};
use super::font::FAMILY;
use plotters::coord::Shift;
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use rope_attn::RopeSchedule;

/// One curve: its legend label and schedule.
pub struct Curve {
    pub label: String,
    pub schedule: RopeSchedule,
}

/// A vertical dashed reference line (e.g. the original context length).
pub struct Marker {
    pub at: f64,
    pub label: String,
}

pub struct DecayChart {
    pub title: String,
    pub subtitle: String,
    pub curves: Vec<Curve>,
    pub markers: Vec<Marker>,
    /// Log-spaced distances from 1 to `max_distance`.
    pub points: usize,
    pub max_distance: f64,
}

impl DecayChart {
    fn distances(&self) -> Vec<f64> {
        let n = self.points.max(2);
        let top = self.max_distance.log10();
        (0..n).map(|k| 10f64.powf(top * k as f64 / (n - 1) as f64)).collect()
    }

    /// `(distance, mean cos)` per curve.
    fn series(&self) -> Vec<Vec<(f64, f64)>> {
        let x = self.distances();
        self.curves
            .iter()
            .map(|c| {
                let pairs = c.schedule.inv_freq.len() as f64;
                x.iter().zip(c.schedule.decay(&x)).map(|(&d, s)| (d, s / pairs)).collect()
            })
            .collect()
    }
}

impl Figure for DecayChart {
    fn size(&self) -> (u32, u32) {
        (1400, 820)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), String> {
        let area = titled(root, &self.title, &self.subtitle)?;
        let series = self.series();
        let lowest = series.iter().flatten().map(|p| p.1).fold(0.0f64, f64::min);
        let (y0, y1) = ((lowest - 0.05).min(-0.1), 1.05);
        let mut chart = ChartBuilder::on(&area)
            .margin(20)
            .margin_right(40)
            .x_label_area_size(60)
            .y_label_area_size(80)
            .build_cartesian_2d((1f64..self.max_distance).log_scale(), y0..y1)
            .map_err(fail)?;
        chart
            .configure_mesh()
            .x_desc("relative distance rel = i − j (tokens, log scale)")
            .y_desc("Σ_i cos(rel·θ_i) / (r/2)")
            .x_label_formatter(&|x| fmt_tokens(*x))
            .y_label_formatter(&|y| if y.abs() < 1e-9 { "0.0".into() } else { format!("{y:.1}") })
            .label_style((FAMILY, 17))
            .axis_desc_style((FAMILY, 19))
            .light_line_style(RGBColor(238, 238, 238))
            .bold_line_style(RGBColor(215, 215, 215))
            .draw()
            .map_err(fail)?;
        chart
            .draw_series(LineSeries::new([(1.0, 0.0), (self.max_distance, 0.0)], BLACK.stroke_width(1)))
            .map_err(fail)?;
        for m in &self.markers {
            let style = RGBColor(90, 90, 90).stroke_width(2);
            chart
                .draw_series(DashedLineSeries::new([(m.at, y0), (m.at, y1)], 8, 6, style))
                .map_err(fail)?
                .label(&m.label)
                .legend(move |(x, y)| DashedPathElement::new([(x, y), (x + 24, y)], 5, 3, style));
        }
        for (k, (c, pts)) in self.curves.iter().zip(&series).enumerate() {
            let style = PALETTE[k % PALETTE.len()].stroke_width(2);
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), style))
                .map_err(fail)?
                .label(&c.label)
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 24, y)], style.stroke_width(4)));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .margin(12)
            .legend_area_size(34)
            .label_font((FAMILY, 17))
            .background_style(WHITE.mix(0.92))
            .border_style(RGBColor(160, 160, 160))
            .draw()
            .map_err(fail)
    }
}
