//! Head dim 512, Gemma 4's full-attention layers at their real size, run by the SIMT emulator:
//! the layer as its config describes it (proportional RoPE over the whole head, 64 of its 256
//! pairs turning; V = K's projection, RMS-normalised; scale 1; one KV head), through every
//! kernel a server runs for it, each in checked mode against the f64 reference and all
//! agreeing with each other: the prefill (fused, and pre-rotated keys), a chunk of paged
//! prefill over the cache (split keys and not), and a speculative decode of the last tokens
//! (split and not). Then what head dim 512 refuses, with typed errors before any launch.
//! (The sweeps of tests/emu_attention.rs, emu_decode.rs and emu_paged_prefill.rs take 512 too,
//! with every other rope type over its first 256 components.)
#![cfg(feature = "emulator")]

mod common;

use common::*;
use half::{bf16, f16};
use rope_attn::cuda::{
    attention_fwd_workspace_len, decode_workspace_len, max_abs, paged_prefill_workspace_len, AttentionBatch, CheckReport, DecodeBatch,
    Dtype, PagedKvCache, PagedPrefillBatch, PrefillPath, RopeShape, ScoresShape, Tolerance,
};
use rope_attn::emulator::{DecodeInputs, Emulator, FwdInputs, GuardedBuf, PagedFwdInputs};
use rope_attn::{hf_layers, AttentionParams, Error, Layout, NormScope, QkNorm, Relative, RopeConfig, RopeScaling, Rotary};

/// A small Gemma 4 text config: a sliding layer of head 64 and a full one of `global_head_dim`
/// 512, whose keys are its values (`attention_k_eq_v`: one global KV head). Everything else is
/// the class's default (proportional RoPE, a quarter of the pairs, theta 1e6 on full layers).
const GEMMA4: &str = r#"{
  "model_type": "gemma4_text", "hidden_size": 256, "num_hidden_layers": 2,
  "layer_types": ["sliding_attention", "full_attention"], "sliding_window": 32,
  "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
  "global_head_dim": 512, "num_global_key_value_heads": 1, "attention_k_eq_v": true,
  "rms_norm_eps": 1e-6, "max_position_embeddings": 131072
}"#;

/// The full layer's parameters, with its RoPE, and its V norm's epsilon.
fn full_layer() -> (AttentionParams, f64) {
    let layers = hf_layers(GEMMA4).unwrap();
    let full = &layers[1];
    let mut p = full.params().unwrap();
    assert_eq!((p.num_q_heads, p.num_kv_heads, p.head_dim, p.scale), (4, 1, 512, Some(1.0)));
    assert!(full.value_is_key && full.rope);
    let rope = RopeConfig::from_hf_config_json_layer(GEMMA4, Some("full_attention")).unwrap();
    assert!(matches!(rope.scaling, RopeScaling::Proportional { rotated_pairs: 64, .. }), "{:?}", rope.scaling);
    let rot = Rotary::from_schedule(&rope.schedule(None).unwrap(), Layout::Half);
    assert_eq!(rot.rotary_dim, 512);
    assert_eq!(rot.inv_freq.iter().filter(|&&f| f != 0.0).count(), 64);
    p.rope = Some(rot);
    (p, full.v_norm.expect("Gemma 4 normalises V").eps)
}

fn f64s<T: Dtype>(x: &[T]) -> Vec<f64> {
    x.iter().map(|v| v.to_f64()).collect()
}

/// Rows `rows` (token range) of every head of O `[tokens, hq, d]` and of the LSE `[hq, tokens]`.
fn rows_of(o: &[f64], lse: &[f32], tokens: usize, rows: std::ops::Range<usize>, hq: usize, d: usize) -> (Vec<f64>, Vec<f64>) {
    let o = o[rows.start * hq * d..rows.end * hq * d].to_vec();
    let l = (0..hq).flat_map(|h| rows.clone().map(move |t| (h, t))).map(|(h, t)| lse[h * tokens + t] as f64).collect();
    (o, l)
}

/// Same rows, head-major LSE: the LSE of `[hq, n]` for n rows.
fn lse_rows(lse: &[f32]) -> Vec<f64> {
    lse.iter().map(|&x| x as f64).collect()
}

fn agree(what: &'static str, (o, l): (&[f64], &[f64]), (wo, wl): (&[f64], &[f64]), (tol_o, tol_l): (Tolerance, Tolerance)) {
    let rep = CheckReport::compare(what, o, wo, tol_o.times(2.0)).worst(CheckReport::compare(what, l, wl, tol_l.times(2.0)));
    assert!(rep.passed(), "{what}: {rep:?}");
}

/// The full layer end to end in one dtype: Q and K through the QK norm (unweighted here), V as
/// K's projection normalised (dense: `qk_norm_inplace` with no Q; cached: the fused append),
/// then prefill, a paged chunk (16-bit) and a decode, each checked, all agreeing.
fn full_layer_case<T: Dtype>(emu: &Emulator, seed: u64) {
    let (p, eps) = full_layer();
    let (hq, hkv, d) = (p.num_q_heads, p.num_kv_heads, p.head_dim);
    let (n, page, chunk, spec) = (75usize, 16usize, 21usize, 3usize);
    let mut r = rng(seed);
    let (mut q, _) = as_dtype::<T>(&uniform(&mut r, n * hq * d));
    let (raw_k, _) = as_dtype::<T>(&uniform(&mut r, n * hkv * d).iter().map(|x| 3.0 * x).collect::<Vec<f64>>());
    let norm = QkNorm::unweighted(eps, NormScope::Head);
    let mut k = raw_k.clone();
    emu.qk_norm_inplace_checked(&mut q, &mut k, &RopeShape::contiguous(n, hq, hkv, d), &norm).unwrap();
    let mut v = raw_k.clone();
    let v_shape = RopeShape { q_heads: 0, q_row_stride: 0, ..RopeShape::contiguous(n, 0, hkv, d) };
    emu.qk_norm_inplace(&mut [], &mut v, &v_shape, &norm).unwrap();
    let tol = Tolerance::attention::<T>(&p, max_abs(&f64s(&q)), max_abs(&f64s(&k)), max_abs(&f64s(&v)));

    // Prefill of the whole prompt: fused (16-bit) and with pre-rotated keys, each checked.
    let (q_g, k_g, v_g) = (guard(&q), guard(&k), guard(&v));
    let cu = guard(&[0i32, n as i32]);
    let x = FwdInputs { q: &q_g, k: &k_g, v: &v_g, cu_seqlens_q: &cu, cu_seqlens_k: &cu, seq_starts: None };
    let batch = AttentionBatch::single(&p, n, n);
    let mut pre = Vec::new();
    for use_ws in [false, true] {
        if !use_ws && std::mem::size_of::<T>() == 4 {
            continue; // the f32 kernel takes pre-rotated keys only
        }
        let (mut out, mut lse) = (GuardedBuf::filled(n * hq * d, T::default()), GuardedBuf::filled(hq * n, 0f32));
        let mut ws = GuardedBuf::filled(attention_fwd_workspace_len(&p, n), T::default());
        let (path, rep) = emu.attention_fwd_checked(&x, &mut out, &mut lse, &batch, &p, use_ws.then_some(&mut ws[..])).unwrap();
        assert_eq!(path, if use_ws { PrefillPath::PreRotated } else { PrefillPath::Fused });
        assert!(rep.passed() && rep.count > 0, "{} prefill ws={use_ws}: {rep:?}", T::NAME);
        pre.push((f64s(&out), lse.to_vec()));
    }
    let (pre_o, pre_l) = &pre[0];
    if let Some((o2, l2)) = pre.get(1) {
        agree("fused vs pre-rotated prefill", (o2, &lse_rows(l2)), (pre_o, &lse_rows(pre_l)), tol);
    }

    // The cache: K as normalised, V = K's projection normalised by the append.
    let max_pages = n.div_ceil(page);
    let cache = PagedKvCache { num_pages: max_pages + 2, page_size: page, kv_heads: hkv, head_dim: d };
    let table: Vec<i32> = (0..max_pages as i32).map(|i| (i * 3 + 1) % (max_pages as i32 + 2)).collect();
    let (mut kc, mut vc) = (vec![T::default(); cache.len()], vec![T::default(); cache.len()]);
    let slots: Vec<i32> = (0..n).map(|t| table[t / page] * page as i32 + (t % page) as i32).collect();
    let row = hkv * d;
    emu.paged_append_v_normed(&k, &raw_k, &mut kc, &mut vc, &slots, n, row, row, &cache, eps).unwrap();
    let (kc, vc, table_g, lens) = (guard(&kc), guard(&vc), guard(&table), guard(&[n as i32]));

    // A chunk of the prompt's last `chunk` tokens over the cache, split and not.
    let qc = guard(&q[(n - chunk) * hq * d..]);
    let cu_c = guard(&[0i32, chunk as i32]);
    let xp = PagedFwdInputs { q: &qc, cu_seqlens_q: &cu_c, k_cache: &kc, v_cache: &vc, block_table: &table_g, context_lens: &lens };
    let pbatch = PagedPrefillBatch::contiguous(&p, 1, chunk, chunk, max_pages);
    let want = rows_of(pre_o, pre_l, n, n - chunk..n, hq, d);
    // (Paged prefill runs on tensor cores: 16-bit only.)
    for splits in [1usize, 2].into_iter().filter(|_| std::mem::size_of::<T>() == 2) {
        let (mut out, mut lse) = (GuardedBuf::filled(chunk * hq * d, T::default()), GuardedBuf::filled(hq * chunk, 0f32));
        let mut ws = GuardedBuf::filled(paged_prefill_workspace_len(&p, &pbatch, splits), 0f32);
        let rep = emu.attention_fwd_paged_checked(&xp, &mut out, &mut lse, &cache, &pbatch, &p, splits, Some(&mut ws), None).unwrap();
        assert!(rep.passed(), "{} paged chunk splits={splits}: {rep:?}", T::NAME);
        agree("paged chunk vs prefill", (&f64s(&out), &lse_rows(&lse)), (&want.0, &want.1), tol);
    }

    // Speculative decode of the last `spec` tokens, split and not.
    let qd = guard(&q[(n - spec) * hq * d..]);
    let xd = DecodeInputs { q: &qd, k_cache: &kc, v_cache: &vc, block_table: &table_g, context_lens: &lens };
    let dbatch = DecodeBatch::contiguous(&p, 1, spec, max_pages, n);
    let want = rows_of(pre_o, pre_l, n, n - spec..n, hq, d);
    for splits in [1usize, 3] {
        let (mut out, mut lse) = (GuardedBuf::filled(spec * hq * d, T::default()), GuardedBuf::filled(hq * spec, 0f32));
        let mut ws = GuardedBuf::filled(decode_workspace_len(&p, &dbatch, splits), 0f32);
        let rep = emu.attention_decode_checked(&xd, &mut out, &mut lse, &cache, &dbatch, &p, splits, Some(&mut ws)).unwrap();
        assert!(rep.passed(), "{} decode splits={splits}: {rep:?}", T::NAME);
        agree("decode vs prefill", (&f64s(&out), &lse_rows(&lse)), (&want.0, &want.1), tol);
    }
}

#[test]
fn emulated_gemma4_full_layer_prefill_chunk_and_decode_agree() {
    let emu = emulator(512);
    full_layer_case::<bf16>(&emu, 5120);
    full_layer_case::<f16>(&emu, 5121);
    full_layer_case::<f32>(&emu, 5122);
}

/// What head dim 512 does not take, each refused with a typed error before any launch:
/// ReRoPE and Leaky ReRoPE (prefill, paged prefill and decode), a rotation turning more than
/// 128 pairs (attention and the rope kernel alike), and the score-matrix kernel.
#[test]
fn emulated_head_dim_512_refusals() {
    let emu = emulator(513);
    let (mut p, _) = full_layer();
    let (hq, hkv, d, n) = (p.num_q_heads, p.num_kv_heads, p.head_dim, 8usize);
    let q = guard(&vec![bf16::ZERO; n * hq * d]);
    let kv = guard(&vec![bf16::ZERO; n * hkv * d]);
    let cu = guard(&[0i32, n as i32]);
    let x = FwdInputs { q: &q, k: &kv, v: &kv, cu_seqlens_q: &cu, cu_seqlens_k: &cu, seq_starts: None };
    let (mut out, mut lse) = (GuardedBuf::filled(n * hq * d, bf16::ZERO), GuardedBuf::filled(hq * n, 0f32));
    let cache = PagedKvCache { num_pages: 1, page_size: 8, kv_heads: hkv, head_dim: d };
    let (table, lens) = (guard(&[0i32]), guard(&[n as i32]));
    let xd = DecodeInputs { q: &q, k_cache: &kv, v_cache: &kv, block_table: &table, context_lens: &lens };
    let xp = PagedFwdInputs { q: &q, cu_seqlens_q: &cu, k_cache: &kv, v_cache: &kv, block_table: &table, context_lens: &lens };
    let batch = AttentionBatch::single(&p, n, n);
    let dbatch = DecodeBatch::contiguous(&p, 1, 1, 1, n);
    let pbatch = PagedPrefillBatch::contiguous(&p, 1, n, n, 1);
    for relative in [Relative::ReRope { window: 4 }, Relative::Leaky { window: 4, k: 2.0 }] {
        p.relative = relative;
        let mut ws = GuardedBuf::filled(attention_fwd_workspace_len(&p, n), bf16::ZERO);
        let errs = [
            emu.attention_fwd(&x, &mut out, &mut lse, &batch, &p, Some(&mut ws)).unwrap_err(),
            emu.attention_decode(&xd, &mut out, &mut lse, &cache, &dbatch, &p, 1, None).unwrap_err(),
            emu.attention_fwd_paged(&xp, &mut out, &mut lse, &cache, &pbatch, &p, 1, None, None).unwrap_err(),
        ];
        for e in errs {
            assert!(matches!(e, Error::Parameter { name: "relative", .. }), "{relative:?}: {e:?}");
        }
    }
    p.relative = Relative::None;
    // Every pair of the head turning (a default RoPE over 512): the kernels hold 128 frequencies.
    let full = RopeConfig::with_scaling(10000.0, d, d, Some(8192), RopeScaling::Default).unwrap();
    let rot = Rotary::from_schedule(&full.schedule(None).unwrap(), Layout::Half);
    p.rope = Some(rot.clone());
    let e = emu.attention_fwd(&x, &mut out, &mut lse, &batch, &p, None).unwrap_err();
    assert!(matches!(e, Error::Parameter { name: "inv_freq", .. }), "{e:?}");
    let (mut qm, mut km) = (q.to_vec(), kv.to_vec());
    let positions = vec![0i32; n];
    let e = emu.rope_inplace(&mut qm, &mut km, &positions, &RopeShape::contiguous(n, hq, hkv, d), &rot).unwrap_err();
    assert!(matches!(e, Error::Parameter { name: "inv_freq", .. }), "{e:?}");
    // Nothing was written by the refused calls.
    assert!(out.iter().all(|&x| x == bf16::ZERO) && lse.iter().all(|&x| x == 0.0));
    let mut s = GuardedBuf::filled(hq * n * n, 0f32);
    let e = emu.scores(&q, &kv, &mut s, &ScoresShape::contiguous(&p, n, n, 0), &p).unwrap_err();
    assert!(matches!(e, Error::UnsupportedHeadDim { head_dim: 512, .. }), "{e:?}");
}

/// Gemma 4's proportional RoPE turns 64 of the 512-wide head's 256 pairs: the other 192 have
/// frequency 0, and no kernel evaluates an angle for them (kernels/rope.cuh, pair_cs: their
/// (cos, sin) is (1, 0) to the bit). Counted by the emulator on the fused prefill (32 queries
/// over 256 keys, one 32-row Q tile composed from 8 offsets and a base per 8 rows, eight 32-key
/// K tiles rotated in shared memory a pair at a time): a quarter of the sincos evaluations
/// every pair turning would take.
#[test]
fn emulated_head_dim_512_evaluates_no_angle_of_a_pair_that_does_not_turn() {
    let (p, _) = full_layer();
    let (nq, nk, d) = (32usize, 256usize, p.head_dim);
    let p = AttentionParams { num_q_heads: 1, num_kv_heads: 1, ..p };
    let turning = p.rope.as_ref().unwrap().inv_freq.iter().filter(|&&f| f != 0.0).count();
    assert_eq!(turning, 64);
    let emu = emulator(514);
    let one = common::one_head::OneHead::new(514, nq, nk, d);
    let (mut out, mut lse) = (GuardedBuf::filled(nq * d, bf16::ZERO), GuardedBuf::filled(nq, 0f32));
    let x = one.inputs();
    emu.take_work();
    let (path, rep) = emu.attention_fwd_checked(&x, &mut out, &mut lse, &AttentionBatch::single(&p, nq, nk), &p, None).unwrap();
    assert!(path == PrefillPath::Fused && rep.passed(), "{path:?} {rep:?}");
    let w = emu.take_work();
    println!("fused prefill {nq}x{nk} at head_dim 512: {w:?}");
    assert_eq!(w.trig as usize, (8 + nq / 8) * turning + (nk / 32) * 32 * turning);
}
