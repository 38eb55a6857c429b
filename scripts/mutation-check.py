#!/usr/bin/env python3
"""Plant real kernel bugs, one at a time, and check that the emulated test suites catch each.

The SIMT emulator (feature `emulator`) is only worth its CI time if a broken kernel fails it:
a dropped barrier or cp.async wait, a wrong fragment address, a mask off by one, an
out-of-bounds read, a missing clamp of device-side offsets. Each mutation below is applied to
the kernel source, the named test is run, and the mutation must make it fail; the file is then
restored. Exit status 1 if any mutation survives.

    python3 scripts/mutation-check.py            # all (each rebuilds the kernels: ~1 min apiece)
    python3 scripts/mutation-check.py decode     # those whose name contains "decode"
    python3 scripts/mutation-check.py racecheck  # the races only the feature `racecheck` sees
"""
import pathlib
import signal
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent

# (name, file, text to replace, replacement, test target, test name filter)
MUTATIONS = [
    ("prefill: no cp.async wait before V is read", "kernels/attention_fwd.cu",
     "        cp_async_wait<0>();\n        __syncthreads();  // V_n landed", "        __syncthreads();  // V_n landed",
     "emu_attention", "emulated_prefill_matches_reference_f16"),
    ("prefill: no barrier before P·V", "kernels/attention_fwd.cu",
     "        __syncthreads();  // V_n landed", "        // V_n landed",
     "emu_attention", "emulated_prefill_matches_reference_f16"),
    ("prefill: no barrier before QKᵀ", "kernels/attention_fwd.cu",
     "        __syncthreads();  // K_n landed", "        // K_n landed",
     "emu_attention", "emulated_prefill_matches_reference_f16"),
    ("prefill: no barrier after the in-smem K rotation", "kernels/attention_fwd.cu",
     "ROT_K_LEAKY, kp + j0);\n            __syncthreads();",
     "ROT_K_LEAKY, kp + j0);",
     "emu_attention", "emulated_prefill_matches_reference_f16"),
    ("prefill: Q ldmatrix misses its column half", "kernels/attention_fwd.cu",
     "* LD + kk + (lane / 16) * 8;", "* LD + kk;",
     "emu_attention", "emulated_prefill_matches_reference_bf16"),
    ("prefill: row max skips a lane pair", "kernels/attention_fwd.cu",
     "                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));", "",
     "emu_attention", "emulated_prefill_matches_reference_f16"),
    ("wide prefill: the second row block's Q rows are the first's", "kernels/attention_fwd.cu",
     "const int arow = ((mb * WARPS + warp) * 16", "const int arow = (warp * 16",
     "emu_attention", "emulated_wide_tiles_every_head_dim"),
    ("wide prefill: P·V uses the first row block's P for both", "kernels/attention_fwd.cu",
     "mma_16816<T>(o[mb][2 * np + 1], pa[mb][kk], bv[2], bv[3]);", "mma_16816<T>(o[mb][2 * np + 1], pa[0][kk], bv[2], bv[3]);",
     "emu_attention", "emulated_wide_tiles_every_head_dim"),
    ("prefill fast: linear ALiBi with the below-diagonal sign above it too", "kernels/attention_fwd.cu",
     "const float sigma = below || p.causal ? slope_log2 : -slope_log2;", "const float sigma = slope_log2;",
     "emu_attention", "emulated_prefill_softmax_forms"),
    ("prefill edge: causal ALiBi with the above-diagonal sign", "kernels/attention_fwd.cu",
     "const float sigma = below || p.causal ? slope_log2", "const float sigma = below ? slope_log2",
     "emu_attention", "emulated_prefill_softmax_forms"),
    ("prefill edge: the row's own key masked", "kernels/attention_fwd.cu",
     "nt * 8 + (c & 1) <= edge ?", "nt * 8 + (c & 1) < edge ?",
     "emu_attention", "emulated_prefill_softmax_forms"),
    ("prefill edge: keys past the end of the sequence visible", "kernels/attention_fwd.cu",
     "imin(vk - 1, p.causal ? i - kp - j0 : BN)", "(p.causal ? i - kp - j0 : BN)",
     "emu_attention", "emulated_prefill_softmax_forms"),
    ("prefill edge: taken where the window hides keys", "kernels/attention_fwd.cu",
     "!rel && tile_window_free(mask, i0 + vq, kp + j0, kp + j0 + BN) &&", "!rel &&",
     "emu_attention", "emulated_prefill_softmax_forms"),
    ("prefill edge: taken with ALiBi on both sides of the diagonal", "kernels/attention_fwd.cu",
     "(slope_log2 == 0.f || p.causal || below || above)", "true",
     "emu_attention", "emulated_prefill_softmax_forms"),
    ("prefill fast: linear ALiBi one key off", "kernels/attention_fwd.cu",
     "static_cast<float>(kp + j0 + 2 * t - i)", "static_cast<float>(kp + j0 + 2 * t - i + 1)",
     "emu_attention", "emulated_prefill_softmax_forms"),
    ("prefill fast: plain form exponentiates the unscaled score", "kernels/attention_fwd.cu",
     "ex2(fmaf(x, p.scale_log2, -m_use))", "ex2(x - m_use)",
     "emu_attention", "emulated_prefill_softmax_forms"),
    ("prefill fast: plain form taken for a negative scale", "kernels/attention_fwd.cu",
     "slope_log2 == 0.f && p.scale_log2 > 0.f)", "slope_log2 == 0.f)",
     "emu_attention", "emulated_prefill_softmax_forms"),
    ("prefill fast: O rescaled only when lane 0's rows grew", "kernels/attention_fwd.cu",
     "if (__any_sync(0xffffffffu, grew)) {", "if (__shfl_sync(0xffffffffu, grew ? 1.f : 0.f, 0) != 0.f) {",
     "emu_attention", "emulated_prefill_softmax_forms"),
    ("prefill fast: the diagonal tile is never visited", "kernels/attention_fwd.cu",
     "int n = prev_tile(n_end - 1);", "int n = prev_tile(n_end - 2);",
     "emu_attention", "emulated_prefill_softmax_forms"),
    ("prefill fast: stepped tile copy reads the row past the end", "kernels/attention_fwd.cu",
     "cp_async_16(dst + k * STEP * LD, ok ? src : g, ok);", "cp_async_16(dst + k * STEP * LD, src, r0 + k * STEP <= valid);",
     "emu_attention", "emulated_prefill_matches_reference_bf16"),
    ("prefill fast: a partial tile copied as a whole one", "kernels/attention_fwd.cu",
     "if (RA_PROBE_COPY || valid >= ROWS) {", "if (RA_PROBE_COPY || valid >= ROWS - STEP) {",
     "emu_attention", "emulated_prefill_last_partial_tile_reads_nothing_past_the_end"),
    ("prefill fast: a partial tile's last rows not zero-filled", "kernels/attention_fwd.cu",
     "            const bool ok = r0 + k * STEP < valid;\n            cp_async_16(dst + k * STEP * LD, ok ? src : g, ok);",
     "            const bool ok = r0 + k * STEP < valid;\n            if (ok) cp_async_16(dst + k * STEP * LD, src, ok);",
     "emu_attention", "emulated_prefill_matches_reference_bf16"),
    ("prefill: Q angles evaluated per element, not composed", "kernels/attention_fwd.cu",
     "ROT_POS, i0, q_off, q_base);", "ROT_POS, i0);",
     "emu_attention", "emulated_fused_prefill_does_little_trigonometry_per_key"),
    ("prefill: Q rotated before its tables are written", "kernels/attention_fwd.cu",
     "    __syncthreads();  // the tables are written; the Q tile landed\n", "",
     "emu_attention", "emulated_prefill_matches_reference_bf16"),
    ("prefill: the Q tile's copies not waited for", "kernels/attention_fwd.cu",
     "    if (q_vec) cp_async_wait<0>();\n", "",
     "emu_attention", "emulated_prefill_matches_reference_bf16"),
    ("prefill f32: no __syncwarp before the Q rotation", "kernels/attention_fwd.cu",
     "        __syncwarp();\n        for (int pr", "        for (int pr",
     "emu_attention", "emulated_prefill_matches_reference_f32"),
    ("composed rotation: wrong offset row", "kernels/tile.cuh",
     "off[(row % ROT_SUB) * pitch + pr]", "off[((row + 1) % ROT_SUB) * pitch + pr]",
     "emu_attention", "emulated_prefill_matches_reference_bf16"),
    ("composed tile rotation, vector path: wrong offset row", "kernels/tile.cuh",
     "off + (row % ROT_SUB) * pitch + p0", "off + ((row + 1) % ROT_SUB) * pitch + p0",
     "emu_attention", "emulated_prefill_matches_reference_bf16"),
    ("composed tile rotation, vector path: an item step misses its row carry", "kernels/tile.cuh",
     "if (grp >= per_row) grp -= per_row, ++row;", "if (grp >= per_row) grp -= per_row;",
     "emu_attention", "emulated_prefill_matches_reference_f16"),
    ("composed tile rotation, vector path: interleaved pairs turned backwards", "kernels/tile.cuh",
     "rotate_pair(v[2 * j], v[2 * j + 1], cs[j].x, cs[j].y);", "rotate_pair(v[2 * j], v[2 * j + 1], cs[j].x, -cs[j].y);",
     "emu_attention", "emulated_prefill_matches_reference_bf16"),
    ("decode mma: partial rotary keys rotated in place from the wrong tables' rows", "kernels/attention_decode_mma.cu",
     "else rotate_rows_composed(Kw, LD, BT, ra, Off, Base, H2, lane, 32);", "else rotate_rows_composed(Kw, LD, BT, ra, Off, Base, H2 / 2, lane, 32);",
     "emu_decode", "emulated_decode_matches_reference_bf16"),
    ("stepped bases: every sharing thread takes the same bases", "kernels/tile.cuh",
     "for (int s = threadIdx.x / half; s < n; s += share)", "for (int s = 0; s < n; s += share)",
     "emu_attention", "emulated_prefill_matches_reference_bf16"),
    ("stepped bases: the steps one row on", "kernels/tile.cuh",
     "fill_rotation_table(step, a, 0, ROT_SUB, n, 1.f);", "fill_rotation_table(step, a, ROT_SUB, ROT_SUB, n, 1.f);",
     "emu_attention", "emulated_prefill_matches_reference_bf16"),
    ("mask: causal off by one", "kernels/mask.cuh",
     "if (m.causal && j > i) return false;", "if (m.causal && j > i + 1) return false;",
     "emu_attention", "emulated_prefill_matches_reference_f16"),
    ("tile loader reads one row too many", "kernels/attention.cuh",
     "const bool ok = row < valid;", "const bool ok = row < valid + 1;",
     "emu_attention", "emulated_prefill_matches_reference_f16"),
    ("cu_seqlens not clamped", "kernels/attention.cuh",
     "    s.q_start = imin(imax(p.cu_seqlens_q[b], 0), p.total_q);\n    s.seqlen_q = imin(imax(p.cu_seqlens_q[b + 1], s.q_start), p.total_q) - s.q_start;",
     "    s.q_start = p.cu_seqlens_q[b];\n    s.seqlen_q = p.cu_seqlens_q[b + 1] - s.q_start;",
     "emu_corrupt_inputs", "prefill"),
    ("scores: no barrier between the near and far passes", "kernels/scores.cu",
     "if (pass == 1) __syncthreads();", "",
     "emu_rope_scores", "emulated_scores"),
    ("scores: no barrier after loading the tiles", "kernels/scores.cu",
     "        load_rotated_tile(Ks, ld, k, p.k_row_stride, BM, vk, D, p.rope, kmode, n0);\n        __syncthreads();",
     "        load_rotated_tile(Ks, ld, k, p.k_row_stride, BM, vk, D, p.rope, kmode, n0);",
     "emu_rope_scores", "emulated_scores"),
    ("rope: no barrier after the cos/sin table", "kernels/rope.cu",
     "    __syncthreads();\n\n    const int D = p.head_dim;", "\n    const int D = p.head_dim;",
     "emu_rope_scores", "emulated_rope_matches"),
    # The f32 decode kernel (CUDA cores, attention_decode.cu): only the f32 sweep runs it.
    ("rope: the 16-byte rotate_half kernel pairs components as interleaved", "kernels/rope.cu",
     "rope_half_v8_##NAME, ra::RopeParams) { ra::rope_body<T, false, 8>(p); }",
     "rope_half_v8_##NAME, ra::RopeParams) { ra::rope_body<T, true, 4>(p); }",
     "emu_rope_scores", "emulated_rope_matches"),
    ("decode f32: no barrier after loading Q and the offset table", "kernels/attention_decode.cu",
     "    __syncthreads();  // the only barrier before the end: the warps now run independently\n", "",
     "emu_decode", "emulated_decode_matches_reference_f32"),
    ("decode f32: no __syncwarp after the tile's copies land", "kernels/attention_decode.cu",
     "        __syncwarp();  // ... and every lane's; the bases are written\n", "",
     "emu_decode", "emulated_decode_matches_reference_f32"),
    # (Dropping the __syncwarp at the end of the tile loop is no bug: the next issue() and the
    # score tile's __syncwarp already order every reuse it guards. It stays as a safety margin.)
    ("decode f32: the next tile is staged over the one being read", "kernels/attention_decode.cu",
     "walk.stage_next(buf ^ 1, stage);", "walk.stage_next(buf, stage);",
     "emu_decode", "emulated_decode_matches_reference_f32"),
    ("decode f32: no __syncwarp before the score tile is read", "kernels/attention_decode.cu",
     "        __syncwarp();  // the score tile is complete\n", "",
     "emu_decode", "emulated_decode_matches_reference_f32"),
    ("decode f32: scores before the tile has landed", "kernels/attention_decode.cu",
     "        if (more) cp_async_wait<1>();  // this lane's copies of tile n landed ...\n        else cp_async_wait<0>();\n", "",
     "emu_decode", "emulated_decode_matches_reference_f32"),
    ("decode f32: a key's score misses its last lanes", "kernels/attention_decode.cu",
     "for (int off = 1; off < G; off *= 2) {", "for (int off = 1; off < G / 2; off *= 2) {",
     "emu_decode", "emulated_decode_matches_reference_f32"),
    ("decode f32: the warp's slots are not all summed", "kernels/attention_decode.cu",
     "        for (int off = G; off < 32; off *= 2) {\n            l[x] +=", "        for (int off = G; off < 16; off *= 2) {\n            l[x] +=",
     "emu_decode", "emulated_decode_matches_reference_f32"),
    ("decode f32: unmasked fast path on a partly hidden tile", "kernels/attention_decode.cu",
     "tile_fully_visible(mask, ctx - p.queries, ctx, j0, j0 + BT)", "tile_visible(mask, ctx - p.queries, ctx, j0, j0 + BT)",
     "emu_decode", "emulated_decode_unmasked_tiles_next_to_masked_ones"),
    # Both decode kernels (decode.cuh).
    ("decode: composed rotation with a wrong sign", "kernels/rope.cuh",
     "a.x * b.x - a.y * b.y", "a.x * b.x + a.y * b.y",
     "emu_decode", "emulated_decode_matches_reference_bf16"),
    ("decode: tile skipping sees only the last query", "kernels/decode.cuh",
     "tile_visible(mask, s.ctx - p.queries, s.ctx, j0,", "tile_visible(mask, s.ctx - 1, s.ctx, j0,",
     "emu_decode", "emulated_decode"),
    ("decode: window splits start at key 0, not at the window", "kernels/decode.cuh",
     "s.lo = p.window > 0 ? imax(0, s.ctx - p.queries - p.window + 1) : 0;", "s.lo = 0;",
     "emu_decode", "emulated_decode_with_fully_masked_splits"),
    ("decode: the warps' merge leaves out the last warp", "kernels/decode.cuh",
     "        for (int w = 0; w < warps; ++w) {\n            const float f", "        for (int w = 0; w < warps - 1; ++w) {\n            const float f",
     "emu_decode", "emulated_decode_matches_reference_bf16"),
    ("decode: a tile's last key slot not looked up", "kernels/decode.cuh",
     "    if (lane < BT && j < s.k_end) {\n        const int pi", "    if (lane < BT - 1 && j < s.k_end) {\n        const int pi",
     "emu_decode", "emulated_decode_matches_reference_bf16"),
    ("decode f32: the stage's own division takes the next key's offset", "kernels/decode.cuh",
     "j < s.k_end ? j % p.page_size : -1});", "j < s.k_end ? (j + 1) % p.page_size : -1});",
     "emu_decode", "emulated_decode_matches_reference_f32"),
    ("decode: the second tile staged with the first tile's slots", "kernels/decode.cuh",
     "        next = has(cur) ? visible_from(cur + warps) : cur;\n        if (has(next)) ref = tile_page_ref<BT>(p, s, b, next, lane);",
     "        next = has(cur) ? visible_from(cur + warps) : cur;",
     "emu_decode", "emulated_decode_matches_reference_bf16"),
    ("decode: a tile staged with the slots of the tile after it", "kernels/decode.cuh",
     "        if (more) stage(next, buf, slot(next));\n        after = more ? visible_from(next + warps) : next;\n        if (has(after)) ref = tile_page_ref<BT>(p, s, b, after, lane);",
     "        after = more ? visible_from(next + warps) : next;\n        if (has(after)) ref = tile_page_ref<BT>(p, s, b, after, lane);\n        if (more) stage(next, buf, slot(next));",
     "emu_decode", "emulated_decode_matches_reference_bf16"),
    # The tensor-core decode kernel (attention_decode_mma.cu): f16 / bf16.
    ("decode mma: no barrier after loading Q and the offset tables", "kernels/attention_decode_mma.cu",
     "    __syncthreads();  // the only barrier before the end: the warps now run independently\n", "",
     "emu_decode", "emulated_decode_matches_reference_f16"),
    ("decode mma: no __syncwarp after the tile's copies land", "kernels/attention_decode_mma.cu",
     "        __syncwarp();  // ... and every lane's; the bases are written\n", "",
     "emu_decode", "emulated_decode_matches_reference_f16"),
    ("decode mma: linear ALiBi with the sign of keys after the query", "kernels/attention_decode_mma.cu",
     "slope[rr] * static_cast<float>(j0 + u - ipos[rr])", "slope[rr] * static_cast<float>(ipos[rr] - j0 - u)",
     "emu_decode", "emulated_decode_unmasked_tiles_next_to_masked_ones"),
    ("decode mma: linear ALiBi on whole tiles past the first query", "kernels/attention_decode_mma.cu",
     "else if (whole && j0 + BT - 1 <= ctx - p.queries) softmax", "else if (whole) softmax",
     "emu_decode", "emulated_decode_unmasked_tiles_next_to_masked_ones"),
    ("decode mma: the next tile is staged over the one being read", "kernels/attention_decode_mma.cu",
     "walk.stage_next(buf ^ 1, stage);", "walk.stage_next(buf, stage);",
     "emu_decode", "emulated_decode_matches_reference_bf16"),
    ("decode mma: scores before the tile has landed", "kernels/attention_decode_mma.cu",
     "        if (more) cp_async_wait<1>();  // this lane's copies of tile n landed ...\n        else cp_async_wait<0>();\n", "",
     "emu_decode", "emulated_decode_matches_reference_bf16"),
    ("decode mma: the last tile's wait leaves one group pending", "kernels/attention_decode_mma.cu",
     "        else cp_async_wait<0>();", "        else cp_async_wait<1>();",
     "emu_decode", "emulated_decode_matches_reference_bf16"),
    # (Dropping the __syncwarp between the shared-memory rotation and the ldmatrix that reads it
    # is a real bug the plain emulator cannot see: it runs ldmatrix as a warp collective, which
    # every lane reaches only after its stores. RACE_MUTATIONS has it, for racecheck.)
    ("decode mma: shared-memory rotation leaves out the pass-through components", "kernels/attention_decode_mma.cu",
     "        dst[row * LD + c] = src[row * LD + c];\n", "",
     "emu_decode", "emulated_decode_matches_reference_bf16"),
    ("decode mma: rotate_half in registers turns the wrong way", "kernels/attention_decode_mma.cu",
     "rotate_pair(x.x, y.x, c0.x, c0.y);", "rotate_pair(x.x, y.x, c0.x, -c0.y);",
     "emu_decode", "emulated_decode_matches_reference_bf16"),
    ("decode mma: interleaved keys take the next key's offset", "kernels/attention_decode_mma.cu",
     "const float2 of = off[g * DecFrag<D>::OP + pr];", "const float2 of = off[((g + 1) % 8) * DecFrag<D>::OP + pr];",
     "emu_decode", "emulated_decode_matches_reference_f16"),
    ("decode mma: the second 8 keys take the first 8 keys' base", "kernels/attention_decode_mma.cu",
     "Base[H2 + P] = cmul(b0, Off[8 * OP + P]);", "Base[H2 + P] = b0;",
     "emu_decode", "emulated_decode_matches_reference_bf16"),
    # Base steps (one exact anchor per group of a warp's tiles, times a table of exact steps).
    ("decode steps: each tile's anchor at the tile, not at its group's first", "kernels/attention_decode_mma.cu",
     "                group = i - m;\n", "                group = i;\n",
     "emu_decode", "emulated_decode_base_steps_match_reference"),
    ("decode steps: one anchor for all the warp's groups", "kernels/attention_decode_mma.cu",
     "if (i - m != group) {", "if (group < 0) {",
     "emu_decode", "emulated_decode_base_steps_match_reference"),
    ("decode steps: the second 8 keys take the first 8 keys' step", "kernels/attention_decode_mma.cu",
     "Steps[(steps + m) * half + P]", "Steps[m * half + P]",
     "emu_decode", "emulated_decode_base_steps_match_reference"),
    ("decode steps: the table steps one tile, not the W tiles between a warp's", "kernels/attention_decode_mma.cu",
     "fill_rotation_table(Steps, ra, 0, BT * W, steps, 1.f);\n        fill_rotation_table(Steps + steps * half, ra, 8, BT * W, steps, 1.f);",
     "fill_rotation_table(Steps, ra, 0, BT, steps, 1.f);\n        fill_rotation_table(Steps + steps * half, ra, 8, BT, steps, 1.f);",
     "emu_decode", "emulated_decode_base_steps_match_reference"),
    ("decode steps: the table taken though it costs the SM a block", "src/cuda/decode.rs",
     "&& resident(b) >= resident(bytes).max(1)", "",
     "emu_decode", "emulated_decode_base_steps_match_reference"),
    ("decode mma: shared-memory rotation takes the first base for every key", "kernels/attention_decode_mma.cu",
     "cmul(base[(row / 8) * H2 + pr], off[(row % 8) * DecFrag<D>::OP + pr])", "cmul(base[pr], off[(row % 8) * DecFrag<D>::OP + pr])",
     "emu_decode", "emulated_decode_matches_reference_bf16"),
    ("decode mma: head_dim 256 fragments of two k-steps swapped", "kernels/attention_decode_mma.cu",
     "kf[ks][0] = r4[0], kf[ks][1] = r4[1], kf[ks + 1][0] = r4[2], kf[ks + 1][1] = r4[3];",
     "kf[ks][0] = r4[2], kf[ks][1] = r4[3], kf[ks + 1][0] = r4[0], kf[ks + 1][1] = r4[1];",
     "emu_decode", "emulated_decode_matches_reference_bf16"),
    ("decode mma: Leaky far keys rotated with the near tables", "kernels/attention_decode_mma.cu",
     "qk(Kt, Qf, sf, leaky ? mode : KR_NONE, Basel, Offl);", "qk(Kt, Qf, sf, leaky ? mode : KR_NONE, Base, Off);",
     "emu_decode", "emulated_decode_matches_reference_bf16"),
    ("decode mma: far scores read back from the next lane's slot", "kernels/attention_decode_mma.cu",
     "const float4 f0 = Sfar[0], f1 = Sfar[1];", "const float4 f0 = Sfar[2], f1 = Sfar[3];",
     "emu_decode", "emulated_decode_matches_reference_bf16"),
    ("decode mma: O rescaled only when lane 0's rows grew", "kernels/attention_decode_mma.cu",
     "if (__any_sync(0xffffffffu, grew)) {", "if (__shfl_sync(0xffffffffu, grew ? 1.f : 0.f, 0) != 0.f) {",
     "emu_decode", "emulated_decode"),
    ("decode mma: P·V takes the first key n-tile's P for the second's rows g + 8", "kernels/attention_decode_mma.cu",
     "pack2<T>(s[1][0], s[1][1]),\n                                pack2<T>(s[1][2], s[1][3])}",
     "pack2<T>(s[1][0], s[1][1]),\n                                pack2<T>(s[0][2], s[0][3])}",
     "emu_decode", "emulated_decode_matches_reference_f16"),
    ("decode mma: unmasked fast path on a partly hidden tile", "kernels/attention_decode_mma.cu",
     "tile_fully_visible(mask, ctx - p.queries, ctx, j0, j0 + BT)", "tile_visible(mask, ctx - p.queries, ctx, j0, j0 + BT)",
     "emu_decode", "emulated_decode_unmasked_tiles_next_to_masked_ones"),
    ("decode mma: launcher leaves out the far scores' shared memory", "src/cuda/decode.rs",
     "            + if rel { w * 32 * 8 * 4 } else { 0 }\n", "\n",
     "emu_decode", "emulated_decode_matches_reference_bf16"),
    ("decode mma: launcher leaves out the rotated tiles' shared memory", "src/cuda/decode.rs",
     "            + if smem_rot { w * tile } else { 0 }\n", "\n",
     "emu_decode", "emulated_decode_matches_reference_bf16"),
    ("decode: block-table entries not clamped", "kernels/paged.cuh",
     "return imin(imax(page, 0), num_pages - 1);", "return page;",
     "emu_corrupt_inputs", "decode"),
    ("prefill (fused): composed rotation with a wrong sign", "kernels/rope.cuh",
     "a.x * b.x - a.y * b.y", "a.x * b.x + a.y * b.y",
     "emu_paged_prefill", "emulated_paged_prefill_matches"),
    ("paged prefill: block-table entries not clamped", "kernels/paged.cuh",
     "return imin(imax(page, 0), num_pages - 1);", "return page;",
     "emu_corrupt_inputs", "paged_prefill"),
    ("paged prefill gather: no barrier before a block's next key's angles", "kernels/rope.cu",
     "        __syncthreads();  // every thread is done with this key's angles before the next key's\n", "",
     "emu_paged_prefill", "emulated_paged_prefill_gathers_many_sequences"),
    ("paged prefill gather: keys rotated one position on", "kernels/rope.cu",
     "rope_token<T, INTERLEAVED, P>(p, slot, row, j);", "rope_token<T, INTERLEAVED, P>(p, slot, row, j + 1);",
     "emu_paged_prefill", "emulated_paged_prefill_matches_reference"),
    ("paged prefill gather: values not gathered", "kernels/rope.cu",
     "                   p.k_heads, p.head_dim, 0, true);", "                   0, p.head_dim, 0, true);",
     "emu_paged_prefill", "emulated_paged_prefill_matches_reference"),
    ("paged prefill gather: pass-through components left behind", "kernels/rope.cu",
     "if (p.k_heads > 0 && p.k_out != p.k_in) {", "if (false) {",
     "emu_paged_prefill", "emulated_paged_prefill_gathers_many_sequences"),
    ("paged prefill gathered: every sequence's keys from row 0", "kernels/attention.cuh",
     "s.k_start = g.start;", "s.k_start = 0;",
     "emu_paged_prefill", "emulated_paged_prefill_matches_reference"),
    ("paged prefill gather: every sequence written from row 0", "kernels/rope.cu",
     "const long long row = (long long)g.start + j;", "const long long row = j;",
     "emu_paged_prefill", "emulated_paged_prefill_matches_reference"),
    ("gathered_span: the warp's sum skips a lane pair", "kernels/paged.cuh",
     "for (int o = 16; o > 0; o /= 2) {", "for (int o = 16; o > 1; o /= 2) {",
     "emu_paged_prefill", "emulated_paged_prefill_gathers_many_sequences"),
    ("gathered_span: sequences past the 32nd not added", "kernels/paged.cuh",
     "for (int i = threadIdx.x % 32; i < b; i += 32) {", "for (int i = threadIdx.x % 32; i < b && i < 32; i += 32) {",
     "emu_paged_prefill", "emulated_paged_prefill_gathers_many_sequences"),
    ("gathered_span: a sequence not cut where the workspace ends", "kernels/paged.cuh",
     "return {start, imin(imin(imax(context_lens[b], 0), table_rows), cap - start)};",
     "return {start, imin(imax(context_lens[b], 0), table_rows)};",
     "emu_corrupt_inputs", "paged_prefill"),
    ("paged prefill: the page walk drops a step's whole pages", "kernels/attention_fwd.cu",
     "            off += dq, entry_at += dp;", "            off += dq;",
     "emu_paged_prefill", "emulated_paged_prefill_matches"),
    ("paged prefill: Leaky far keys not rotated in shared memory", "kernels/attention_fwd.cu",
     "            if (leaky) load_rotated_tile(Kf, LD, Kf, LD, BN, vk, D, p.rope, ROT_K_LEAKY, kp + j0);", "",
     "emu_paged_prefill", "emulated_paged_prefill_matches"),
    ("paged prefill: rotation tables over the far copies", "kernels/attention_fwd.cu",
     "reinterpret_cast<float2*>(rel ? Kf + BN * LD : Qf)", "reinterpret_cast<float2*>(Qf)",
     "emu_paged_prefill", "emulated_paged_prefill_matches"),
    ("paged prefill: each key split skips its first tile", "kernels/attention_fwd.cu",
     "const int n_begin = splits > 1 ? split * (p.keys_per_split / BN) : 0;",
     "const int n_begin = splits > 1 ? split * (p.keys_per_split / BN) + 1 : 0;",
     "emu_paged_prefill", "emulated_paged_prefill_with_split_keys"),
    ("paged prefill: the stepped page walk turns a page one key late", "kernels/attention_fwd.cu",
     "            if (off >= ps) off -= ps, ++entry_at;", "            if (off > ps) off -= ps, ++entry_at;",
     "emu_paged_prefill", "emulated_paged_prefill_matches"),
    ("paged prefill: a slot's row taken one KV head wide", "kernels/attention_fwd.cu",
     "const unsigned row_bytes = static_cast<unsigned>(p.kv_heads) * (D * sizeof(T));", "const unsigned row_bytes = D * sizeof(T);",
     "emu_paged_prefill", "emulated_paged_prefill_matches"),
    ("decode: a staged slot's row taken one KV head wide", "kernels/decode.cuh",
     "const unsigned row_bytes = static_cast<unsigned>(p.kv_heads) * (D * sizeof(T));", "const unsigned row_bytes = D * sizeof(T);",
     "emu_decode", "emulated_decode_matches_reference_bf16"),
    ("decode: the last staged key of a partial tile not copied", "kernels/decode.cuh",
     "const bool ok = it * KPP < left;", "const bool ok = it * KPP < left - 1;",
     "emu_decode", "emulated_decode_matches_reference_bf16"),
    ("paged cache: wrong slot within a page", "kernels/paged.cuh",
     "* page_size + j % page_size;", "* page_size + (j + 1) % page_size;",
     "emu_paged_prefill", "emulated_paged_prefill_matches"),
    ("split-K combine ignores the last split", "kernels/merge.cu",
     "for (int s = 0; s < p.splits; ++s) {", "for (int s = 0; s < p.splits - 1; ++s) {",
     "emu_decode", "emulated_decode_matches_reference_bf16"),
]

# Races the plain emulator cannot see, because it completes a collective (a shuffle, ldmatrix)
# only once every lane has reached it, so every lane's earlier stores are done: on a GPU a
# collective orders no memory. They run under the feature `racecheck` (ThreadSanitizer over the
# emulated kernels, kernels/emu/simt.cpp), which reports the unordered accesses. Each survives
# the plain emulator (checked by running it there first).
RACE_MUTATIONS = [
    ("racecheck decode mma: no __syncwarp between the shared-memory rotation and its ldmatrix", "kernels/attention_decode_mma.cu",
     "            else rotate_rows_composed(Kw, LD, BT, ra, Off, Base, H2, lane, 32);\n            __syncwarp();\n",
     "            else rotate_rows_composed(Kw, LD, BT, ra, Off, Base, H2, lane, 32);\n",
     "emu_decode", "emulated_decode_matches_reference_bf16"),
    ("racecheck decode mma: a shuffle for the __syncwarp after the bases are written", "kernels/attention_decode_mma.cu",
     "        __syncwarp();  // ... and every lane's; the bases are written\n",
     "        (void)__shfl_xor_sync(0xffffffffu, 0.f, 1);  // ... and every lane's; the bases are written\n",
     "emu_decode", "emulated_decode_matches_reference_bf16"),
    ("racecheck decode: a shuffle for the __syncwarp after a tile's slots are written", "kernels/decode.cuh",
     "    if (lane < BT) slots[lane] = slot;\n    __syncwarp();\n",
     "    if (lane < BT) slots[lane] = slot;\n    (void)__shfl_xor_sync(0xffffffffu, 0.f, 1);\n",
     "emu_decode", "emulated_decode_matches_reference_bf16"),
]


def caught(target: str, name: str, features: str = "emulator") -> bool:
    """Run one emulated test; True when it fails (the mutation was caught)."""
    cmd = ["cargo", "test", "--release", "--features", features, "--test", target, name]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    built = "Running" in run.stderr or "test result" in run.stdout
    if not built:
        raise SystemExit(f"the mutated kernels did not build or run:\n{run.stderr[-3000:]}")
    return run.returncode != 0


def main() -> int:
    # A kill or Ctrl-C mid-mutation must still restore the kernel source (the `finally` below).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))
    only = sys.argv[1] if len(sys.argv) > 1 else ""
    survivors = []
    for (name, rel, old, new, target, test), race in [(m, False) for m in MUTATIONS] + [(m, True) for m in RACE_MUTATIONS]:
        if only not in name:
            continue
        path = ROOT / rel
        source = path.read_text()
        if source.count(old) != 1:
            where = "is no longer in" if old not in source else "is in more than one place of"
            raise SystemExit(f"{name}: the text to mutate {where} {rel}; update this script")
        try:
            path.write_text(source.replace(old, new, 1))
            if race and caught(target, test):
                raise SystemExit(f"{name}: the plain emulator catches it already; move it to MUTATIONS")
            ok = caught(target, test, "emulator,racecheck" if race else "emulator")
        finally:
            path.write_text(source)
        print(f"{'caught  ' if ok else 'SURVIVED'}  {name}  ({target} {test})", flush=True)
        if not ok:
            survivors.append(name)
    if survivors:
        print(f"{len(survivors)} mutation(s) survived: {survivors}")
        return 1
    print("every mutation was caught")
    return 0


if __name__ == "__main__":
    sys.exit(main())
