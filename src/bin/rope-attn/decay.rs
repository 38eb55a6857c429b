//! `rope-attn decay`: RoPE's long-range decay, `Σ_i cos(rel·θ_i)` over the rotary pairs, at
//! rel = 0, 1, 10, 100, ... — one column per config.

use crate::args::Spec;
use crate::load;
use rope_attn::config::decay_distances;
use std::fmt::Write;

pub const HELP: &str = "\
rope-attn decay — RoPE's long-range decay table

USAGE:
    rope-attn decay CONFIG [CONFIG...] [--seq-len N] [--layer-type T] [--max-distance D]

For each relative distance rel = 0, 1, 10, 100, ... up to D, prints Σ_i cos(rel·θ_i) over the
rotary pairs i: the score q·R(rel)k of all-ones q and k, up to scale. At rel = 0 it equals the
number of pairs; a schedule whose sum stays high at long range keeps far tokens distinguishable
from near ones less well. One column per config.

OPTIONS:
    --seq-len N         current sequence length (dynamic NTK and LongRoPE depend on it)
    --layer-type T      layer type to read in configs whose rope_parameters are per layer type
    --max-distance D    largest distance (default 1e6)
    -h, --help          this help
";

const SPEC: Spec = Spec { command: "decay", options: &["--seq-len", "--layer-type", "--max-distance"], flags: &[] };

pub fn run(argv: &[String]) -> Result<(), String> {
    let args = SPEC.parse(argv)?;
    if args.help {
        print!("{HELP}");
        return Ok(());
    }
    if args.positionals.is_empty() {
        return Err("decay needs at least one CONFIG (see `rope-attn decay --help`)".into());
    }
    let seq_len = args.count("--seq-len")?;
    let max = args.positive("--max-distance")?.unwrap_or(1e6);
    let models = args
        .positionals
        .iter()
        .map(|p| load::model(p, args.value("--layer-type"), seq_len))
        .collect::<Result<Vec<_>, _>>()?;
    let columns: Vec<(String, Vec<f64>)> = models
        .iter()
        .map(|m| (format!("{} ({})", m.name, m.schedule.rope_type), m.schedule.decay(&decay_distances(max))))
        .collect();
    println!("Σ_i cos(rel·θ_i) over the rotary pairs (at rel 0: the number of pairs)");
    print!("{}", table(&decay_distances(max), &columns));
    Ok(())
}

/// Right-aligned table: a distance column, then one column per (header, values).
pub fn table(distances: &[f64], columns: &[(String, Vec<f64>)]) -> String {
    let widths: Vec<usize> = columns.iter().map(|(h, _)| h.chars().count().max(12)).collect();
    let mut out = format!("{:>10}", "distance");
    for ((h, _), w) in columns.iter().zip(&widths) {
        write!(out, "  {h:>w$}").unwrap();
    }
    out.push('\n');
    for (row, d) in distances.iter().enumerate() {
        write!(out, "{d:>10}").unwrap();
        for ((_, values), w) in columns.iter().zip(&widths) {
            write!(out, "  {:>w$.4}", values[row]).unwrap();
        }
        out.push('\n');
    }
    out
}
