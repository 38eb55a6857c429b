//! The sweeps' option space, in one place: the GPU suites (tests/gpu_*.rs) and the emulated ones
//! (tests/emu_*.rs) iterate over the same cases — every head dim × every rope type, rotating
//! through dtype-independent options (GQA ratio, masks, ALiBi, ReRoPE, sizes) rather than taking
//! their full product. Only lengths differ: the emulator runs a CUDA thread at a time, so it gets
//! shorter sequences (still multiples of no tile, still several tiles long).
#![allow(dead_code)]

use super::schedules;
use rand::rngs::StdRng;
use rand::Rng;
use rope_attn::cuda::{RopeShape, ScoresShape};
use rope_attn::{Alibi, AttentionParams, MRope, Mask, NormScope, QueryTemperature, Relative, Rotary};

/// Who runs the sweep: a GPU takes full-length problems, the emulator shorter ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    Gpu,
    Emulator,
}

/// The scale of a GPU sweep: full length, or the emulator's shorter problems when
/// `ROPE_ATTN_SANITIZER=1` (compute-sanitizer's racecheck runs the kernels orders of magnitude
/// slower; the same cases at short lengths still cover every code path).
pub fn gpu_scale() -> Scale {
    if std::env::var("ROPE_ATTN_SANITIZER").as_deref() == Ok("1") {
        Scale::Emulator
    } else {
        Scale::Gpu
    }
}

/// Head dims of the rope, norm and score sweeps.
pub const HEAD_DIMS: [usize; 5] = [64, 80, 96, 128, 256];

/// Head dims of the attention sweeps (prefill, paged prefill, decode): 512 too (Gemma 4's full
/// layers), where no case takes ReRoPE (the kernels refuse it there).
pub const ATTENTION_HEAD_DIMS: [usize; 6] = [64, 80, 96, 128, 256, 512];

/// Full rotary on even head-dim indices, half of it (partial rotary, pass-through components) on
/// odd ones; at 512 the whole head, which `schedules` makes Gemma 4's proportional RoPE first and
/// a rotation of the first 256 components for the other rope types.
pub fn full_or_half(d: usize, dim_index: usize) -> usize {
    if dim_index.is_multiple_of(2) || d > 256 {
        d
    } else {
        d / 2
    }
}

/// Each attention head dim (`ATTENTION_HEAD_DIMS`; the score sweeps leave 512 out) with each
/// of the 8 rope types (`case` = 8·dim index + schedule index) and the rotary dim
/// `rot_dim(d, dim index)` picks.
pub fn dims_and_schedules(rot_dim: impl Fn(usize, usize) -> usize) -> Vec<(usize, usize, &'static str, Rotary)> {
    let mut out = Vec::new();
    for (ci, &d) in ATTENTION_HEAD_DIMS.iter().enumerate() {
        for (si, (name, rot)) in schedules(d, rot_dim(d, ci)).into_iter().enumerate() {
            out.push((ci * 8 + si, d, name, rot));
        }
    }
    out
}

/// Rope kernel geometries: (tokens, q heads, k heads, q row stride, k row stride) for head dim d:
/// dense, packed QKV (Q and K of a token side by side, V after them), and an odd-by-two stride
/// that forces the one-pair-per-thread kernel.
pub fn rope_layouts(d: usize) -> [(usize, usize, usize, usize, usize); 3] {
    [(1, 4, 1, 4 * d, d), (7, 8, 2, 12 * d, 12 * d), (33, 4, 4, 4 * d + 2, 4 * d + 2)]
}

/// Positions near 0, just below and above 2^24, and anywhere up to 2e9.
pub fn rope_positions(r: &mut StdRng, tokens: usize) -> Vec<i32> {
    (0..tokens)
        .map(|t| match t % 4 {
            0 => t as i32,
            1 => (1 << 24) - 3 + t as i32,
            2 => (1 << 24) + 12345,
            _ => r.random_range(0..2_000_000_000),
        })
        .collect()
}

/// M-RoPE sections for a rotary dim: chunked in Qwen2-VL's proportions (1/4 time, 3/8 height,
/// the rest width: [16, 24, 24] at 64 pairs) and interleaved in Qwen3.5's (11/32 height, 10/32
/// width: [11, 11, 10] at 32 pairs), where height and width differ, so swapping them shows.
pub fn mrope_cases(rot_dim: usize) -> [MRope; 2] {
    let pairs = rot_dim / 2;
    let (t, h) = (pairs / 4, 3 * pairs / 8);
    let (ih, iw) = (11 * pairs / 32, 10 * pairs / 32);
    [MRope { sections: [t, h, pairs - t - h], interleaved: false }, MRope { sections: [pairs - ih - iw, ih, iw], interleaved: true }]
}

/// One M-RoPE sweep case: a label, the rope geometry, the rotation and the sections.
pub struct MropeCase {
    pub label: String,
    pub shape: RopeShape,
    pub rot: Rotary,
    pub m: MRope,
}

/// The M-RoPE sweep (tests/emu_rope_scores.rs runs it in the emulator, tests/gpu_rope.rs on a
/// GPU): both section layouts over every head dim, full and half rotary, both pair layouts and
/// YaRN's attention factor, every rope geometry (so every vector width of the kernel).
pub fn mrope_sweep_cases() -> Vec<MropeCase> {
    let mut out = Vec::new();
    for &d in &HEAD_DIMS {
        for &frac in &[1.0, 0.5] {
            let rot_dim = ((d as f64 * frac) as usize) & !1;
            let picked = schedules(d, rot_dim).into_iter().filter(|(n, _)| ["default", "default-interleaved", "yarn"].contains(n));
            for (name, rot) in picked {
                for (tokens, qh, kh, row, krow) in rope_layouts(d) {
                    for m in mrope_cases(rot_dim) {
                        let shape = RopeShape { tokens, q_heads: qh, k_heads: kh, head_dim: d, q_row_stride: row, k_row_stride: krow };
                        let label = format!("d={d} r={rot_dim} {name} {m:?} tokens={tokens} stride={row}");
                        out.push(MropeCase { label, shape, rot: rot.clone(), m });
                    }
                }
            }
        }
    }
    assert_eq!(out.len(), 5 * 2 * 3 * 3 * 2);
    out
}

/// M-RoPE positions, three rows of `stride` ints (time, height, width): text tokens (three
/// equal positions), an image's grid (time fixed, height and width walking it), far positions
/// near 2^24 and beyond; entries past `tokens` in each row are poison the kernel must not read.
pub fn mrope_positions(r: &mut StdRng, tokens: usize, stride: usize) -> Vec<i32> {
    let mut rows = vec![-777_777; 3 * stride];
    for t in 0..tokens {
        let p: [i32; 3] = match t % 4 {
            0 => [t as i32; 3],
            1 => [t as i32, t as i32 + 3, t as i32 + 1],
            2 => [(1 << 24) - 3, (1 << 24) + 12345, 7],
            _ => [r.random_range(0..2_000_000_000), r.random_range(0..2_000_000_000), r.random_range(0..2_000_000_000)],
        };
        for c in 0..3 {
            rows[c * stride + t] = p[c];
        }
    }
    rows
}

/// A scores case: GQA 1/4/8, single element to two-tile sizes with a decode offset, every mask,
/// ALiBi with a tensor-parallel head offset on odd cases, ReRoPE / Leaky ReRoPE on two of three.
pub fn scores_case(case: usize, d: usize, rot: Rotary, scale: Scale) -> (AttentionParams, ScoresShape) {
    let (hq, hkv) = [(4usize, 4usize), (8, 2), (8, 1)][case % 3];
    let sizes = match scale {
        Scale::Gpu => [(1usize, 1usize, 0usize), (13, 70, 57), (65, 65, 0), (130, 131, 1)],
        Scale::Emulator => [(1, 1, 0), (13, 70, 57), (65, 33, 0), (70, 71, 1)],
    };
    let (nq, nk, off) = sizes[case % 4];
    let mut p = AttentionParams::new(hq, hkv, d);
    p.rope = Some(rot);
    p.relative = [Relative::None, Relative::ReRope { window: 7 }, Relative::Leaky { window: 5, k: 3.0 }][case % 3];
    p.mask = [
        Mask { causal: true, window: None, sinks: 0, chunk: None },
        Mask { causal: true, window: Some(9), sinks: 2, chunk: None },
        Mask { causal: false, window: None, sinks: 0, chunk: None },
        Mask { causal: false, window: Some(20), sinks: 0, chunk: None },
    ][case % 4];
    if case % 2 == 1 {
        p.alibi = Some(Alibi { total_heads: 4 * hq, head_offset: hq });
    }
    soft_cap(&mut p, case);
    chunked(&mut p, case);
    temperature(&mut p, case);
    let shape = ScoresShape::contiguous(&p, nq, nk, off);
    (p, shape)
}

/// A prefill case: a ragged varlen batch and whether to pass a workspace (the pre-rotated path:
/// required for ReRoPE and f32, chosen on odd cases otherwise).
pub struct PrefillCase {
    pub p: AttentionParams,
    pub seq_q: Vec<usize>,
    pub seq_k: Vec<usize>,
    pub workspace: bool,
}

pub fn prefill_case(case: usize, d: usize, rot: Rotary, f32_path: bool, scale: Scale) -> PrefillCase {
    let (hq, hkv) = [(4usize, 4usize), (8, 2), (8, 1)][case % 3];
    let mut p = AttentionParams::new(hq, hkv, d);
    p.rope = Some(rot);
    p.relative = [Relative::None, Relative::None, Relative::ReRope { window: 16 }, Relative::Leaky { window: 8, k: 4.0 }][case % 4];
    if d > 256 {
        p.relative = Relative::None;
    }
    p.mask = [
        Mask { causal: true, window: None, sinks: 0, chunk: None },
        Mask { causal: true, window: Some(40), sinks: 4, chunk: None },
        Mask { causal: false, window: None, sinks: 0, chunk: None },
    ][case % 3];
    if case.is_multiple_of(2) {
        p.alibi = Some(Alibi { total_heads: 2 * hq, head_offset: hq });
    }
    // A 1-token sequence, odd sizes, one longer than several tiles; and a sequence with more
    // queries than keys (its first queries see no key when causal: O = 0, lse = -inf).
    let (seq_q, seq_k): (Vec<usize>, Vec<usize>) = match (case % 3, scale) {
        (0, Scale::Gpu) => (vec![1, 17, 100, 257], vec![1, 17, 130, 257]),
        (0, Scale::Emulator) => (vec![1, 17, 70], vec![1, 17, 130]),
        (1, Scale::Gpu) => (vec![64, 3], vec![200, 3]),
        (1, Scale::Emulator) => (vec![66, 3], vec![100, 3]),
        (_, Scale::Gpu) => (vec![40, 129], vec![30, 129]),
        (_, Scale::Emulator) => (vec![40, 9], vec![30, 9]),
    };
    learned_sinks(&mut p, case);
    soft_cap(&mut p, case);
    chunked(&mut p, case);
    temperature(&mut p, case);
    let workspace = p.relative != Relative::None || f32_path || case % 2 == 1;
    PrefillCase { p, seq_q, seq_k, workspace }
}

/// Logit soft-capping (Gemma 2, Grok) on two cases in seven and on cases 1, 13, 25, 37 (for a
/// prefill: no ReRoPE, a workspace and more queries than a narrow tile, so the wide kernel): a
/// cap of 0.5, far below real ones but where unit inputs' scores (spread about 1/3, up to about
/// 2) bend enough that leaving the cap out fails the tolerances, and Grok's 30 (nearly linear
/// at these scores).
pub fn soft_cap(p: &mut AttentionParams, case: usize) {
    p.softcap = match (case % 7, case % 12) {
        (3, _) | (_, 1) => Some(0.5),
        (5, _) => Some(30.0),
        _ => None,
    };
}

/// Chunked attention (Llama 4's `attention_chunk_size`) on two cases in five, over whatever
/// mask the case has (causal or not, a window with sinks): chunks of 24 keys (several in one
/// key tile), 80 (chunk starts inside tiles, whole tiles skipped) and 128 (tile-aligned in
/// decode), on sequences longer than a chunk. Cases 2 mod 5 meet the learned sinks.
pub fn chunked(p: &mut AttentionParams, case: usize) {
    if case % 5 == 1 || case % 5 == 2 {
        p.mask.chunk = Some([24, 80, 128][(case / 5) % 3]);
    }
}

/// The query temperature on one case in five (cases 3 mod 5: every dtype, head dim, ReRoPE
/// mode and mask meet it), with floors of 3 (the factor changes every few rows of a tile), 20
/// and 64 (tiles on both sides of the first step), and `attn_scale` 0.3: at these lengths the
/// factors reach about 2.5, so a kernel that leaves it out fails by far.
pub fn temperature(p: &mut AttentionParams, case: usize) {
    if case % 5 == 3 {
        // Llama 4's offset 1, and Ministral 3's 0 every other case.
        p.query_temperature = Some(QueryTemperature { floor_scale: [3, 20, 64][(case / 5) % 3], attn_scale: 0.3, offset: (case / 15 % 2) as u32 });
    }
}

/// Learned attention sinks (GPT-OSS) on two cases in five, so that they meet every dtype,
/// head dim, mask, split count and fully masked rows: logits from -3 to 6 (scores here are of
/// order 1, so the larger ones take most of a row's mass and the smaller ones little).
pub fn learned_sinks(p: &mut AttentionParams, case: usize) {
    if case % 5 == 2 || case % 5 == 4 {
        p.sink_logits = Some((0..p.num_q_heads).map(|h| ((h * 7 + case) % 10) as f64 - 3.0).collect());
    }
}

/// A decode case: 1, 4 or 16 queries per sequence (speculative decoding), GQA up to 8, ReRoPE /
/// Leaky ReRoPE, window with sinks, ALiBi, pages of 16 or 7 tokens, contexts from the query count
/// itself to several key tiles per split.
pub struct DecodeCase {
    pub p: AttentionParams,
    pub queries: usize,
    pub page: usize,
    pub ctx: [usize; 3],
}

pub fn decode_case(case: usize, d: usize, rot: Rotary, scale: Scale) -> DecodeCase {
    let (hq, hkv) = [(4usize, 4usize), (8, 2), (32, 4)][case % 3];
    let queries = [1usize, 4, 16][case % 3];
    let mut p = AttentionParams::new(hq, hkv, d);
    p.rope = Some(rot);
    p.relative = [Relative::None, Relative::ReRope { window: 32 }, Relative::Leaky { window: 16, k: 8.0 }][case % 3];
    if d > 256 {
        p.relative = Relative::None;
    }
    p.mask = [Mask { causal: true, window: None, sinks: 0, chunk: None }, Mask { causal: true, window: Some(100), sinks: 4, chunk: None }][case % 2];
    if case % 2 == 1 {
        p.alibi = Some(Alibi { total_heads: hq, head_offset: 0 });
    }
    learned_sinks(&mut p, case);
    soft_cap(&mut p, case);
    chunked(&mut p, case);
    temperature(&mut p, case);
    let ctx = match scale {
        Scale::Gpu => [queries, 300, 1000 + case],
        Scale::Emulator => [queries, 100, 150 + case],
    };
    DecodeCase { p, queries, page: [16usize, 7][case % 2], ctx }
}

/// Decode's base-steps cases (kernels/attention_decode_mma.cu): (head dim, case) pairs and, per
/// case, the parameters (8 query heads over 2, bf16) and the longer sequence's context (the
/// other holds 37 keys; 2 queries each). Case 0 llama3 rotate_half, 1 interleaved, 2 partial
/// rotate_half (rotated in shared memory), 3 ReRoPE, 4 a window whose first tiles are steps 1
/// and 2 of groups whose anchors the warps never visit: from the sinks' tile they jump to tiles
/// 39 .. 42 (lo = 896 - 2 - 256 + 1 = 639), tiles 9 and 10 of each warp's, and half the
/// window's keys are in those two groups.
pub const BASE_STEP_CASES: [(usize, usize); 6] = [(128, 0), (128, 1), (128, 2), (128, 3), (64, 4), (96, 0)];

pub fn base_steps_case(d: usize, case: usize) -> (AttentionParams, usize) {
    let mut p = AttentionParams::new(8, 2, d);
    p.rope = Some(match case {
        1 => schedules(d, d).remove(1).1,
        2 => schedules(d, d / 2).remove(0).1,
        _ => schedules(d, d).remove(6).1,
    });
    let mut ctx = 1100 + 13 * case;
    if case == 3 {
        p.relative = Relative::ReRope { window: 300 };
    }
    if case == 4 {
        p.mask = Mask { causal: true, window: Some(256), sinks: 4, chunk: None };
        ctx = 896;
    }
    (p, ctx)
}

/// One QK-norm sweep case (tests/emu_qk_norm.rs, tests/gpu_rope.rs): the rope geometry, the
/// rotation after the norm (`None`: the norm alone), the scope, whether Q and K have weights,
/// and eps.
pub struct NormCase {
    pub label: String,
    pub shape: RopeShape,
    pub rot: Option<Rotary>,
    pub scope: NormScope,
    pub weighted: bool,
    pub eps: f64,
}

/// Every head dim (and two the attention kernels do not take, 6 and 72: the rope kernel takes
/// any even one; and Gemma 4's 512, the norm alone) × full and partial rotary with three rope types, and the norm alone ×
/// rope_layouts (all three vector widths), rotating through the scope (per head and weighted,
/// over all heads and weighted, per head without weights: Qwen3 / Gemma 3, OLMo 2, Llama 4)
/// and eps (1e-6, where the inputs' smallest tokens' mean square is ~1e-7, so eps shows).
pub fn qk_norm_cases() -> Vec<NormCase> {
    let mut out = Vec::new();
    for d in HEAD_DIMS.into_iter().chain([6, 72, 512]) {
        let mut rots: Vec<(String, Option<Rotary>)> = vec![("norm only".into(), None)];
        if HEAD_DIMS.contains(&d) {
            for frac in [1.0, 0.5] {
                let r = ((d as f64 * frac) as usize) & !1;
                for (name, rot) in schedules(d, r).into_iter().filter(|(n, _)| ["default", "default-interleaved", "yarn"].contains(n)) {
                    rots.push((format!("r={r} {name}"), Some(rot)));
                }
            }
        }
        for (rname, rot) in rots {
            for (tokens, qh, kh, row, krow) in rope_layouts(d) {
                let i = out.len();
                let (scope, weighted) = [(NormScope::Head, true), (NormScope::Heads, true), (NormScope::Head, false), (NormScope::HeadCentred, true)][i % 4];
                let eps = [1e-6, 1e-5][i / 3 % 2];
                let shape = RopeShape { tokens, q_heads: qh, k_heads: kh, head_dim: d, q_row_stride: row, k_row_stride: krow };
                let label = format!("d={d} {rname} {scope:?} weighted={weighted} eps={eps} tokens={tokens} stride={row}");
                out.push(NormCase { label, shape, rot: rot.clone(), scope, weighted, eps });
            }
        }
    }
    assert_eq!(out.len(), (5 * 7 + 3) * 3);
    out
}

/// Q or K values for a norm case (`heads` per token at `stride`): uniform, each token scaled by
/// 1, 1e-3 or 50 and each head by 1 + h % 3 more, so that a per-head norm and a norm over all
/// heads differ and the result cannot depend on the input's scale, each head off centre by 0,
/// 0.75 or -2 (before the scaling: a LayerNorm and an RMS norm then differ); and weights of `len` in
/// ±[0.25, 1.75) when weighted (Gemma's 1 + w lies there too).
pub fn norm_values(r: &mut StdRng, tokens: usize, heads: usize, d: usize, stride: usize) -> Vec<f64> {
    let mut x = super::uniform(r, tokens * stride);
    for t in 0..tokens {
        for h in 0..heads {
            let s = [1.0, 1e-3, 50.0][t % 3] * (1 + h % 3) as f64;
            let off = [0.0, 0.75, -2.0][h % 3];
            x[t * stride + h * d..t * stride + (h + 1) * d].iter_mut().for_each(|v| *v = (*v + off) * s);
        }
    }
    x
}

pub fn norm_weights(r: &mut StdRng, len: usize) -> Vec<f32> {
    (0..len).map(|_| r.random_range(0.25f32..1.75) * if r.random_bool(0.2) { -1.0 } else { 1.0 }).collect()
}

/// What follows the norm in a gated-query case.
#[derive(Clone)]
pub enum GatedKind {
    None,
    Rope(Rotary),
    Mrope(Rotary, MRope),
}

/// One gated-query case (tests/emu_gated_query.rs, tests/gpu_rope.rs): `shape.q_row_stride` is
/// the stride of the gated rows (each head's query then its gate), K as usual.
pub struct GatedCase {
    pub label: String,
    pub shape: RopeShape,
    pub kind: GatedKind,
    pub scope: NormScope,
    pub weighted: bool,
}

/// Gated geometries at head dim d (tokens, q heads, k heads, gated row stride, K row stride):
/// dense rows; a packed [q+gate | k | v] projection (16 elements of 8-byte alignment or wider:
/// the widest vector width); rows two elements off every wider alignment (one pair per thread).
pub fn gated_layouts(d: usize) -> [(usize, usize, usize, usize, usize); 3] {
    [(1, 4, 1, 8 * d, d), (7, 8, 2, 20 * d, 20 * d), (33, 4, 4, 8 * d + 2, 4 * d + 2)]
}

/// The gated sweep: every head dim × the norm alone, Qwen3-Next's RoPE (a quarter of the head
/// rotated), YaRN over the full head, interleaved pairs over half of it, and Qwen3.5's
/// interleaved M-RoPE sections over a quarter × gated_layouts, rotating through the scope (per
/// head weighted, as Qwen3-Next; over all heads; unweighted).
pub fn gated_cases() -> Vec<GatedCase> {
    let mut out = Vec::new();
    for d in HEAD_DIMS {
        let quarter = (d / 4) & !1;
        let pick = |r: usize, name: &str| schedules(d, r).into_iter().find(|(n, _)| *n == name).unwrap().1;
        let kinds = [
            ("norm only".to_string(), GatedKind::None),
            (format!("r={quarter} default"), GatedKind::Rope(pick(quarter, "default"))),
            (format!("r={d} yarn"), GatedKind::Rope(pick(d, "yarn"))),
            (format!("r={} default-interleaved", d / 2), GatedKind::Rope(pick(d / 2, "default-interleaved"))),
            (format!("r={quarter} mrope interleaved"), GatedKind::Mrope(pick(quarter, "default"), mrope_cases(quarter)[1])),
        ];
        for (kname, kind) in kinds {
            for (tokens, qh, kh, row, krow) in gated_layouts(d) {
                let i = out.len();
                let (scope, weighted) = [(NormScope::Head, true), (NormScope::Heads, true), (NormScope::Head, false), (NormScope::HeadCentred, true)][i % 4];
                let shape = RopeShape { tokens, q_heads: qh, k_heads: kh, head_dim: d, q_row_stride: row, k_row_stride: krow };
                let label = format!("d={d} {kname} {scope:?} weighted={weighted} tokens={tokens} stride={row}");
                out.push(GatedCase { label, shape, kind: kind.clone(), scope, weighted });
            }
        }
    }
    assert_eq!(out.len(), 5 * 5 * 3);
    out
}

/// A gated Q buffer for `s` (`shape.q_row_stride` apart): each head's query from `queries`
/// (dense `[tokens, q_heads, d]`), its gate and the rows' slack filled with ±3e4 poison, so a
/// kernel that read a gate into the norm or rotated it would be far off.
pub fn gated_rows(s: &RopeShape, queries: &[f64]) -> Vec<f64> {
    let d = s.head_dim;
    let len = if s.tokens == 0 { 0 } else { (s.tokens - 1) * s.q_row_stride + s.q_heads * 2 * d };
    let mut g: Vec<f64> = (0..len).map(|i| if i % 2 == 0 { 3e4 } else { -3e4 }).collect();
    for t in 0..s.tokens {
        for h in 0..s.q_heads {
            let at = t * s.q_row_stride + h * 2 * d;
            g[at..at + d].copy_from_slice(&queries[(t * s.q_heads + h) * d..][..d]);
        }
    }
    g
}
