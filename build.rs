//! Compiles every `kernels/*.cu` with nvcc into a fatbin (SASS for sm_80 and sm_90, PTX for
//! compute_80) embedded in the library, and summarises `ptxas -v` (registers, spills).
//!
//! No GPU or driver is needed here: only nvcc. Found via `NVCC`, `CUDA_HOME`/`CUDA_PATH`,
//! `PATH`, or the PyPI wheel layout (`site-packages/nvidia/cu13/bin/nvcc`).

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const INSTALL_HINT: &str = "python3 -m venv .venv && .venv/bin/pip install \
nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85";

/// Real SASS for every 8.x card (sm_80 runs on 8.6/8.9) and Hopper; compute_80 PTX so newer
/// GPUs can JIT. Not newer PTX: drivers of the CUDA 13.0 generation refuse to JIT ISA > 9.0.
const GENCODE: [&str; 3] = [
    "arch=compute_80,code=sm_80",
    "arch=compute_90,code=sm_90",
    "arch=compute_80,code=compute_80",
];

fn is_file(p: &Path) -> bool {
    p.is_file()
}

fn pip_nvcc_candidates() -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = Vec::new();
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    for venv in [".venv", "venv"] {
        if let Ok(rd) = fs::read_dir(manifest.join(venv).join("lib")) {
            roots.extend(rd.flatten().map(|e| e.path().join("site-packages")));
        }
    }
    // The interpreter's own site-packages (a pip install without a venv).
    for py in ["python3", "python"] {
        let out = Command::new(py)
            .args(["-c", "import site,sys; print('\\n'.join(site.getsitepackages()+[site.getusersitepackages()]))"])
            .output();
        if let Ok(out) = out {
            roots.extend(String::from_utf8_lossy(&out.stdout).lines().map(PathBuf::from));
        }
    }
    roots.into_iter().map(|r| r.join("nvidia/cu13/bin/nvcc")).collect()
}

fn find_nvcc() -> Option<PathBuf> {
    if let Ok(p) = env::var("NVCC") {
        return Some(PathBuf::from(p));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(home) = env::var(var) {
            let p = Path::new(&home).join("bin/nvcc");
            if is_file(&p) {
                return Some(p);
            }
        }
    }
    if let Some(path) = env::var_os("PATH") {
        for dir in env::split_paths(&path) {
            let p = dir.join("nvcc");
            if is_file(&p) {
                return Some(p);
            }
        }
    }
    pip_nvcc_candidates().into_iter().find(|p| is_file(p))
}

/// One kernel's ptxas figures for one architecture.
struct PtxasEntry {
    arch: String,
    function: String,
    registers: u32,
    spill_stores: u32,
    spill_loads: u32,
    stack: u32,
}

fn number_before(line: &str, marker: &str) -> Option<u32> {
    let idx = line.find(marker)?;
    line[..idx].split_whitespace().last()?.parse().ok()
}

fn parse_ptxas(log: &str) -> Vec<PtxasEntry> {
    let mut out = Vec::new();
    let (mut arch, mut function) = (String::new(), String::new());
    let (mut stack, mut st, mut ld) = (0, 0, 0);
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let mut parts = rest.split("' for '");
            function = parts.next().unwrap_or("").to_string();
            arch = parts.next().unwrap_or("").trim_end_matches('\'').to_string();
        } else if line.contains("spill stores") {
            stack = number_before(line, "bytes stack frame").unwrap_or(0);
            st = number_before(line, "bytes spill stores").unwrap_or(0);
            ld = number_before(line, "bytes spill loads").unwrap_or(0);
        } else if line.contains("Used") && line.contains("registers") && !function.is_empty() {
            let registers = number_before(line, "registers").unwrap_or(0);
            out.push(PtxasEntry {
                arch: arch.clone(),
                function: std::mem::take(&mut function),
                registers,
                spill_stores: st,
                spill_loads: ld,
                stack,
            });
        }
    }
    out
}

fn compile(nvcc: &Path, src: &Path, out: &Path, include: &Path) -> Result<String, String> {
    let mut cmd = Command::new(nvcc);
    // --compress-mode=size: the fatbins shrink ~10x (the prefill's 42 kernel builds from 10 MB to
    // 1 MB, embedded in every binary that links the crate). Decompressing needs a CUDA 13 driver
    // (580+), which nvcc 13's SASS and PTX need anyway.
    cmd.arg("--fatbin")
        .args(["-O3", "-std=c++17", "-lineinfo", "--compress-mode=size", "-Xptxas", "-v"])
        .arg("-I")
        .arg(include);
    for g in GENCODE {
        cmd.args(["-gencode", g]);
    }
    cmd.arg("-o").arg(out).arg(src);
    let output = cmd.output().map_err(|e| format!("could not run {}: {e}", nvcc.display()))?;
    let log = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    if !output.status.success() {
        return Err(format!("nvcc failed on {}:\n{log}", src.display()));
    }
    Ok(log)
}

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    let kernels = manifest.join("kernels");
    println!("cargo:rerun-if-changed=kernels");
    for var in ["NVCC", "CUDA_HOME", "CUDA_PATH"] {
        println!("cargo:rerun-if-env-changed={var}");
    }

    let mut sources: Vec<PathBuf> = fs::read_dir(&kernels)
        .expect("kernels/ is missing")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    sources.sort();
    for entry in fs::read_dir(&kernels).unwrap().flatten() {
        println!("cargo:rerun-if-changed={}", entry.path().display());
    }

    let Some(nvcc) = find_nvcc() else {
        panic!(
            "\n\nrope-attn: nvcc not found (looked at $NVCC, $CUDA_HOME/bin, $CUDA_PATH/bin, $PATH and \
             the PyPI layout site-packages/nvidia/cu13/bin). No GPU is needed to build; install nvcc with:\n\n    \
             {INSTALL_HINT}\n\nthen build again (build.rs finds ./.venv by itself), or set NVCC=/path/to/nvcc.\n"
        );
    };

    // One thread per .cu file: the files compile independently (and the machines have 2 cores).
    // With the `emulator` feature the host compiler builds the same files alongside.
    let emulator = env::var_os("CARGO_FEATURE_EMULATOR").is_some();
    let (results, emu) = std::thread::scope(|s| {
        let handles: Vec<_> = sources
            .iter()
            .map(|src| {
                let stem = src.file_stem().unwrap().to_string_lossy().to_string();
                let out = out_dir.join(format!("{stem}.fatbin"));
                let (nvcc, kernels) = (&nvcc, &kernels);
                s.spawn(move || (out.clone(), compile(nvcc, src, &out, kernels)))
            })
            .collect();
        let emu = emulator.then(|| build_emulator(&sources, &kernels, &out_dir));
        let results: Vec<(PathBuf, Result<String, String>)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        (results, emu)
    });
    if let Some(emu) = emu {
        emu.unwrap_or_else(|e| panic!("\n\nrope-attn: building the SIMT emulator (feature `emulator`) failed:\n{e}\n"));
    }

    let mut consts = String::from("// Generated by build.rs: one fatbin per kernels/*.cu.\n");
    let mut report = String::from("# ptxas -v summary: file arch function registers stack spill_stores spill_loads\n");
    let mut total_spills = 0;
    for (src, (out, result)) in sources.iter().zip(results) {
        let log = result.unwrap_or_else(|e| panic!("{e}"));
        let stem = src.file_stem().unwrap().to_string_lossy().to_string();
        let entries = parse_ptxas(&log);
        let max_regs = entries.iter().map(|e| e.registers).max().unwrap_or(0);
        let spills: u32 = entries.iter().map(|e| e.spill_stores + e.spill_loads).sum();
        total_spills += spills;
        for e in &entries {
            writeln!(report, "{stem}.cu {} {} {} {} {} {}", e.arch, e.function, e.registers, e.stack, e.spill_stores, e.spill_loads).unwrap();
            if e.spill_stores + e.spill_loads > 0 {
                println!("cargo:warning=SPILL {stem}.cu {} {}: {} B stores, {} B loads", e.arch, e.function, e.spill_stores, e.spill_loads);
            }
        }
        println!(
            "cargo:warning=ptxas {stem}.cu: {} kernel builds (sm_80+sm_90), max {max_regs} registers, {spills} bytes spilled",
            entries.len()
        );
        writeln!(
            consts,
            "pub(crate) const {}: &[u8] = include_bytes!({:?});",
            stem.to_uppercase(),
            out.display().to_string()
        )
        .unwrap();
    }
    if total_spills > 0 {
        println!("cargo:warning=ptxas reports {total_spills} bytes of register spills in total (see the report)");
    }
    let report_path = out_dir.join("ptxas_report.txt");
    fs::write(&report_path, report).unwrap();
    println!("cargo:rustc-env=ROPE_ATTN_PTXAS_REPORT={}", report_path.display());
    println!("cargo:rustc-env=ROPE_ATTN_NVCC={}", nvcc.display());
    fs::write(out_dir.join("kernels.rs"), consts).unwrap();

    let layout = probe_abi_layout(&nvcc, &kernels, &out_dir).unwrap_or_else(|e| {
        println!("cargo:warning=ABI layout probe failed ({e}); tests/abi_layout.rs will fail");
        String::new()
    });
    let layout_path = out_dir.join("abi_layout.txt");
    fs::write(&layout_path, layout).unwrap();
    println!("cargo:rustc-env=ROPE_ATTN_ABI_LAYOUT={}", layout_path.display());
}

/// Feature `emulator`: every kernels/*.cu compiled by the host C++ compiler against
/// kernels/emu/simt.h (-DRA_EMULATE), with the emulator's runtime, into one static library.
/// The kernels register themselves from static constructors, so it links whole-archive.
fn build_emulator(sources: &[PathBuf], kernels: &Path, out_dir: &Path) -> Result<(), String> {
    println!("cargo:rerun-if-env-changed=CXX");
    let cxx = env::var("CXX").ok().or_else(|| {
        ["c++", "g++", "clang++"].into_iter().map(String::from).find(|c| Command::new(c).arg("--version").output().is_ok_and(|o| o.status.success()))
    });
    let cxx = cxx.ok_or("no C++ compiler found (set CXX, or install g++)")?;
    let dir = out_dir.join("emu");
    fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    // The kernels (as C++) and the emulator's runtime, kernels/emu/*.cpp.
    // (source, whether it holds kernels)
    let mut units: Vec<(PathBuf, bool)> = sources.iter().map(|s| (s.clone(), true)).collect();
    let mut runtime: Vec<PathBuf> = fs::read_dir(kernels.join("emu"))
        .map_err(|e| format!("kernels/emu: {e}"))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "cpp"))
        .collect();
    runtime.sort();
    // (selftest.cpp holds kernels, which racecheck instruments like the others.)
    units.extend(runtime.into_iter().map(|p| {
        let kernel = p.file_stem().is_some_and(|s| s == "selftest");
        (p, kernel)
    }));
    // Strict aliasing off: the kernels pun 16-bit pairs and vectors through casts, as CUDA allows.
    let flags = ["-std=c++17", "-O2", "-fPIC", "-fno-strict-aliasing", "-fno-exceptions", "-Wall", "-Wno-unknown-pragmas"];
    // Feature `racecheck`: the kernels under ThreadSanitizer (kernels/emu/simt.cpp says what it
    // is told), the runtime told so (-DRA_EMU_RACECHECK) but not instrumented itself.
    let racecheck = env::var_os("CARGO_FEATURE_RACECHECK").is_some();
    let objects: Vec<Result<PathBuf, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = units
            .iter()
            .map(|(src, kernel)| {
                let obj = dir.join(format!("{}.o", src.file_stem().unwrap().to_string_lossy()));
                let cxx = &cxx;
                s.spawn(move || {
                    let mut cmd = Command::new(cxx);
                    let is_cu = src.extension().is_some_and(|e| e == "cu");
                    if is_cu {
                        cmd.args(["-x", "c++", "-DRA_EMULATE"]);
                    }
                    if *kernel && racecheck {
                        cmd.args(["-fsanitize=thread", "-g1"]);
                    }
                    if racecheck {
                        cmd.arg("-DRA_EMU_RACECHECK");
                    }
                    cmd.args(flags).arg("-I").arg(kernels).arg("-c").arg(src).arg("-o").arg(&obj);
                    let out = cmd.output().map_err(|e| format!("could not run {cxx}: {e}"))?;
                    if !out.status.success() {
                        return Err(format!("{cxx} failed on {}:\n{}", src.display(), String::from_utf8_lossy(&out.stderr)));
                    }
                    Ok(obj)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let objects = objects.into_iter().collect::<Result<Vec<_>, _>>()?;
    let lib = out_dir.join("librope_attn_emu.a");
    let _ = fs::remove_file(&lib);
    let ar = env::var("AR").unwrap_or_else(|_| "ar".into());
    let out = Command::new(&ar).arg("crs").arg(&lib).args(&objects).output().map_err(|e| format!("could not run {ar}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{ar} failed: {}", String::from_utf8_lossy(&out.stderr)));
    }
    println!("cargo:rustc-link-search=native={}", out_dir.display());
    println!("cargo:rustc-link-lib=static:+whole-archive=rope_attn_emu");
    println!("cargo:rustc-link-lib=dylib=stdc++");
    if racecheck {
        println!("cargo:rustc-link-lib=dylib=tsan");
        for hook in ["__tsan_default_options", "__tsan_on_report"] {
            println!("cargo:rustc-link-arg=-Wl,--export-dynamic-symbol={hook}");
        }
    }
    Ok(())
}

/// Build and run kernels/abi/layout_probe.cu (host code only; no GPU needed): sizes and field
/// offsets of the kernel parameter structs as the CUDA compiler lays them out.
fn probe_abi_layout(nvcc: &Path, kernels: &Path, out_dir: &Path) -> Result<String, String> {
    let exe = out_dir.join("layout_probe");
    let bin = nvcc.parent().unwrap_or(Path::new("."));
    let mut cmd = Command::new(nvcc);
    cmd.args(["-std=c++17", "-o"]).arg(&exe).arg(kernels.join("abi/layout_probe.cu"));
    for lib in ["../lib", "../lib64"] {
        cmd.arg(format!("-L{}", bin.join(lib).display()));
    }
    let out = cmd.output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let run = Command::new(&exe).output().map_err(|e| e.to_string())?;
    if !run.status.success() {
        return Err(format!("probe exited with {}", run.status));
    }
    Ok(String::from_utf8_lossy(&run.stdout).into_owned())
}
