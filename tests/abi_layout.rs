//! The kernels take their parameters as one struct by value; the Rust mirrors in
//! src/cuda/params.rs must match the CUDA layout byte for byte. build.rs compiles and runs
//! kernels/abi/layout_probe.cu with nvcc (host code, no GPU needed) and records what the CUDA
//! compiler laid out; this test compares every size and field offset with the Rust side.

use std::collections::HashMap;

fn cuda_layout() -> HashMap<String, usize> {
    let text = std::fs::read_to_string(env!("ROPE_ATTN_ABI_LAYOUT")).expect("build.rs writes the layout file");
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

#[test]
fn every_params_struct_matches_its_cuda_twin() {
    let cuda = cuda_layout();
    assert!(cuda.len() > 100, "the probe reported only {} entries: did it run?", cuda.len());
    let rust = rope_attn::cuda::abi_layout();
    assert_eq!(rust.len(), cuda.len(), "the Rust side lists a different set of fields than the probe");
    let mut bad = Vec::new();
    for (name, size) in &rust {
        match cuda.get(name) {
            Some(c) if c == size => {}
            other => bad.push(format!("{name}: rust {size}, cuda {other:?}")),
        }
    }
    assert!(bad.is_empty(), "layout mismatches:\n{}", bad.join("\n"));
}
