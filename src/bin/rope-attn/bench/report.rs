//! One row per (case, implementation) measured: the CSV, and the aligned tables printed last.

use std::fmt::Write as _;

/// One measurement.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Row {
    /// `ceiling`, `prefill`, `decode`, `rope`, `cpu`.
    pub section: &'static str,
    /// The case id (`bf16-d128-b1-n2048-causal`).
    pub case: String,
    /// What ran (`ours_fused`, `torch_sdpa_flash`, `dtod_copy`, ...).
    pub implementation: String,
    /// Position encoding it computes: `rope+alibi`, `alibi`, `rope`, `none`.
    pub pe: &'static str,
    pub dtype: String,
    pub head_dim: usize,
    pub batch: usize,
    /// Sequence length (prefill), context (decode), tokens (rope), elements (CPU).
    pub seq: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub causal: Option<bool>,
    /// Launcher path (`Fused`, `PreRotated`, `Plain`), decode splits, or a note on the layout.
    pub path: String,
    pub ms_median: f64,
    pub ms_min: f64,
    pub tflops: Option<f64>,
    pub gbps: Option<f64>,
    /// Percent of the card's datasheet peak (TFLOP/s for prefill, GB/s otherwise).
    pub pct_peak: Option<f64>,
    pub ratio: Option<f64>,
    /// What `ratio` divides (`t(this)/t(ours_auto)`, `GB/s / copy GB/s`).
    pub ratio_of: &'static str,
    pub note: String,
}

const HEADER: &str = "section,case,impl,pe,dtype,head_dim,batch,seq,q_heads,kv_heads,causal,path,ms_median,ms_min,tflops,gbps,pct_peak,ratio,ratio_of,note";

fn field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// `digits` decimals; empty if missing.
fn opt(x: Option<f64>, digits: usize) -> String {
    x.filter(|v| v.is_finite()).map_or_else(String::new, |v| format!("{v:.digits$}"))
}

/// TFLOP/s: two decimals, or four significant digits under 1 (the CPU reference's rates).
fn opt_tflops(x: Option<f64>) -> String {
    match x.filter(|v| v.is_finite()) {
        Some(v) if v != 0.0 && v.abs() < 1.0 => format!("{v:.3e}"),
        v => opt(v, 2),
    }
}

/// The CSV text (header line first). Lines starting with `#` carry the run's metadata.
pub fn csv(meta: &[(String, String)], rows: &[Row]) -> String {
    let mut s = String::new();
    for (k, v) in meta {
        writeln!(s, "# {k}: {}", v.replace('\n', " ")).unwrap();
    }
    s.push_str(HEADER);
    s.push('\n');
    for r in rows {
        let causal = r.causal.map_or(String::new(), |c| c.to_string());
        let cells = [
            field(r.section),
            field(&r.case),
            field(&r.implementation),
            field(r.pe),
            field(&r.dtype),
            r.head_dim.to_string(),
            r.batch.to_string(),
            r.seq.to_string(),
            r.q_heads.to_string(),
            r.kv_heads.to_string(),
            causal,
            field(&r.path),
            format!("{:.6}", r.ms_median),
            format!("{:.6}", r.ms_min),
            opt_tflops(r.tflops),
            opt(r.gbps, 1),
            opt(r.pct_peak, 1),
            opt(r.ratio, 3),
            field(r.ratio_of),
            field(&r.note),
        ];
        s.push_str(&cells.join(","));
        s.push('\n');
    }
    s
}

/// A right-aligned text table (first column left-aligned).
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| -> String {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i == 0 {
                write!(s, "{c:<w$}").unwrap();
            } else {
                write!(s, "  {c:>w$}").unwrap();
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(header.to_vec());
    out += &line(widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>().iter().map(String::as_str).collect());
    for r in rows {
        out += &line(r.iter().map(String::as_str).collect());
    }
    out
}

/// `1.234` → "1.23×", None → "—".
pub fn times(x: Option<f64>) -> String {
    x.filter(|v| v.is_finite()).map_or_else(|| "—".into(), |v| format!("{v:.2}×"))
}

/// A number with `digits` decimals, or "—".
pub fn num(x: Option<f64>, digits: usize) -> String {
    x.filter(|v| v.is_finite()).map_or_else(|| "—".into(), |v| format!("{v:.digits$}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_and_leaves_missing_numbers_empty() {
        let r = Row {
            section: "prefill",
            case: "bf16-d128-b1-n512-causal".into(),
            implementation: "torch_sdpa_flash".into(),
            note: "k,v expanded to 32 heads, \"no gqa\"".into(),
            ms_median: 0.5,
            ms_min: 0.25,
            tflops: Some(123.456),
            ratio: Some(f64::NAN),
            causal: Some(true),
            ..Row::default()
        };
        let text = csv(&[("device".into(), "NVIDIA H100\n80GB".into())], &[r]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "# device: NVIDIA H100 80GB");
        assert_eq!(lines[1], HEADER);
        assert!(lines[2].starts_with("prefill,bf16-d128-b1-n512-causal,torch_sdpa_flash,,"));
        assert!(lines[2].contains(",true,,0.500000,0.250000,123.46,,,,,"), "{}", lines[2]);
        assert!(lines[2].ends_with(",\"k,v expanded to 32 heads, \"\"no gqa\"\"\""));
        assert_eq!(lines[2].matches(',').count() - 2, HEADER.matches(',').count());
        // two inside the quoted note
    }

    #[test]
    fn tables_align() {
        let t = table(&["case", "ms"], &[vec!["a".into(), "1.5".into()], vec!["longer".into(), "10.25".into()]]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "case       ms");
        assert_eq!(lines[2], "a         1.5");
        assert_eq!(lines[3], "longer  10.25");
        assert_eq!((times(Some(1.234)), times(None), num(Some(2.0), 1)), ("1.23×".into(), "—".into(), "2.0".into()));
    }
}
