//! What `rope-attn bench` measures: the shapes of each section and their FLOP and byte counts.
//! Pure data, no device: the plan is printed on machines without a GPU too.

use std::fmt;

/// Query heads and KV heads of every case (GQA 32/8, Llama-3-8B-like).
pub const Q_HEADS: usize = 32;
/// KV heads of every case.
pub const KV_HEADS: usize = 8;
/// Tokens per page of the paged caches (decode and chunked prefill).
pub const PAGE_SIZE: usize = 16;

/// The element types compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    Bf16,
    F16,
}

impl DType {
    pub fn name(self) -> &'static str {
        match self {
            DType::Bf16 => "bf16",
            DType::F16 => "f16",
        }
    }

    /// Bytes per element.
    pub fn bytes(self) -> usize {
        2
    }
}

/// One prefill shape: `batch` sequences of `seqlen` queries over as many keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefillCase {
    pub dtype: DType,
    pub head_dim: usize,
    pub batch: usize,
    pub seqlen: usize,
    pub causal: bool,
    pub q_heads: usize,
    pub kv_heads: usize,
}

impl PrefillCase {
    /// `4·b·h·n²·d` (two matrix products of 2 FLOPs per multiply-add), halved for causal.
    pub fn flops(&self) -> f64 {
        let n = self.seqlen as f64;
        let f = 4.0 * self.batch as f64 * self.q_heads as f64 * n * n * self.head_dim as f64;
        if self.causal {
            f / 2.0
        } else {
            f
        }
    }

    /// The fewest bytes a prefill must move: read Q, K, V once, write O once.
    pub fn bytes(&self) -> f64 {
        let t = (self.batch * self.seqlen) as f64;
        let d = self.head_dim as f64;
        t * d * (2 * self.q_heads + 2 * self.kv_heads) as f64 * self.dtype.bytes() as f64
    }

    /// A stable identifier (CSV, and the key the torch script echoes back).
    pub fn id(&self) -> String {
        format!(
            "{}-d{}-b{}-n{}-{}",
            self.dtype.name(),
            self.head_dim,
            self.batch,
            self.seqlen,
            if self.causal { "causal" } else { "full" }
        )
    }
}

impl fmt::Display for PrefillCase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} d{} {}x{} {}",
            self.dtype.name(),
            self.head_dim,
            self.batch,
            short(self.seqlen),
            if self.causal { "causal" } else { "full" }
        )
    }
}

/// One decode step: `batch` sequences, one new query each, all at `context` cached tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeCase {
    pub dtype: DType,
    pub head_dim: usize,
    pub batch: usize,
    pub context: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
}

impl DecodeCase {
    /// Bytes of K and V read (each cached token once): the traffic that bounds decode.
    pub fn kv_bytes(&self) -> f64 {
        2.0 * (self.batch * self.context * self.kv_heads * self.head_dim * self.dtype.bytes()) as f64
    }

    /// `4·b·h·n·d` for one query per sequence.
    pub fn flops(&self) -> f64 {
        4.0 * (self.batch * self.q_heads * self.context * self.head_dim) as f64
    }

    pub fn id(&self) -> String {
        format!("{}-d{}-b{}-ctx{}", self.dtype.name(), self.head_dim, self.batch, self.context)
    }
}

impl fmt::Display for DecodeCase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} d{} b{} ctx {}", self.dtype.name(), self.head_dim, self.batch, short(self.context))
    }
}

/// A chunked prefill over a paged cache: `batch` sequences, each `chunk` new queries that are
/// the last of its `context` cached tokens (causal), read through a shuffled block table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkCase {
    pub dtype: DType,
    pub head_dim: usize,
    pub batch: usize,
    pub chunk: usize,
    pub context: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
}

impl ChunkCase {
    /// `4·b·h·d` per visible (query, key) pair: query m of the chunk sees `context - chunk + m + 1` keys.
    pub fn flops(&self) -> f64 {
        let (c, l) = (self.chunk as f64, self.context as f64);
        let pairs = c * (l - c) + c * (c + 1.0) / 2.0;
        4.0 * self.batch as f64 * self.q_heads as f64 * self.head_dim as f64 * pairs
    }

    pub fn id(&self) -> String {
        format!("{}-d{}-b{}-chunk{}-ctx{}", self.dtype.name(), self.head_dim, self.batch, self.chunk, self.context)
    }
}

impl fmt::Display for ChunkCase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} d{} b{} chunk {} at ctx {}", self.dtype.name(), self.head_dim, self.batch, short(self.chunk), short(self.context))
    }
}

/// The rope kernel alone on Q `[tokens, 32, d]` and K `[tokens, 8, d]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RopeCase {
    pub dtype: DType,
    pub head_dim: usize,
    pub tokens: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
}

impl RopeCase {
    /// Bytes read plus written (Q and K, in place).
    pub fn bytes(&self) -> f64 {
        2.0 * (self.tokens * (self.q_heads + self.kv_heads) * self.head_dim * self.dtype.bytes()) as f64
    }

    pub fn id(&self) -> String {
        format!("{}-d{}-t{}", self.dtype.name(), self.head_dim, self.tokens)
    }
}

impl fmt::Display for RopeCase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} d{} {} tokens", self.dtype.name(), self.head_dim, short(self.tokens))
    }
}

/// `2048` → `2k`, `131072` → `128k`, `512` → `512`.
pub fn short(n: usize) -> String {
    if n >= 1024 && n.is_multiple_of(1024) {
        format!("{}k", n / 1024)
    } else {
        n.to_string()
    }
}

/// Every case of one run.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub prefill: Vec<PrefillCase>,
    pub decode: Vec<DecodeCase>,
    pub chunked: Vec<ChunkCase>,
    pub rope: Vec<RopeCase>,
}

/// Sections a run may be limited to (`--only`).
pub const SECTIONS: &[&str] = &["prefill", "decode", "chunked", "rope"];

/// The full plan (the issue's shapes), or the `--quick` subset.
pub fn plan(quick: bool) -> Plan {
    let dtypes: &[DType] = if quick { &[DType::Bf16] } else { &[DType::Bf16, DType::F16] };
    let dims: &[usize] = if quick { &[128] } else { &[64, 128] };
    let shapes: &[(usize, usize)] = if quick {
        &[(1, 2048), (1, 8192), (16, 2048)]
    } else {
        &[(1, 512), (1, 2048), (1, 8192), (1, 32768), (16, 2048)]
    };
    let causal: &[bool] = if quick { &[true] } else { &[true, false] };
    let mut prefill = Vec::new();
    for &dtype in dtypes {
        for &head_dim in dims {
            for &(batch, seqlen) in shapes {
                for &c in causal {
                    prefill.push(PrefillCase {
                        dtype,
                        head_dim,
                        batch,
                        seqlen,
                        causal: c,
                        q_heads: Q_HEADS,
                        kv_heads: KV_HEADS,
                    });
                }
            }
        }
    }
    let contexts: &[usize] = if quick { &[8192, 32768] } else { &[1024, 8192, 32768, 131072] };
    let batches: &[usize] = if quick { &[1, 16] } else { &[1, 16, 64] };
    let mut decode = Vec::new();
    for &dtype in dtypes {
        for &head_dim in dims {
            for &context in contexts {
                for &batch in batches {
                    decode.push(DecodeCase { dtype, head_dim, batch, context, q_heads: Q_HEADS, kv_heads: KV_HEADS });
                }
            }
        }
    }
    // (batch, chunk, context): a long chunk deep into a long context, shorter ones (64: the
    // largest chunk paged_prefill_prefers_gather leaves fused, to check that threshold), a batch.
    let chunks: &[(usize, usize, usize)] = if quick {
        &[(1, 2048, 8192), (1, 2048, 32768)]
    } else {
        &[(1, 2048, 8192), (1, 2048, 32768), (1, 512, 32768), (1, 64, 32768), (4, 1024, 8192)]
    };
    let mut chunked = Vec::new();
    for &dtype in dtypes {
        for &head_dim in dims {
            for &(batch, chunk, context) in chunks {
                chunked.push(ChunkCase { dtype, head_dim, batch, chunk, context, q_heads: Q_HEADS, kv_heads: KV_HEADS });
            }
        }
    }
    let tokens: &[usize] = if quick { &[8192, 131072] } else { &[512, 2048, 8192, 32768, 131072] };
    let mut rope = Vec::new();
    for &dtype in dtypes {
        for &head_dim in dims {
            for &t in tokens {
                rope.push(RopeCase { dtype, head_dim, tokens: t, q_heads: Q_HEADS, kv_heads: KV_HEADS });
            }
        }
    }
    Plan { prefill, decode, chunked, rope }
}

impl Plan {
    /// Keep only the named sections.
    pub fn only(mut self, sections: &[String]) -> Self {
        let keep = |s: &str| sections.iter().any(|x| x == s);
        if !keep("prefill") {
            self.prefill.clear();
        }
        if !keep("decode") {
            self.decode.clear();
        }
        if !keep("chunked") {
            self.chunked.clear();
        }
        if !keep("rope") {
            self.rope.clear();
        }
        self
    }

    /// What the plan runs, in words (printed before a run, and instead of one without a GPU).
    pub fn describe(&self) -> String {
        let mut s = String::new();
        if !self.prefill.is_empty() {
            s += &format!(
                "  prefill  {} cases: {}\n\
                 \x20          GQA {}/{}; RoPE (Llama 3.1 schedule) + ALiBi; ours: fused (K rotated in the kernel) and\n\
                 \x20          pre-rotated (rope kernel → workspace); baselines: unfused (rope kernel in place, then attention\n\
                 \x20          with ALiBi only), ours without any PE, torch SDPA flash (no PE), flash_attn (no PE),\n\
                 \x20          torch rotary + SDPA flash\n",
                self.prefill.len(),
                summarize(self.prefill.iter().map(|c| {
                    (c.dtype.name().to_string(), format!("d{}", c.head_dim), format!("{}x{}", c.batch, short(c.seqlen)), (if c.causal { "causal" } else { "full" }).to_string())
                })),
                Q_HEADS,
                KV_HEADS,
            );
        }
        if !self.decode.is_empty() {
            s += &format!(
                "  decode   {} cases: {}\n\
                 \x20          1 query per sequence, paged cache (page {PAGE_SIZE}, shuffled block table), RoPE, GQA {}/{};\n\
                 \x20          GB/s of K+V read, against a device-to-device copy measured in the same run\n",
                self.decode.len(),
                summarize(self.decode.iter().map(|c| {
                    (c.dtype.name().to_string(), format!("d{}", c.head_dim), format!("ctx {}", short(c.context)), format!("b{}", c.batch))
                })),
                Q_HEADS,
                KV_HEADS,
            );
        }
        if !self.chunked.is_empty() {
            s += &format!(
                "  chunked  {} cases: {}\n\
                 \x20          paged prefill of a chunk of new queries at the end of a cached context (page {PAGE_SIZE}, shuffled\n\
                 \x20          table), RoPE + ALiBi, causal, GQA {}/{}: fused (keys rotated per tile in the kernel) against\n\
                 \x20          gathered (K rotated once and V gathered into a workspace, then the prefill on contiguous keys)\n",
                self.chunked.len(),
                summarize(self.chunked.iter().map(|c| {
                    (c.dtype.name().to_string(), format!("d{}", c.head_dim), format!("b{} chunk {}", c.batch, short(c.chunk)), format!("ctx {}", short(c.context)))
                })),
                Q_HEADS,
                KV_HEADS,
            );
        }
        if !self.rope.is_empty() {
            s += &format!(
                "  rope     {} cases: {}\n\
                 \x20          the rope kernel in place on Q [t,{},d] and K [t,{},d] against a device-to-device copy of the same bytes\n",
                self.rope.len(),
                summarize(self.rope.iter().map(|c| {
                    (
                        c.dtype.name().to_string(),
                        format!("d{}", c.head_dim),
                        format!("{} tokens", short(c.tokens)),
                        String::new(),
                    )
                })),
                Q_HEADS,
                KV_HEADS,
            );
        }
        s
    }
}

/// "bf16,f16 × d64,d128 × 1x512,1x2k × causal,full": the distinct values of each column, in order.
fn summarize(items: impl Iterator<Item = (String, String, String, String)>) -> String {
    let mut cols: [Vec<String>; 4] = Default::default();
    for (a, b, c, d) in items {
        for (col, v) in cols.iter_mut().zip([a, b, c, d]) {
            if !v.is_empty() && !col.contains(&v) {
                col.push(v);
            }
        }
    }
    cols.iter().filter(|c| !c.is_empty()).map(|c| c.join(",")).collect::<Vec<_>>().join(" × ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_full_plan_is_the_issue_s_grid() {
        let p = plan(false);
        assert_eq!(p.prefill.len(), 2 * 2 * 5 * 2);
        assert_eq!(p.decode.len(), 2 * 2 * 4 * 3);
        assert_eq!(p.rope.len(), 2 * 2 * 5);
        assert!(p.prefill.iter().all(|c| c.q_heads == 32 && c.kv_heads == 8));
        assert!(p.prefill.iter().any(|c| c.batch == 16 && c.seqlen == 2048 && !c.causal));
        assert!(p.decode.iter().any(|c| c.batch == 64 && c.context == 131072));
        assert_eq!(p.chunked.len(), 2 * 2 * 5);
        let q = plan(true);
        assert!(q.prefill.len() < p.prefill.len() && !q.prefill.is_empty());
        let only = plan(true).only(&["rope".to_string()]);
        assert!(only.prefill.is_empty() && only.decode.is_empty() && !only.rope.is_empty());
    }

    #[test]
    fn flops_and_bytes() {
        let c = PrefillCase {
            dtype: DType::Bf16,
            head_dim: 128,
            batch: 1,
            seqlen: 2048,
            causal: false,
            q_heads: 32,
            kv_heads: 8,
        };
        assert_eq!(c.flops(), 4.0 * 32.0 * 2048.0 * 2048.0 * 128.0);
        assert_eq!(PrefillCase { causal: true, ..c }.flops(), c.flops() / 2.0);
        // Q and O: 2048·32·128·2 bytes each; K and V: 2048·8·128·2 each.
        assert_eq!(c.bytes(), (2.0 * 2048.0 * 32.0 * 128.0 + 2.0 * 2048.0 * 8.0 * 128.0) * 2.0);
        assert_eq!(c.id(), "bf16-d128-b1-n2048-full");
        assert_eq!(c.to_string(), "bf16 d128 1x2k full");
        let d = DecodeCase { dtype: DType::F16, head_dim: 128, batch: 16, context: 8192, q_heads: 32, kv_heads: 8 };
        assert_eq!(d.kv_bytes(), 2.0 * 16.0 * 8192.0 * 8.0 * 128.0 * 2.0);
        // A chunk of 2 at the end of 5 keys sees 4 + 5 keys.
        let k = ChunkCase { dtype: DType::Bf16, head_dim: 64, batch: 3, chunk: 2, context: 5, q_heads: 32, kv_heads: 8 };
        assert_eq!(k.flops(), 4.0 * 3.0 * 32.0 * 64.0 * 9.0);
        let r = RopeCase { dtype: DType::Bf16, head_dim: 64, tokens: 512, q_heads: 32, kv_heads: 8 };
        assert_eq!(r.bytes(), 2.0 * 512.0 * 40.0 * 64.0 * 2.0);
        assert_eq!(
            (short(512), short(2048), short(131072), short(1000)),
            ("512".into(), "2k".into(), "128k".into(), "1000".into())
        );
    }

    #[test]
    fn description_names_every_axis() {
        let d = plan(false).describe();
        for want in [
            "bf16,f16",
            "d64,d128",
            "1x512,1x2k,1x8k,1x32k,16x2k",
            "causal,full",
            "ctx 1k,ctx 8k,ctx 32k,ctx 128k",
            "b1,b16,b64",
        ] {
            assert!(d.contains(want), "{want} missing from\n{d}");
        }
    }
}
