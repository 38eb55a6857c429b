//! Every kernel instantiation compiles without register spills, for both SASS targets; and every
//! kernel the launchers name exists. build.rs records `ptxas -v` for each .cu file.

fn report() -> Vec<(String, String, String, u32, u32, u32)> {
    let text = std::fs::read_to_string(env!("ROPE_ATTN_PTXAS_REPORT")).expect("build.rs writes the ptxas report");
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let n = |i: usize| f[i].parse::<u32>().unwrap();
            (f[0].to_string(), f[1].to_string(), f[2].to_string(), n(3), n(5), n(6))
        })
        .collect()
}

#[test]
fn no_kernel_spills_registers() {
    let rows = report();
    let spills: Vec<String> = rows
        .iter()
        .filter(|r| r.4 + r.5 > 0)
        .map(|r| format!("{} {} {}: {} B stores, {} B loads", r.0, r.1, r.2, r.4, r.5))
        .collect();
    assert!(spills.is_empty(), "register spills:\n{}", spills.join("\n"));
    for r in &rows {
        assert!(r.3 <= 255, "{} uses {} registers", r.2, r.3);
    }
    // decode_base_steps (src/cuda/decode.rs) counts at most three resident blocks of the
    // tensor-core decode kernel, which holds if every build takes more than 128 registers.
    for r in rows.iter().filter(|r| r.0 == "attention_decode_mma.cu") {
        assert!(r.3 > 128, "{} {} takes {} registers: four blocks could be resident", r.1, r.2, r.3);
    }
}

#[test]
fn every_launched_kernel_is_compiled_for_sm80_and_sm90() {
    let rows = report();
    let mut expected: Vec<String> = Vec::new();
    for dt in ["f32", "f16", "bf16"] {
        // Each rope variant twice: plain, and with the QK norm first (rope_norm_*).
        for norm in ["", "norm_"] {
            for layout in ["half", "inter"] {
                for v in [1, 2] {
                    expected.push(format!("rope_{norm}{layout}_v{v}_{dt}"));
                }
            }
            // The 16-byte variants (f32 interleaved: its v2 already is one).
            expected.push(format!("rope_{norm}half_v{}_{dt}", if dt == "f32" { 4 } else { 8 }));
            if dt != "f32" {
                expected.push(format!("rope_{norm}inter_v4_{dt}"));
            }
        }
        for k in ["scores", "paged_append", "merge", "combine_splits"] {
            expected.push(format!("{k}_{dt}"));
        }
        for d in rope_attn::cuda::SUPPORTED_HEAD_DIMS {
            expected.push(format!("attention_decode_d{d}_{dt}"));
        }
        // The 16-bit chunked decode at 256 runs on CUDA cores.
        if dt != "f32" {
            expected.push(format!("attention_decode_cores_d256_{dt}"));
        }
    }
    for dt in ["f16", "bf16"] {
        for &d in rope_attn::cuda::SUPPORTED_HEAD_DIMS {
            expected.push(format!("attention_fwd_d{d}_{dt}"));
            // Head dim 512 has the narrow kernel only (its 4 warps split the head).
            if d <= 256 {
                expected.push(format!("attention_fwd_wide_d{d}_{dt}"));
            }
        }
    }
    expected.push("attention_fwd_rows_f32".into());
    for name in &expected {
        for arch in ["sm_80", "sm_90"] {
            assert!(rows.iter().any(|r| &r.2 == name && r.1 == arch), "{name} missing for {arch}");
        }
    }
    assert_eq!(rows.len(), 2 * expected.len(), "unexpected extra instantiations: keep the count deliberate");
}
