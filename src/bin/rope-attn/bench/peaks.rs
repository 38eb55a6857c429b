//! Datasheet peaks of common cards (dense 16-bit tensor-core rate with f32 accumulation, and
//! memory bandwidth), matched on the name the driver reports. Leads, not ceilings: the runner
//! also measures a device-to-device copy (and, through torch, a matrix product) in the same run.

/// One card's datasheet numbers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Peak {
    /// The card, as the table names it.
    pub card: &'static str,
    /// Dense bf16/f16 tensor-core TFLOP/s with f32 accumulation (no sparsity).
    pub tflops: f64,
    /// Memory bandwidth, GB/s.
    pub gbps: f64,
}

/// (tokens that must all appear in the device name, its peaks); the first match wins, so the
/// more specific variants come first.
const PEAKS: &[(&[&str], Peak)] = &[
    (&["h200", "nvl"], Peak { card: "H200 NVL", tflops: 835.0, gbps: 4800.0 }),
    (&["h200"], Peak { card: "H200 SXM", tflops: 989.0, gbps: 4800.0 }),
    (&["h100", "pcie"], Peak { card: "H100 PCIe", tflops: 756.0, gbps: 2000.0 }),
    (&["h100", "nvl"], Peak { card: "H100 NVL", tflops: 835.0, gbps: 3900.0 }),
    (&["h100"], Peak { card: "H100 SXM", tflops: 989.0, gbps: 3350.0 }),
    (&["a100", "80gb", "pcie"], Peak { card: "A100 80GB PCIe", tflops: 312.0, gbps: 1935.0 }),
    (&["a100", "80gb"], Peak { card: "A100 80GB SXM", tflops: 312.0, gbps: 2039.0 }),
    (&["a100"], Peak { card: "A100 40GB", tflops: 312.0, gbps: 1555.0 }),
    (&["l40s"], Peak { card: "L40S", tflops: 362.0, gbps: 864.0 }),
    (&["l4"], Peak { card: "L4", tflops: 121.0, gbps: 300.0 }),
    (&["a10"], Peak { card: "A10", tflops: 125.0, gbps: 600.0 }),
    (&["rtx", "4090"], Peak { card: "RTX 4090", tflops: 165.0, gbps: 1008.0 }),
    (&["rtx", "3090"], Peak { card: "RTX 3090", tflops: 71.0, gbps: 936.0 }),
];

/// The peaks of the card named `device` (as `Gpu::describe` or the driver reports it), if known.
pub fn lookup(device: &str) -> Option<Peak> {
    let lower = device.to_ascii_lowercase();
    let tokens: Vec<&str> = lower.split(|c: char| !c.is_ascii_alphanumeric()).filter(|t| !t.is_empty()).collect();
    PEAKS.iter().find(|(need, _)| need.iter().all(|n| tokens.contains(n))).map(|(_, p)| *p)
}

/// "H100 SXM: 989 TFLOP/s dense bf16, 3350 GB/s (datasheet)" or "unknown peak".
pub fn describe(peak: Option<Peak>) -> String {
    match peak {
        Some(p) => format!("{}: {:.0} TFLOP/s dense 16-bit, {:.0} GB/s (datasheet)", p.card, p.tflops, p.gbps),
        None => "unknown peak (card not in the table; pass --peak-tflops / --peak-gbps)".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_names_match_the_right_variant() {
        let card = |n: &str| lookup(n).map(|p| p.card);
        assert_eq!(card("NVIDIA H100 80GB HBM3 (sm_90)"), Some("H100 SXM"));
        assert_eq!(card("NVIDIA H100 PCIe"), Some("H100 PCIe"));
        assert_eq!(card("NVIDIA H100 NVL"), Some("H100 NVL"));
        assert_eq!(card("NVIDIA H200"), Some("H200 SXM"));
        assert_eq!(card("NVIDIA A100-SXM4-80GB"), Some("A100 80GB SXM"));
        assert_eq!(card("NVIDIA A100 80GB PCIe"), Some("A100 80GB PCIe"));
        assert_eq!(card("NVIDIA A100-PCIE-40GB"), Some("A100 40GB"));
        assert_eq!(card("NVIDIA L4"), Some("L4"));
        assert_eq!(card("NVIDIA L40S"), Some("L40S"));
        assert_eq!(card("NVIDIA A10"), Some("A10"));
        assert_eq!(card("NVIDIA GeForce RTX 4090 (sm_89)"), Some("RTX 4090"));
        assert_eq!(card("NVIDIA L40"), None);
        assert_eq!(card("NVIDIA A10G"), None);
        assert_eq!(card("Tesla T4"), None);
        assert!(describe(None).contains("unknown peak"));
        assert!(describe(lookup("NVIDIA H100 80GB HBM3")).contains("989 TFLOP/s"));
    }
}
