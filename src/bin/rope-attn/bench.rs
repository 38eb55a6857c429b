//! `rope-attn bench`: the comparison runner. On a GPU: our fused RoPE+ALiBi prefill against the
//! unfused pipeline, our kernel without PE, torch's flash SDPA (and flash_attn when importable),
//! paged decode against the copy bandwidth, and the rope kernel against a copy of the same
//! bytes, all measured in the same run; a table and a CSV. Without a GPU: the plan, and the f64
//! CPU reference timed at tiny sizes.

pub mod cases;
mod cpu;
mod device;
mod gpu;
mod peaks;
mod report;
mod torch;

use crate::args::Spec;
use gpu::TorchMode;

pub const HELP: &str = "\
rope-attn bench — time the kernels against their baselines on this machine's GPU

USAGE:
    rope-attn bench [--quick] [--csv PATH] [--torch | --no-torch] [--only SECTIONS] [--cpu]

On a GPU (device 0), in one run:
  prefill  bf16 and f16, head_dim 64/128, batch×seq 1×{512, 2k, 8k, 32k} and 16×2k, causal and
           not, GQA 32/8: our prefill with RoPE (Llama 3.1) + ALiBi inside the kernel, fused and
           pre-rotated paths; the unfused pipeline (rope kernel in place, then attention with
           ALiBi only); our kernel without position encoding; torch's scaled_dot_product_attention
           on the flash backend (and cuDNN), flash_attn / FA3 when importable, and torch rotary +
           flash SDPA (benches/torch_sdpa.py; torch and flash_attn compute no PE)
  decode   paged cache (page 16, shuffled block table), context 1k/8k/32k/128k, batch 1/16/64:
           GB/s of K+V read, against a device-to-device copy measured in the same run, and the
           same kernel and cache without RoPE (what a pre-rotated cache would cost)
  chunked  paged prefill (a chunk of new queries at the end of a cached context: 2k at 8k and
           32k, 512 and 64 at 32k, 4×1k at 8k), RoPE + ALiBi, causal: fused (keys read through the
           block table and rotated per tile) against gathered (K rotated once and V gathered
           into a workspace, then the prefill kernel on contiguous keys)
  rope     the rope kernel in place against a device-to-device copy of the same bytes
Before timing, the kernels are checked against the f64 CPU reference and the fused, pre-rotated
and unfused outputs against each other. Timing: CUDA events after warm-up, median of rounds,
inputs rotated over several sets when they would fit in L2. Prints TFLOP/s (4·b·h·n²·d, halved
for causal), GB/s, % of the card's datasheet peak and ratios t(baseline)/t(ours).

Without a GPU: prints what it would run, then times the f64 CPU reference at tiny sizes (exit 0;
with ROPE_ATTN_REQUIRE_GPU=1 a missing GPU is an error, as in the test suite).

OPTIONS:
    --quick             a small subset (bf16, d128, a few shapes), fewer rounds
    --csv PATH          also write every measurement as CSV (metadata in leading # lines)
    --torch             run the torch baselines and fail if they cannot run
    --no-torch          skip them (default: run them when `python3 -c 'import torch'` works)
    --python EXE        the interpreter for benches/torch_sdpa.py (default: $ROPE_ATTN_PYTHON or python3)
    --only SECTIONS     comma-separated subset of prefill,decode,chunked,rope
    --peak-tflops X     the card's peak dense 16-bit TFLOP/s, when it is not in the built-in table
    --peak-gbps X       the card's peak memory GB/s, likewise
    --cpu               CPU mode even when a GPU is present
    -h, --help          this help
";

const SPEC: Spec = Spec {
    command: "bench",
    options: &["--csv", "--python", "--only", "--peak-tflops", "--peak-gbps"],
    flags: &["--quick", "--torch", "--no-torch", "--cpu"],
};

pub fn run(argv: &[String]) -> Result<(), String> {
    let args = SPEC.parse(argv)?;
    if args.help {
        print!("{HELP}");
        return Ok(());
    }
    if let Some(p) = args.positionals.first() {
        return Err(format!("bench takes no positional arguments, got `{p}` (see `rope-attn bench --help`)"));
    }
    if args.flag("--torch") && args.flag("--no-torch") {
        return Err("--torch and --no-torch contradict each other".into());
    }
    let quick = args.flag("--quick");
    let mut plan = cases::plan(quick);
    if let Some(only) = args.value("--only") {
        let list: Vec<String> = only.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
        if let Some(bad) = list.iter().find(|s| !cases::SECTIONS.contains(&s.as_str())) {
            return Err(format!("--only: unknown section `{bad}` (sections: {})", cases::SECTIONS.join(",")));
        }
        plan = plan.only(&list);
    }
    let opts = gpu::Opts {
        quick,
        torch: if args.flag("--torch") {
            TorchMode::Force
        } else if args.flag("--no-torch") {
            TorchMode::Off
        } else {
            TorchMode::Auto
        },
        python: args
            .value("--python")
            .map(str::to_string)
            .or_else(|| std::env::var("ROPE_ATTN_PYTHON").ok())
            .unwrap_or_else(|| "python3".into()),
        peak_tflops: args.positive("--peak-tflops")?,
        peak_gbps: args.positive("--peak-gbps")?,
    };
    let csv_path = args.value("--csv");

    let status = rope_attn::cuda::device_status();
    if let Err(why) = &status {
        if std::env::var("ROPE_ATTN_REQUIRE_GPU").as_deref() == Ok("1") && !args.flag("--cpu") {
            return Err(format!("ROPE_ATTN_REQUIRE_GPU=1 but no GPU is usable: {why}"));
        }
    }
    match (&status, args.flag("--cpu")) {
        (Ok(_), false) => {
            println!(
                "rope-attn bench: running on the GPU ({} plan)\n{}",
                if quick { "quick" } else { "full" },
                plan.describe()
            );
            let out = gpu::run(&plan, &opts)?;
            println!("\nrun:");
            for (k, v) in &out.meta {
                println!("  {k:>22}: {v}");
            }
            print!("{}", out.summary);
            if let Some(path) = csv_path {
                write_csv(path, &out.meta, &out.rows)?;
            }
            if !out.failures.is_empty() {
                return Err(out.failures.join("; "));
            }
            Ok(())
        }
        (_, cpu_forced) => {
            match &status {
                Err(why) => println!("rope-attn bench: no GPU is present ({why})."),
                Ok(_) => debug_assert!(cpu_forced),
            }
            println!(
                "On a GPU machine this runs the {} plan (`rope-attn bench{}`):\n{}",
                if quick { "quick" } else { "full" },
                if quick { " --quick" } else { "" },
                plan.describe()
            );
            if opts.torch == TorchMode::Force {
                println!("(--torch: the torch baselines need the GPU too; nothing to compare against here)");
            }
            println!("\nTiming the f64 CPU reference instead (tiny sizes; CPU numbers, not the kernels'):");
            let rows = cpu::run(quick)?;
            print!("{}", cpu::table(&rows));
            if let Some(path) = csv_path {
                let meta = vec![
                    ("device".to_string(), format!("CPU: {}", cpu_model())),
                    ("note".to_string(), "no GPU: f64 CPU reference only".to_string()),
                ];
                write_csv(path, &meta, &rows)?;
            }
            Ok(())
        }
    }
}

fn write_csv(path: &str, meta: &[(String, String)], rows: &[report::Row]) -> Result<(), String> {
    std::fs::write(path, report::csv(meta, rows)).map_err(|e| format!("{path}: cannot write: {e}"))?;
    println!("\nwrote {} rows to {path}", rows.len());
    Ok(())
}

/// The CPU model from /proc/cpuinfo (Linux), else the architecture.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn cpu_mode_runs_end_to_end_and_writes_the_csv() {
        let path = std::env::temp_dir().join(format!("rope-attn-bench-{}.csv", std::process::id()));
        let p = path.to_str().unwrap();
        run(&argv(&["--cpu", "--quick", "--only", "rope", "--csv", p])).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).ok();
        assert!(text.lines().any(|l| l.starts_with("section,case,impl,")));
        for imp in ["reference::rotate", "reference::attention", "RopeConfig::from_hf_config_json"] {
            assert!(text.lines().any(|l| l.starts_with("cpu,") && l.contains(imp)), "{imp} missing:\n{text}");
        }
    }

    #[test]
    fn usage_errors_are_named() {
        assert!(run(&argv(&["--only", "prefil"])).unwrap_err().contains("prefil"));
        assert!(run(&argv(&["--torch", "--no-torch"])).unwrap_err().contains("contradict"));
        assert!(run(&argv(&["extra"])).unwrap_err().contains("positional"));
        assert!(run(&argv(&["--peak-tflops", "-1"])).unwrap_err().contains("--peak-tflops"));
    }
}
