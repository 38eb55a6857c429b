//! `rope-attn plot`: decay curves and position-only score heatmaps, as SVG and PNG.

mod decay_chart;
mod figure;
mod font;
mod heatmap;
mod schedules;
mod score_matrix;
mod scores;

use crate::args::{Args, Spec};
use crate::load::{self, Model};
use figure::write_svg_png;
use rope_attn::RopeConfig;
use std::path::PathBuf;

pub const HELP: &str = "\
rope-attn plot — charts of RoPE schedules, as SVG and PNG

USAGE:
    rope-attn plot --out DIR [CONFIG...] [OPTIONS]

Writes into DIR:
  decay.svg/.png         Σ_i cos(rel·θ_i)/(r/2) against log distance 1..1M. With one CONFIG (or
                         none: plain RoPE θ=10000, d=128), the model's base and dims under the
                         default, linear, NTK-aware, YaRN and Llama 3.1 schedules with a common
                         factor; with several, each config's own schedule.
  scores_W.svg/.png      for each window W (100, 1000, 10000 tokens): the causal score matrix
                         S[i,j] of all-ones q and k with RoPE, with ALiBi, and with both, i.e. the
                         pattern the position encoding imposes by itself. Windows larger than the
                         grid are sampled at evenly spaced positions. With several configs:
                         scores_NAME_W (one set per config).

OPTIONS:
    --out DIR              output folder (created if missing)             [required]
    --seq-len N            current sequence length (dynamic NTK and LongRoPE depend on it)
    --layer-type T         layer type for configs whose rope_parameters are per layer type
    --factor F             context-extension factor of the comparison
                           [default: the config's factor, else 8]
    --original-max N       original context length of the comparison
                           [default: the config's original_max_position_embeddings, else its
                            max_position_embeddings, else 8192]
    --points N             points of each decay curve (log-spaced)        [default 400]
    --max-distance D       right end of the decay chart                   [default 1e6]
    --windows LIST         heatmap windows, comma-separated               [default 100,1000,10000]
    --grid N               sampled positions per heatmap axis             [default 200]
    --alibi-heads H        heads of the ALiBi slope schedule              [default 8]
    --alibi-head h         which head's slope (0-based; h = H-1 is the gentlest,
                           2^-8 for H = 8)                                [default H-1]
    -h, --help             this help
";

const SPEC: Spec = Spec {
    command: "plot",
    options: &[
        "--out",
        "--seq-len",
        "--layer-type",
        "--factor",
        "--original-max",
        "--points",
        "--max-distance",
        "--windows",
        "--grid",
        "--alibi-heads",
        "--alibi-head",
    ],
    flags: &[],
};

fn windows(args: &Args) -> Result<Vec<usize>, String> {
    let Some(list) = args.value("--windows") else { return Ok(vec![100, 1000, 10000]) };
    list.split(',')
        .map(|w| match w.trim().parse::<f64>() {
            Ok(x) if x >= 2.0 && x.fract() == 0.0 && x <= 1e9 => Ok(x as usize),
            _ => Err(format!("--windows: `{w}` is not a window of at least 2 tokens")),
        })
        .collect()
}

/// The model the charts are about when no CONFIG is given.
fn default_model() -> Result<Model, String> {
    let config = RopeConfig::new(10000.0, 128).map_err(|e| e.to_string())?;
    let schedule = config.schedule(None).map_err(|e| e.to_string())?;
    Ok(Model {
        path: String::new(),
        name: "a plain-RoPE model (no config given)".into(),
        layer_type: None,
        config,
        schedule,
    })
}

pub fn run(argv: &[String]) -> Result<(), String> {
    let args = SPEC.parse(argv)?;
    if args.help {
        print!("{HELP}");
        return Ok(());
    }
    let out = PathBuf::from(args.value("--out").ok_or("plot needs --out DIR (see `rope-attn plot --help`)")?);
    let seq_len = args.count("--seq-len")?;
    let factor = args.positive("--factor")?;
    let points = args.count("--points")?.unwrap_or(400);
    let max_distance = args.positive("--max-distance")?.unwrap_or(1e6);
    if points < 2 || max_distance <= 1.0 {
        return Err("--points must be >= 2 and --max-distance > 1".into());
    }
    let windows = windows(&args)?;
    let grid = args.count("--grid")?.unwrap_or(200);
    if !(2..=4000).contains(&grid) {
        return Err(format!("--grid must be in 2..=4000, got {grid}"));
    }
    let heads = args.count("--alibi-heads")?.unwrap_or(8);
    let head = args.count("--alibi-head")?.unwrap_or(heads.saturating_sub(1));
    if heads == 0 || head >= heads {
        return Err(format!("--alibi-head {head} is not one of --alibi-heads {heads} (0-based)"));
    }
    let models = if args.positionals.is_empty() {
        vec![default_model()?]
    } else {
        args.positionals
            .iter()
            .map(|p| load::model(p, args.value("--layer-type"), seq_len))
            .collect::<Result<_, _>>()?
    };
    font::register()?;
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: cannot create: {e}", out.display()))?;

    let chart = match models.as_slice() {
        [one] => schedules::comparison(one, factor, args.count("--original-max")?, points, max_distance)?,
        several => schedules::side_by_side(several, points, max_distance),
    };
    let mut written = write_svg_png(&chart, &out, "decay")?.to_vec();
    println!("score matrices computed on {}", score_matrix::backend());
    for m in &models {
        for &w in &windows {
            let stem = match models.len() {
                1 => format!("scores_{w}"),
                _ => format!("scores_{}_{w}", m.name),
            };
            let fig = scores::heatmaps(m, w, grid, (heads, head))?;
            written.extend(write_svg_png(&fig, &out, &stem)?);
        }
    }
    for p in &written {
        println!("wrote {}", p.display());
    }
    Ok(())
}
