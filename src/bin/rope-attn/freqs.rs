//! `rope-attn freqs`: a model's evaluated RoPE schedule, as a table or one JSON object.

use crate::args::Spec;
use crate::{decay, load};
use rope_attn::config::decay_distances;
use serde_json::json;
use std::f64::consts::TAU;

pub const HELP: &str = "\
rope-attn freqs — the RoPE schedule a config.json implies

USAGE:
    rope-attn freqs CONFIG [--seq-len N] [--layer-type T] [--max-distance D] [--json]

Prints rope_type, theta, head_dim, rotary_dim and attention_factor, then per rotary pair i:
inv_freq θ_i (radians per token), its wavelength 2π/θ_i in tokens, and θ_i divided by the
plain-RoPE frequency theta^(-2i/r) of the same base (1 = untouched, 1/factor = interpolated),
then the long-range decay table (see `rope-attn decay --help`). For multimodal RoPE
(mrope_section: Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5), the sections and, per pair, which of
a token's time, height and width positions it is rotated to.

OPTIONS:
    --seq-len N         current sequence length (dynamic NTK and LongRoPE depend on it)
    --layer-type T      layer type (e.g. full_attention) for configs whose rope_parameters
                        are keyed by layer type (Gemma 3); required for those
    --max-distance D    largest distance of the decay table (default 1e6)
    --json              print exactly one JSON object instead (fields: rope_type, theta,
                        head_dim, rotary_dim, attention_factor, seq_len, layer_type,
                        max_position_embeddings, inv_freq, wavelength, ratio_to_plain, decay,
                        mrope: null or {sections, interleaved, component: 0 time, 1 height,
                        2 width per pair})
    -h, --help          this help
";

const SPEC: Spec =
    Spec { command: "freqs", options: &["--seq-len", "--layer-type", "--max-distance"], flags: &["--json"] };

pub fn run(argv: &[String]) -> Result<(), String> {
    let args = SPEC.parse(argv)?;
    if args.help {
        print!("{HELP}");
        return Ok(());
    }
    let path = match args.positionals.as_slice() {
        [p] => p,
        [] => return Err("freqs needs a CONFIG (see `rope-attn freqs --help`)".into()),
        more => return Err(format!("freqs takes one CONFIG, got {}", more.len())),
    };
    let seq_len = args.count("--seq-len")?;
    let max = args.positive("--max-distance")?.unwrap_or(1e6);
    let m = load::model(path, args.value("--layer-type"), seq_len)?;
    let s = &m.schedule;
    let plain = load::plain_of(&m.config)?;
    let wavelength: Vec<f64> = s.inv_freq.iter().map(|f| TAU / f).collect();
    let ratio: Vec<f64> = s.inv_freq.iter().zip(&plain.inv_freq).map(|(f, p)| f / p).collect();
    let distances = decay_distances(max);
    let decay = s.decay(&distances);
    let components: Option<Vec<usize>> = s.mrope.map(|m| (0..s.inv_freq.len()).map(|i| m.component(i)).collect());

    if args.flag("--json") {
        let obj = json!({
            "config": m.path,
            "rope_type": s.rope_type,
            "theta": m.config.theta,
            "head_dim": m.config.head_dim,
            "rotary_dim": s.rotary_dim,
            "attention_factor": s.attention_factor,
            "seq_len": seq_len,
            "layer_type": m.layer_type,
            "max_position_embeddings": m.config.max_position_embeddings,
            "inv_freq": s.inv_freq,
            "wavelength": wavelength,
            "ratio_to_plain": ratio,
            "decay": { "distance": distances, "sum_cos": decay },
            "mrope": s.mrope.map(|m| json!({ "sections": m.sections, "interleaved": m.interleaved, "component": components })),
        });
        println!("{obj}");
        return Ok(());
    }

    let opt = |v: Option<String>, none: &str| v.unwrap_or_else(|| none.to_string());
    println!("config                   {}", m.path);
    if let Some(t) = &m.layer_type {
        println!("layer_type               {t}");
    }
    println!("rope_type                {}", s.rope_type);
    println!("theta                    {}", m.config.theta);
    println!("head_dim                 {}", m.config.head_dim);
    println!("rotary_dim               {}  ({} pairs)", s.rotary_dim, s.inv_freq.len());
    println!("attention_factor         {}", s.attention_factor);
    println!("max_position_embeddings  {}", opt(m.config.max_position_embeddings.map(|v| v.to_string()), "-"));
    println!("seq_len                  {}", opt(seq_len.map(|v| v.to_string()), "- (not given)"));
    if let Some(m) = s.mrope {
        let how = if m.interleaved { "interleaved" } else { "chunked" };
        println!("mrope                    sections {:?} (time, height, width), {how}", m.sections);
    }
    println!();
    let pos = |i: usize| components.as_ref().map_or("", |c| ["  time", "  height", "  width"][c[i]]);
    let head = if components.is_some() { "  position" } else { "" };
    println!("{:>5}  {:>14}  {:>20}  {:>14}{head}", "pair", "inv_freq", "wavelength (tokens)", "/ plain RoPE");
    for (i, ((f, w), r)) in s.inv_freq.iter().zip(&wavelength).zip(&ratio).enumerate() {
        println!("{i:>5}  {f:>14.6e}  {w:>20.2}  {r:>14.6}{}", pos(i));
    }
    println!();
    println!("long-range decay: Σ_i cos(rel·θ_i) over the {} pairs", s.inv_freq.len());
    print!("{}", decay::table(&distances, &[("sum cos".to_string(), decay)]));
    Ok(())
}
