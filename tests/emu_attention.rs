//! Prefill attention and merge, run by the SIMT emulator (the real kernel source on the CPU)
//! against the f64 reference: the GPU sweep of tests/gpu_attention.rs at emulator-sized
//! lengths. Every head dim, f16/bf16/f32, fused and pre-rotated keys, GQA, causal / window /
//! sinks, ALiBi with a head offset, ReRoPE and Leaky ReRoPE, ragged batches with 1-token
//! sequences, lengths that are multiples of no tile, and rows that see no key (O = 0, lse = -inf).
//! Tolerance (Tolerance::attention): (2·score tolerance + eps_dtype)·max|v| for O, the score tolerance for LSE.
#![cfg(feature = "emulator")]

mod common;

use common::cases::*;
use common::*;
use half::{bf16, f16};
use rope_attn::cuda::{attention_fwd_workspace_len, max_abs, AttentionBatch, CheckReport, Dtype, PrefillPath, Tolerance};
use rope_attn::emulator::{Emulator, FwdInputs, GuardedBuf};
use rope_attn::{reference, Alibi, AttentionParams, Mask, Relative};

/// One varlen problem through the emulated prefill in checked mode; returns the path taken.
fn run<T: Dtype>(emu: &Emulator, p: &AttentionParams, seq_q: &[usize], seq_k: &[usize], seed: u64, use_ws: bool) -> PrefillPath {
    let mut r = rng(seed);
    let (d, hq, hkv) = (p.head_dim, p.num_q_heads, p.num_kv_heads);
    let (cq, ck) = (cu_seqlens(seq_q), cu_seqlens(seq_k));
    let (tq, tk) = (*cq.last().unwrap() as usize, *ck.last().unwrap() as usize);
    let batch = AttentionBatch::contiguous(p, seq_q.len(), *seq_q.iter().max().unwrap(), tq, tk);
    // Every buffer guarded: a kernel access past any end stops the test (the emulator's memcheck).
    let q = guard(&as_dtype::<T>(&uniform(&mut r, tq * hq * d)).0);
    let k = guard(&as_dtype::<T>(&uniform(&mut r, tk * hkv * d)).0);
    let v = guard(&as_dtype::<T>(&uniform(&mut r, tk * hkv * d)).0);
    let mut out = GuardedBuf::filled(tq * hq * d, T::default());
    let mut lse = GuardedBuf::filled(hq * tq, 0f32);
    let mut ws = GuardedBuf::filled(attention_fwd_workspace_len(p, tk), T::default());
    let (cq, ck) = (guard(&cq), guard(&ck));
    let x = FwdInputs { q: &q, k: &k, v: &v, cu_seqlens_q: &cq, cu_seqlens_k: &ck, seq_starts: None };
    let (path, rep) = emu
        .attention_fwd_checked(&x, &mut out, &mut lse, &batch, p, use_ws.then_some(&mut ws[..]))
        .unwrap_or_else(|e| panic!("{} d={d} hq={hq}/{hkv} q={seq_q:?} k={seq_k:?} {:?} {:?} alibi={:?}: {e}", T::NAME, p.relative, p.mask, p.alibi));
    assert!(rep.count > 0);
    path
}

fn sweep<T: Dtype>(seed: u64) -> usize {
    let emu = emulator(seed);
    let mut cases = 0;
    let f32_path = std::mem::size_of::<T>() == 4;
    for (case, d, _name, rot) in dims_and_schedules(full_or_half) {
        let c = prefill_case(case, d, rot, f32_path, Scale::Emulator);
        let path = run::<T>(&emu, &c.p, &c.seq_q, &c.seq_k, seed + case as u64, c.workspace);
        assert_eq!(path, if c.workspace { PrefillPath::PreRotated } else { PrefillPath::Fused });
        cases += 1;
    }
    cases
}

#[test]
fn emulated_prefill_matches_reference_f16() {
    assert_eq!(sweep::<f16>(100), 48);
}

#[test]
fn emulated_prefill_matches_reference_bf16() {
    assert_eq!(sweep::<bf16>(200), 48);
}

#[test]
fn emulated_prefill_matches_reference_f32() {
    assert_eq!(sweep::<f32>(300), 48);
}

/// Learned sinks (GPT-OSS) at their edges, every prefill kernel (fused, pre-rotated wide, the f32
/// rows kernel): a sink far below every score changes nothing, to the bit; one far above them
/// (e^120 overflows f32) leaves O = 0 and the LSE at the sink; a row that sees no key gets O = 0
/// and LSE = its sink's logit exactly; in between, checked mode against the f64 reference.
#[test]
fn emulated_prefill_learned_sink_edges() {
    fn go<T: Dtype>(emu: &Emulator, ws: bool) {
        let (hq, hkv, d) = (4usize, 2usize, 64usize);
        let (seq_q, seq_k) = ([12usize, 70], [5usize, 70]); // sequence 0: 7 queries see no key
        let mut p = AttentionParams::new(hq, hkv, d);
        p.rope = Some(schedules(d, d).remove(0).1);
        let mut r = rng(77);
        let (cq, ck) = (cu_seqlens(&seq_q), cu_seqlens(&seq_k));
        let (tq, tk) = (82, 75);
        let batch = AttentionBatch::contiguous(&p, 2, 70, tq, tk);
        let q = as_dtype::<T>(&uniform(&mut r, tq * hq * d)).0;
        let k = as_dtype::<T>(&uniform(&mut r, tk * hkv * d)).0;
        let v = as_dtype::<T>(&uniform(&mut r, tk * hkv * d)).0;
        let x = FwdInputs { q: &q, k: &k, v: &v, cu_seqlens_q: &cq, cu_seqlens_k: &ck, seq_starts: None };
        let run = |p: &AttentionParams| {
            let (mut out, mut lse) = (vec![T::default(); tq * hq * d], vec![0f32; hq * tq]);
            let mut w = vec![T::default(); attention_fwd_workspace_len(p, tk)];
            let (_, rep) = emu.attention_fwd_checked(&x, &mut out, &mut lse, &batch, p, ws.then_some(&mut w[..])).unwrap();
            assert!(rep.passed(), "{} ws={ws}: {rep:?}", T::NAME);
            (out, lse)
        };
        let (o0, l0) = run(&p);
        let sinks = [-1000.0, 0.5, 120.0, 3.0];
        p.sink_logits = Some(sinks.to_vec());
        let (o1, l1) = run(&p);
        for t in 0..tq {
            let masked = t < 7;
            for (h, &s) in sinks.iter().enumerate() {
                let (o, o_none) = (&o1[(t * hq + h) * d..(t * hq + h + 1) * d], &o0[(t * hq + h) * d..(t * hq + h + 1) * d]);
                let lse = l1[h * tq + t];
                if masked {
                    assert!(o.iter().all(|x| x.to_f64() == 0.0) && lse == s as f32, "row {t} head {h}: lse {lse}");
                } else if h == 0 {
                    assert!(o.iter().zip(o_none).all(|(a, b)| a.to_f64() == b.to_f64()) && lse == l0[h * tq + t], "row {t}: a -1000 sink moved the row");
                } else if h == 2 {
                    assert!(o.iter().all(|x| x.to_f64() == 0.0) && (lse - 120.0).abs() < 1e-4, "row {t}: O {:?}, lse {lse}", o[0].to_f64());
                }
            }
        }
    }
    let emu = emulator(78);
    go::<bf16>(&emu, false);
    go::<f16>(&emu, true);
    go::<f32>(&emu, true);
}

/// The kernels take learned sinks for at most 128 query heads per launch: more is a typed error
/// before any launch (the reference has no such limit).
#[test]
fn emulated_learned_sinks_past_128_heads_are_refused() {
    let (hq, d) = (136usize, 64usize);
    let mut p = AttentionParams::new(hq, 8, d);
    p.sink_logits = Some(vec![0.0; hq]);
    let batch = AttentionBatch::contiguous(&p, 1, 1, 1, 1);
    let (q, kv) = (vec![bf16::ZERO; hq * d], vec![bf16::ZERO; 8 * d]);
    let cu = [0, 1];
    let x = FwdInputs { q: &q, k: &kv, v: &kv, cu_seqlens_q: &cu, cu_seqlens_k: &cu, seq_starts: None };
    let (mut out, mut lse) = (vec![bf16::ZERO; hq * d], vec![0f32; hq]);
    let e = emulator(0).attention_fwd(&x, &mut out, &mut lse, &batch, &p, None).unwrap_err();
    assert!(matches!(e, rope_attn::Error::Shape { what: "sink_logits", .. }), "{e}");
    assert!(lse.iter().all(|&l| l == 0.0), "nothing launched");
}

/// No position encoding, and plain RoPE through both paths, over a few hundred keys; then 4096
/// tokens (64 query tiles, many rescalings of the online softmax) with RoPE and ALiBi, fused.
#[test]
fn emulated_prefill_longer_sequences() {
    let emu = emulator(0);
    for (i, &n) in [191usize, 256, 300, 4096].iter().enumerate() {
        let mut p = AttentionParams::new(1, 1, 128);
        if i > 0 {
            p.rope = Some(schedules(128, 128).remove(6).1);
        }
        if i == 3 {
            p.alibi = Some(Alibi { total_heads: 4, head_offset: 3 });
        }
        run::<bf16>(&emu, &p, &[n], &[n], 7 + i as u64, i == 2);
    }
}

/// merge((O1, lse1), (O2, lse2)) over the two halves of the keys equals attention over all of them;
/// the halves are run at their true key positions (attention_fwd_at), as ring attention does.
#[test]
fn emulated_key_blocks_at_their_positions_merge_to_the_whole() {
    let emu = emulator(0);
    let (n, nq, split, h, d) = (150usize, 40usize, 70usize, 2usize, 64usize);
    let q0 = n - nq;
    let mut p = AttentionParams::new(h, h, d);
    p.rope = Some(schedules(d, d).remove(5).1);
    p.alibi = Some(Alibi { total_heads: h, head_offset: 0 });
    let mut r = rng(66);
    let (q, qf) = as_dtype::<bf16>(&uniform(&mut r, nq * h * d));
    let (k, kf) = as_dtype::<bf16>(&uniform(&mut r, n * h * d));
    let (v, vf) = as_dtype::<bf16>(&uniform(&mut r, n * h * d));
    let q = guard(&q);
    let mut parts = Vec::new();
    for (a, b) in [(0usize, split), (split, n)] {
        let (cq, ck) = (guard(&[0i32, nq as i32]), guard(&[0i32, (b - a) as i32]));
        let starts = guard(&[q0 as i32, a as i32]);
        let (kb, vb) = (guard(&k[a * h * d..b * h * d]), guard(&v[a * h * d..b * h * d]));
        let x = FwdInputs { q: &q, k: &kb, v: &vb, cu_seqlens_q: &cq, cu_seqlens_k: &ck, seq_starts: Some(&starts) };
        let (mut o, mut l) = (GuardedBuf::filled(nq * h * d, bf16::ZERO), GuardedBuf::filled(nq * h, 0f32));
        emu.attention_fwd(&x, &mut o, &mut l, &AttentionBatch::single(&p, nq, b - a), &p, None).unwrap();
        // merge_states takes LSE [heads, tokens] and O [tokens, heads, d]: as the kernel wrote them.
        parts.push((o, l));
    }
    let (mut out, mut lse) = (GuardedBuf::filled(nq * h * d, bf16::ZERO), GuardedBuf::filled(nq * h, 0f32));
    emu.merge_states([(&parts[0].0, &parts[0].1), (&parts[1].0, &parts[1].1)], &mut out, &mut lse, nq, h, d).unwrap();
    let q_pos: Vec<i64> = (q0 as i64..n as i64).collect();
    let k_pos: Vec<i64> = (0..n as i64).collect();
    let want = reference::attention(&qf, &kf, &vf, &q_pos, &k_pos, &p).unwrap();
    let got_o: Vec<f64> = out.iter().map(|x| x.to_f64()).collect();
    let got_l: Vec<f64> = lse.iter().map(|&x| x as f64).collect();
    // Two roundings to bf16 (each block's O, then the merged O): twice the attention tolerance.
    let (tol_o, tol_l) = Tolerance::attention::<bf16>(&p, max_abs(&qf), max_abs(&kf), max_abs(&vf));
    let rep = CheckReport::compare("merged out", &got_o, &want.out, tol_o.times(2.0))
        .worst(CheckReport::compare("merged lse", &got_l, &want.lse, tol_l.times(2.0)));
    assert!(rep.passed(), "{rep:?}");
}

/// Q, K and V as views into one packed QKV projection `[tokens, (Hq + 2·Hkv)·d]` and O written
/// into a wider buffer: the row strides a server passes without copying. Both key paths.
#[test]
fn emulated_prefill_on_packed_qkv_views() {
    let emu = emulator(0);
    let (hq, hkv, d) = (8usize, 2usize, 64usize);
    let mut p = AttentionParams::new(hq, hkv, d);
    p.rope = Some(schedules(d, d).remove(6).1);
    p.alibi = Some(Alibi { total_heads: hq, head_offset: 0 });
    let seqs = [37usize, 70];
    let total: usize = seqs.iter().sum();
    let row = (hq + 2 * hkv) * d;
    let (packed, _) = as_dtype::<f16>(&uniform(&mut rng(88), total * row));
    let packed = guard(&packed);
    let (q, k, v) = (&packed[..], &packed[hq * d..], &packed[(hq + hkv) * d..]);
    let o_stride = hq * d + 32;
    let cu = guard(&cu_seqlens(&seqs));
    let batch = AttentionBatch {
        batch: 2,
        max_seqlen_q: 70,
        total_q: total,
        total_k: total,
        q_row_stride: row,
        k_row_stride: row,
        v_row_stride: row,
        o_row_stride: o_stride,
    };
    // The same queries once more from rows that do not start on 16-byte boundaries (one element
    // into a buffer, odd row stride): the kernels then load Q a pair at a time instead of by
    // cp.async and rotating in shared memory, and must give the same bits.
    let odd = row + 1;
    let mut qo = vec![f16::ZERO; 1 + total * odd];
    for t in 0..total {
        qo[1 + t * odd..1 + t * odd + hq * d].copy_from_slice(&packed[t * row..t * row + hq * d]);
    }
    let qo = guard(&qo);
    for use_ws in [false, true] {
        let mut outs = Vec::new();
        for (qv, q_row_stride) in [(q, row), (&qo[1..], odd)] {
            let batch = AttentionBatch { q_row_stride, ..batch };
            let mut out = GuardedBuf::filled((total - 1) * o_stride + hq * d, f16::ZERO);
            let mut lse = GuardedBuf::filled(hq * total, 0f32);
            let mut ws = GuardedBuf::filled(attention_fwd_workspace_len(&p, total), f16::ZERO);
            let x = FwdInputs { q: qv, k, v, cu_seqlens_q: &cu, cu_seqlens_k: &cu, seq_starts: None };
            let (path, rep) = emu.attention_fwd_checked(&x, &mut out, &mut lse, &batch, &p, use_ws.then_some(&mut ws[..])).unwrap();
            assert_eq!(path, if use_ws { PrefillPath::PreRotated } else { PrefillPath::Fused });
            assert!(rep.count > 0);
            outs.push((out.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), lse.iter().map(|x| x.to_bits()).collect::<Vec<_>>()));
        }
        assert!(outs[0] == outs[1], "workspace {use_ws}: misaligned Q rows give other results");
    }
}

/// A chunked prefill (64 new queries against 1024 cached keys) on the fused path: K tiles and the
/// Q tile are rotated by composition (kernels/tile.cuh), so the trigonometry per key and rotation
/// pair stays far below the one sincos a direct rotation costs — counted by the emulator.
#[test]
fn emulated_fused_prefill_does_little_trigonometry_per_key() {
    let (nq, nk, d) = (64usize, 1024usize, 128usize);
    let mut p = AttentionParams::new(1, 1, d);
    p.rope = Some(schedules(d, d).remove(6).1);
    let emu = emulator(10);
    let one = common::one_head::OneHead::new(10, nq, nk, d);
    let (mut out, mut lse) = (GuardedBuf::filled(nq * d, bf16::ZERO), GuardedBuf::filled(nq, 0f32));
    let x = one.inputs();
    let (path, _) = emu.attention_fwd_checked(&x, &mut out, &mut lse, &AttentionBatch::single(&p, nq, nk), &p, None).unwrap();
    assert_eq!(path, PrefillPath::Fused);
    let w = emu.take_work();
    let pairs = (nk * d / 2) as f64;
    println!("fused prefill {nq}x{nk}: {w:?}, {:.3} sincos per key and pair", w.trig as f64 / pairs);
    assert!((w.trig as f64) < pairs / 4.0, "{} sincos for {pairs} key-pairs", w.trig);
    // Exactly: the K offsets and steps (8 of each per pair) once, one exact base per pair and
    // 64-key tile (each of the 128 threads computes its pair's: two a pair at head_dim 128; the
    // tile's other bases are steps from it), and Q composed from 8 offsets and a base per 8 of
    // the tile's 64 rows: no angle evaluated per element.
    let half = d / 2;
    assert_eq!(w.trig as usize, 8 * half + 8 * half + (nk / 64) * 128 + (8 + nq / 8) * half);
    // QKᵀ and PV on tensor cores: (64/16 row tiles) x (1024/8 key tiles) x (128/16) k-steps, and as many for PV.
    assert_eq!(w.mma as usize, 2 * (nq / 16) * (nk / 8) * (d / 16));
    // Q rows off 16-byte boundaries take the other Q load (a pair at a time from global memory),
    // composed from the same tables: the same trigonometry.
    let mut qo = vec![bf16::ZERO; 1 + nq * d];
    qo[1..].copy_from_slice(&one.q[..]);
    let qo = guard(&qo);
    let x = FwdInputs { q: &qo[1..], ..x };
    emu.attention_fwd_checked(&x, &mut out, &mut lse, &AttentionBatch::single(&p, nq, nk), &p, None).unwrap();
    assert_eq!(emu.take_work().trig, w.trig, "misaligned Q");
}

/// Prefill with keys ready in memory (pre-rotated, or no RoPE) and more queries than a narrow
/// tile takes the wide kernel (128 query rows, 64 at head_dim 256): every head dim and both
/// 16-bit dtypes, GQA, each mask, ALiBi, sequences that are multiples of no tile, a 1-token one,
/// and causal rows that see no key.
#[test]
fn emulated_wide_tiles_every_head_dim() {
    let emu = emulator(20);
    for (i, &d) in rope_attn::cuda::SUPPORTED_HEAD_DIMS.iter().enumerate() {
        let mut p = AttentionParams::new(4, 2, d);
        p.mask = [
            Mask { causal: true, window: None, sinks: 0, chunk: None },
            Mask { causal: true, window: Some(50), sinks: 3, chunk: None },
            Mask { causal: false, window: None, sinks: 0, chunk: None },
        ][i % 3];
        p.alibi = (i % 2 == 0).then_some(Alibi { total_heads: 8, head_offset: 4 });
        // No RoPE (the plain path) on odd head dims, the pre-rotated path on the others.
        p.rope = (i % 2 == 0).then(|| schedules(d, d).remove(i % 8).1);
        let want = if p.rope.is_some() { PrefillPath::PreRotated } else { PrefillPath::Plain };
        let (seq_q, seq_k) = ([130usize, 1, 257], [100usize, 5, 300]);
        assert_eq!(run::<bf16>(&emu, &p, &seq_q, &seq_k, 20 + i as u64, true), want, "d={d}");
        assert_eq!(run::<f16>(&emu, &p, &seq_q, &seq_k, 30 + i as u64, true), want, "d={d}");
    }
}

/// What the wide tile buys, counted: the same problem through the narrow kernel (fused path)
/// and the wide one (pre-rotated) does the same mma.sync work, while every K and V fragment
/// loaded from shared memory feeds two row blocks. The ldmatrix bytes follow each kernel's
/// tiling exactly: per warp and key tile, MB·d/16 Q loads and (BN/16)·(d/16) for K and for V,
/// 512 bytes each. Tiles (query rows, keys, warps, row blocks per warp), from
/// kernels/attention_fwd.cu: narrow 64/64/4/1 (256: 32/32/2/1); wide 128/64/4/2 (256: 64/64/4/1;
/// at head_dim 128 sm_80 takes 48 keys, which the emulator runs for f16, and 64 for bf16).
#[test]
fn emulated_wide_tiles_halve_fragment_traffic() {
    let (nq, nk) = (256usize, 768usize); // multiples of every tile here
    let ldsm = |(bm, bn, warps, mb): (usize, usize, usize, usize), d: usize| {
        512 * (nq / bm) * (nk / bn) * warps * (mb * d / 16 + 2 * (bn / 16) * (d / 16))
    };
    fn works<T: Dtype>(d: usize) -> [rope_attn::emulator::Work; 2] {
        let (nq, nk) = (256usize, 768usize);
        let mut p = AttentionParams::new(1, 1, d);
        p.mask = Mask { causal: false, window: None, sinks: 0, chunk: None };
        p.rope = Some(schedules(d, d).remove(6).1);
        let emu = emulator(21);
        [(false, PrefillPath::Fused), (true, PrefillPath::PreRotated)].map(|(use_ws, want)| {
            assert_eq!(run::<T>(&emu, &p, &[nq], &[nk], 40 + d as u64, use_ws), want);
            emu.take_work()
        })
    }
    let narrow = (64, 64, 4, 1);
    for (d, dtype, [w_narrow, w_wide], narrow, wide) in [
        (64, "bf16", works::<bf16>(64), narrow, (128, 64, 4, 2)),
        (128, "bf16", works::<bf16>(128), narrow, (128, 64, 4, 2)),
        (128, "f16", works::<f16>(128), narrow, (128, 48, 4, 2)),
        (256, "bf16", works::<bf16>(256), (32, 32, 2, 1), (64, 64, 4, 1)),
    ] {
        println!("d={d} {dtype}: narrow {w_narrow:?}\n      wide {w_wide:?}");
        let mmas = 2 * (nq / 16) * (nk / 8) * (d / 16);
        assert_eq!(w_narrow.mma as usize, mmas, "d={d}");
        assert_eq!(w_wide.mma as usize, mmas, "d={d}");
        assert_eq!(w_narrow.ldmatrix_bytes as usize, ldsm(narrow, d), "d={d} {dtype}");
        // The pre-rotated call also launches the rope kernel, which uses no ldmatrix.
        assert_eq!(w_wide.ldmatrix_bytes as usize, ldsm(wide, d), "d={d} {dtype}");
    }
}

/// attention_fwd_at on every key path — fused, pre-rotated, ReRoPE and Leaky ReRoPE (which
/// pre-rotate keys at the positions seq_starts gives, through the rope kernel) — for a varlen
/// batch of chunks far along their sequences, against the reference at the same positions.
#[test]
fn emulated_prefill_at_explicit_positions_all_paths() {
    let (hq, hkv, d) = (4usize, 2usize, 64usize);
    // 70 queries: more than a narrow tile, so the pre-rotated path runs the wide kernel.
    let (seq_q, seq_k) = ([70usize, 5], [90usize, 70]);
    let starts = [1000i32, 980, 100_000, 99_940]; // (first query, first key) per sequence
    let mut r = rng(12);
    let (tq, tk) = (75usize, 160usize);
    let (q, qf) = as_dtype::<bf16>(&uniform(&mut r, tq * hq * d));
    let (k, kf) = as_dtype::<bf16>(&uniform(&mut r, tk * hkv * d));
    let (v, vf) = as_dtype::<bf16>(&uniform(&mut r, tk * hkv * d));
    let (qg, kg, vg) = (guard(&q), guard(&k), guard(&v));
    let (cq, ck, sg) = (guard(&cu_seqlens(&seq_q)), guard(&cu_seqlens(&seq_k)), guard(&starts));
    for (relative, ws) in [
        (Relative::None, false),
        (Relative::None, true),
        (Relative::ReRope { window: 12 }, true),
        (Relative::Leaky { window: 6, k: 3.0 }, true),
    ] {
        let mut p = AttentionParams::new(hq, hkv, d);
        p.rope = Some(schedules(d, d).remove(3).1); // dynamic NTK
        p.relative = relative;
        p.alibi = Some(Alibi { total_heads: hq, head_offset: 0 });
        let batch = AttentionBatch::contiguous(&p, 2, 70, tq, tk);
        let (mut out, mut lse) = (GuardedBuf::filled(tq * hq * d, bf16::ZERO), GuardedBuf::filled(hq * tq, 0f32));
        let mut w = GuardedBuf::filled(attention_fwd_workspace_len(&p, tk), bf16::ZERO);
        let x = FwdInputs { q: &qg, k: &kg, v: &vg, cu_seqlens_q: &cq, cu_seqlens_k: &ck, seq_starts: Some(&sg) };
        let path = emulator(12).attention_fwd(&x, &mut out, &mut lse, &batch, &p, ws.then_some(&mut w[..])).unwrap();
        assert_eq!(path, if ws { PrefillPath::PreRotated } else { PrefillPath::Fused });
        let (tol_o, tol_l) = Tolerance::attention::<bf16>(&p, max_abs(&qf), max_abs(&kf), max_abs(&vf));
        let (mut q0, mut k0) = (0usize, 0usize);
        for b in 0..2 {
            let (nq, nk) = (seq_q[b], seq_k[b]);
            let q_pos: Vec<i64> = (0..nq as i64).map(|m| starts[2 * b] as i64 + m).collect();
            let k_pos: Vec<i64> = (0..nk as i64).map(|j| starts[2 * b + 1] as i64 + j).collect();
            let want = reference::attention(&qf[q0 * hq * d..(q0 + nq) * hq * d], &kf[k0 * hkv * d..(k0 + nk) * hkv * d], &vf[k0 * hkv * d..(k0 + nk) * hkv * d], &q_pos, &k_pos, &p).unwrap();
            let got_o: Vec<f64> = out[q0 * hq * d..(q0 + nq) * hq * d].iter().map(|x| x.to_f64()).collect();
            let got_l: Vec<f64> = (0..hq).flat_map(|h| (0..nq).map(move |m| (h, m))).map(|(h, m)| lse[h * tq + q0 + m] as f64).collect();
            let rep = CheckReport::compare("out", &got_o, &want.out, tol_o).worst(CheckReport::compare("lse", &got_l, &want.lse, tol_l));
            assert!(rep.passed(), "{relative:?} workspace {ws} sequence {b}: {rep:?}");
            q0 += nq;
            k0 += nk;
        }
    }
}

/// The softmax forms the prefill picks per key tile (kernels/attention_fwd.cu, SoftmaxKind):
/// fully visible tiles without ALiBi fold the scale into the exponent (scale > 0 only), fully
/// visible tiles on one side of the diagonal take ALiBi as a bias linear in j (slope·(j - i)
/// below it, -slope·(j - i) above it), and every other tile masks per element. Non-causal
/// sequences long enough for tiles above, below and across the diagonal, for the wide kernel
/// (pre-rotated) and the narrow one (fused), with ALiBi and without, and the scales the folded
/// form must not take (negative, zero; at -6 its max would overflow); and causal ones under a window with sinks, where the
/// visible tiles run from the diagonal backwards past hidden ones to the sinks.
#[test]
fn emulated_prefill_softmax_forms() {
    let emu = emulator(30);
    let (seq_q, seq_k) = ([200usize, 33], [300usize, 70]);
    for (i, (causal, window, alibi, scale)) in [
        (false, None, true, None),
        (false, None, false, None),
        (false, None, false, Some(-0.1)),
        (false, None, false, Some(0.0)),
        (false, None, true, Some(-0.2)),
        (false, None, false, Some(-6.0)),
        (true, Some(120), true, None),
        (true, Some(90), false, None),
    ]
    .into_iter()
    .enumerate()
    {
        let mut p = AttentionParams::new(4, 2, 64);
        p.mask = Mask { causal, window, sinks: if window.is_some() { 5 } else { 0 }, chunk: None };
        p.alibi = alibi.then_some(Alibi { total_heads: 8, head_offset: 2 });
        p.scale = scale;
        p.rope = Some(schedules(64, 64).remove(i % 8).1);
        assert_eq!(run::<bf16>(&emu, &p, &seq_q, &seq_k, 50 + i as u64, true), PrefillPath::PreRotated, "case {i}");
        assert_eq!(run::<f16>(&emu, &p, &seq_q, &seq_k, 60 + i as u64, false), PrefillPath::Fused, "case {i}");
    }
}

/// A batch's last key tile can fall short of a whole tile by fewer rows than one copy pass
/// covers (61 of 64 keys, 47 of 48): its copy must still stop at the last key, not run the
/// whole-tile copy over rows past the buffer's end (every buffer ends at its last row, guarded).
/// Narrow and wide tiles, fused and pre-rotated keys.
#[test]
fn emulated_prefill_last_partial_tile_reads_nothing_past_the_end() {
    let emu = emulator(31);
    let mut p = AttentionParams::new(4, 2, 128);
    p.rope = Some(schedules(128, 128).remove(0).1);
    // bf16: wide 64-key tiles (61 = 64 - 3), narrow (61); f16: narrow (61), wide 48-key tiles (95 = 48 + 47).
    for (seq, bf16_too, f16_too) in [(vec![70usize, 61], true, false), (vec![61], true, true), (vec![70, 95], false, true)] {
        for use_ws in [false, true] {
            if bf16_too {
                run::<bf16>(&emu, &p, &seq, &seq, 31, use_ws);
            }
            if f16_too {
                run::<f16>(&emu, &p, &seq, &seq, 31, use_ws);
            }
        }
    }
}

/// Proportional RoPE (LFM3's full layers: half of the pairs turning across the whole head, the
/// rest at frequency 0) in the prefill kernels, both key paths, f16 and bf16, with the layer as
/// `hf_layers` and `RopeConfig` read it from an LFM3 config, against the reference (checked mode).
#[test]
fn emulated_prefill_with_proportional_rope() {
    let emu = emulator(0);
    let json = r#"{"model_type": "lfm3", "hidden_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 128,
        "num_hidden_layers": 3, "sliding_window": 96, "rope_parameters": {"full_attention": {"rope_type": "proportional",
        "rope_theta": 1000000.0, "partial_rotary_factor": 0.5}, "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}}"#;
    let layer = rope_attn::hf_layers(json).unwrap()[2];
    assert_eq!(layer.attention, rope_attn::LayerAttention::Full);
    let sched = rope_attn::RopeConfig::from_hf_config_json_layer(json, Some("full_attention")).unwrap().schedule(None).unwrap();
    assert_eq!((sched.rotary_dim, sched.inv_freq.iter().filter(|&&f| f == 0.0).count()), (128, 32));
    let mut p = layer.params().unwrap();
    p.rope = Some(rope_attn::Rotary::from_schedule(&sched, rope_attn::Layout::Half));
    for (i, &n) in [37usize, 150].iter().enumerate() {
        run::<bf16>(&emu, &p, &[n], &[n], 80 + i as u64, i == 1);
        run::<f16>(&emu, &p, &[n], &[n], 90 + i as u64, i == 0);
    }
}
