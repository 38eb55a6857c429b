// Every kernel's parameter struct, in one place (FlashAttention's flash.h style): each is
// passed by value and mirrored field for field by a #[repr(C)] struct in src/cuda/params.rs.
// tests/abi_layout.rs compares sizes and offsets of both sides (build.rs probes this header).
#pragma once
#include "rope.cuh"

namespace ra {

#define RA_MAX_SINK_HEADS 128

// Learned attention sinks (GPT-OSS's `sinks`): one logit per query head of the launch, in the
// units of the scaled score S. A row's softmax takes e^logit into its denominator and nothing
// into O: O = Σ_j e^S_j V_j / (Σ_j e^S_j + e^logit), LSE = log(Σ_j e^S_j + e^logit).
// Applied once, where a row's result is final (attention.cuh, row_end; merge.cu's combine for
// split keys). Mirrored by `SinkArgs` in src/cuda/params.rs.
struct SinkArgs {
    float logit[RA_MAX_SINK_HEADS];
    int on;  // 0: no sinks (logit unused)
    int pad_;
};

// Mirrored by `GateArgs` in src/cuda/params.rs. The output gate of Qwen3-Next / Qwen3.5 (one
// gate per component: comp_stride 1) and LFM3's g_proj (one per head: comp_stride 0): O is
// written as O·sigmoid(g), g of O's dtype at ptr + tok·row_stride + h·head_stride +
// c·comp_stride; ptr null = no gate. Fused here, it costs no pass over O of its own. The LSE
// stays the attention's own: split partials are combined ungated and gated as they are written.
struct GateArgs {
    const void* ptr;
    long long row_stride, head_stride;
    int comp_stride, pad_;
};

// O·sigmoid(g): the output gate on component c of head h of token tok, or o itself without a
// gate: o / (1 + e^-g), within 3 ulp of f32 (expf, then the approximate division: an IEEE
// division's slow-path call made the 16-bit prefill and combine kernels spill on sm_80). 0 for
// g -> -inf (the division gives 0 past 2^126), o at +inf.
template <typename T>
__device__ __forceinline__ float gated(const GateArgs& g, long long tok, int h, int c, float o) {
    if (g.ptr == nullptr) return o;
    const float x = to_f32(static_cast<const T*>(g.ptr)[tok * g.row_stride + h * g.head_stride + (long long)c * g.comp_stride]);
    return div_approx(o, 1.f + expf(-x));
}

// Mirrored by `RopeParams` in src/cuda/params.rs.
struct RopeParams {
    RopeArgs rope;
    const void* q_in;
    void* q_out;
    const void* k_in;
    void* k_out;
    const int* positions;   // [tokens], or null: position = token - cu_seqlens[b] of its sequence
    const int* cu_seqlens;  // [batch + 1] when positions is null
    const int* seq_starts;  // with cu_seqlens: position of sequence b's token 0 is seq_starts[b * starts_stride]; null = 0
    long long q_in_stride, q_out_stride, k_in_stride, k_out_stride;  // elements per token
    int tokens, q_heads, k_heads, head_dim, batch, starts_stride;
    int use_leak_freq;  // rotate with freq_leak (Leaky ReRoPE's keys at j/k)
    // Gather (block_table set; no Q): key j of sequence b is read from a paged cache
    // [num_pages, page_size, k_heads, head_dim] through the block table and written, rotated to
    // position j, to row start_b + j of k_out, packed: start_b is the sum of the earlier
    // sequences' context lengths (paged.cuh, gathered_span); its V row (same strides as K) is
    // copied from v_in to the same row of v_out. Rows at or past gather_rows (the workspace's)
    // are not written.
    const int* block_table;   // [batch, max_pages]
    const int* context_lens;  // [batch]
    const void* v_in;
    void* v_out;
    int page_size, max_pages, num_pages, gather_rows;
    // Multimodal RoPE (positions set, mrope != 0): positions holds three rows of mrope_stride
    // ints, the tokens' time, height and width positions, and pair i takes one of them
    // (rope.cu, pair_position): 1 = chunked (Qwen2-VL: sections time, height, width in pair
    // order), 2 = interleaved (Qwen3-VL). mrope_h, mrope_w: the height and width sections, in pairs.
    int mrope, mrope_h, mrope_w, mrope_stride;
    // QK norm before the rotation (norm != 0; never with a gather): every head of Q and K
    // becomes x / sqrt(mean(x^2) + norm_eps) * w (rope.cu, norm_sums). The mean is over each
    // head vector (norm 1: Qwen3, Gemma 3, Llama 4; weights of head_dim, shared by the heads)
    // or over all of the token's heads of that tensor (norm 2: OLMo 2, the norm of the whole
    // projection; weights of heads * head_dim). Null weights: all 1 (Llama 4's L2 norm).
    // Norm 3: Cohere's LayerNorm, each head centred on its mean first,
    // (x - mean) / sqrt(mean((x - mean)^2) + norm_eps) * w, weights of heads * head_dim.
    int norm;
    float norm_eps;
    const float* q_norm_w;
    const float* k_norm_w;
    // Elements between consecutive heads of Q's input row: head_dim, or (normed launches
    // only) 2 * head_dim for the gated query of Qwen3-Next / Qwen3.5, whose q_proj puts each
    // head's gate after its query (rope.cu, head_in): the queries are read from there, the
    // gates left alone, and Q written dense to q_out.
    int q_in_hstride;
};

// Mirrored by `ScoresParams` in src/cuda/params.rs.
struct ScoresParams {
    RopeArgs rope;
    const void* q;
    const void* k;
    float* out;
    long long q_row_stride, k_row_stride;
    int nq, nk, q_heads, kv_heads, head_dim, q_offset;
    int causal, window, sinks, chunk;
    int alibi_total_heads, alibi_head_offset;  // total 0 = no ALiBi
    float scale;
    float cap_in, cap_out;  // logit soft-capping (attention.cuh, capped): scale / cap and cap; cap_in 0 = none
};

// Mirrored by `AttnParams` in src/cuda/params.rs. Variable-length batch: sequence b's queries
// are rows cu_seqlens_q[b]..cu_seqlens_q[b+1] of q, its keys rows cu_seqlens_k[b].. of k and v.
// Query m of a sequence sits at position (seqlen_k - seqlen_q) + m, key j at j, unless
// seq_starts gives other starting positions (ring attention, chunks of a longer sequence).
struct AttnParams {
    RopeArgs rope;
    const void* q;
    const void* k;      // unrotated (rotate_k = 1) or pre-rotated keys
    const void* v;
    const void* k_far;  // ReRoPE: raw keys; Leaky: keys rotated to j/k; else unused
    void* out;
    float* lse;         // [q_heads, total_q], natural log
    const int* cu_seqlens_q;
    const int* cu_seqlens_k;
    const int* seq_starts;  // [batch, 2]: positions of each sequence's first query and first key; null = default
    long long q_row_stride, k_row_stride, v_row_stride, o_row_stride, kf_row_stride;
    int batch, max_seqlen_q, total_q, total_k, q_heads, kv_heads, head_dim;
    int causal, window, sinks, chunk, alibi_total_heads, alibi_head_offset;
    int rotate_k;       // rotate each K tile in shared memory as it arrives
    float scale_log2;   // scale * log2(e)
    float scale;
    // Paged keys (block_table != null): sequence b's keys are the first context_lens[b] slots of
    // its pages in k / v ([num_pages, page_size, kv_heads, head_dim]), its queries the last ones.
    // Gathered (context_lens set, no table): its context_lens[b] rows of k / v after the
    // earlier sequences' (the rope kernel's packed gather; gathered_span), within gather_rows.
    const int* block_table;   // [batch, max_pages]
    const int* context_lens;  // [batch]
    int page_size, max_pages, num_pages;
    // Split keys (splits > 1, narrow kernels only): block x = query tile * splits + split takes
    // keys [split, split + 1) * keys_per_split and writes f32 partials for merge.cu's combine:
    // part_out [splits, total_q, q_heads, head_dim] (normalised), part_lse [splits, q_heads, total_q].
    int splits, keys_per_split, gather_rows;
    float* part_out;
    float* part_lse;
    SinkArgs sink;
    // Logit soft-capping (Gemma 2, Grok; attention.cuh, capped): scale / cap and cap·log2(e), so
    // a score is cap_out·tanh(q·k·cap_in) in log2 units; cap_in = 0: none.
    float cap_in, cap_out;
    GateArgs gate;  // applied to O as it is written (one split) or by the combine
};

// Mirrored by `DecodeParams` in src/cuda/params.rs.
struct DecodeParams {
    RopeArgs rope;
    const void* q;        // [batch * queries, Hq, D] rows q_row_stride apart
    const void* k_cache;  // [num_pages, page_size, Hkv, D]
    const void* v_cache;
    const int* block_table;   // [batch, max_pages]
    const int* context_lens;  // [batch]
    void* out;                // [batch * queries, Hq, D] rows o_row_stride apart (splits == 1)
    float* lse;               // [Hq, batch * queries] (splits == 1)
    float* part_out;          // [splits, batch * queries, Hq, D] (splits > 1)
    float* part_lse;          // [splits, Hq, batch * queries]
    long long q_row_stride, o_row_stride;
    int batch, queries, q_heads, kv_heads, head_dim, page_size, max_pages, num_pages;
    int splits, keys_per_split, causal, window, sinks, alibi_total_heads, alibi_head_offset;
    float scale_log2;
    // Tiles per exact base of the 16-bit kernel's key rotations, per warp (1, 4 or 8: the
    // launcher's choice, see attention_decode_mma.cu); the f32 kernel ignores it.
    int base_steps;
    SinkArgs sink;
    float cap_in, cap_out;  // logit soft-capping, as AttnParams
    int chunk;              // chunked attention (mask.cuh)
    GateArgs gate;          // as AttnParams
};

// Mirrored by `AppendParams` in src/cuda/params.rs. vLLM's slot mapping: token t goes to slot
// slots[t] = page * page_size + offset; negative slots (padding) are skipped.
struct AppendParams {
    const void* k;  // [tokens, Hkv, D] rows k_row_stride apart (unrotated)
    const void* v;
    void* k_cache;  // [num_pages, page_size, Hkv, D]
    void* v_cache;
    const int* slots;
    long long k_row_stride, v_row_stride;
    int tokens, kv_heads, head_dim, num_slots;
    // > 0: V cached RMS-normalised per head without weights (Gemma 3n's and Gemma 4's v_norm),
    // with this epsilon; 0: V cached as it is.
    float v_norm_eps;
    int pad_;
};

// Mirrored by `MergeParams` in src/cuda/params.rs: O [tokens, heads, D] dense, LSE [heads, tokens].
struct MergeParams {
    const void* o1;
    const float* lse1;
    const void* o2;
    const float* lse2;
    void* out;
    float* lse_out;
    int tokens, heads, head_dim, pad_;
    GateArgs gate;  // the output gate on the merged rows (a cascade's last merge)
};

// Mirrored by `SplitsParams` in src/cuda/params.rs: the decode kernel's f32 partials
// [splits, tokens, heads, D] and [splits, heads, tokens] into O (rows o_row_stride apart) and LSE.
struct SplitsParams {
    const float* part_out;
    const float* part_lse;
    void* out;
    float* lse;
    long long o_row_stride;
    int splits, tokens, heads, head_dim;
    SinkArgs sink;
    GateArgs gate;  // the output gate, applied to the combined row
};

}  // namespace ra
