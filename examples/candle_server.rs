//! rope-attn from a candle server: one attention layer of Llama 3.1 8B (its real `config.json`:
//! llama3 RoPE scaling, 32 query heads over 8 KV heads, d = 128) stepping a batch of requests
//! through prefill, decode and a chunked prefill on a paged KV cache, all on candle `Tensor`s.
//!
//! CPU tensors run the f64 reference; built with `--features candle-cuda` and run on a machine
//! with a GPU, the same calls run the kernels on the tensors' device and candle's stream.
//!
//! ```text
//! cargo run --release --features candle --example candle_server
//! ```

use candle_core::{DType, Device, Tensor};
use rope_attn::{candle as ra, AttentionParams, Layout, RopeConfig, Rotary};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// One attention layer's position encoding and paged KV cache (unrotated keys: the kernels
/// rotate them at their positions, so a dynamic schedule never invalidates the cache).
struct Layer {
    p: AttentionParams,
    k_cache: Tensor,
    v_cache: Tensor,
    page_size: usize,
}

impl Layer {
    fn new(config_json: &str, num_pages: usize, page_size: usize, dev: &Device) -> Result<Self> {
        let cfg = RopeConfig::from_hf_config_json(config_json)?;
        let mut p = AttentionParams::new(32, 8, cfg.head_dim);
        p.rope = Some(Rotary::from_schedule(&cfg.schedule(None)?, Layout::Half));
        // K and V caches as the two halves of one tensor, vLLM's layout.
        let kv = Tensor::zeros((2, num_pages, page_size, 8, cfg.head_dim), DType::BF16, dev)?;
        Ok(Layer { p, k_cache: kv.get(0)?, v_cache: kv.get(1)?, page_size })
    }

    /// Split a packed QKV projection `[tokens, (32 + 2·8)·d]` into views (no copies).
    fn split(&self, qkv: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let d = self.p.head_dim;
        let qkv = qkv.reshape((qkv.dim(0)?, 48, d))?;
        Ok((qkv.narrow(1, 0, 32)?, qkv.narrow(1, 32, 8)?, qkv.narrow(1, 40, 8)?))
    }

    /// Prefill packed prompts: cache their K/V at `slots`, attend causally within each prompt.
    fn prefill(&self, qkv: &Tensor, seqlens: &[usize], slots: &Tensor) -> Result<Tensor> {
        let (q, k, v) = self.split(qkv)?;
        ra::paged_append(&k, &v, &self.k_cache, &self.v_cache, slots)?;
        let (out, _lse) = ra::attention_prefill(&q, &k, &v, &self.p, seqlens, seqlens)?;
        Ok(out)
    }

    /// A chunk of new tokens per request (a follow-up turn, or a long prompt split in chunks):
    /// appended, then attended over each request's whole context straight from its pages.
    /// `total_context`: the contexts added up, which the scheduler knows (it sizes the gather
    /// workspace of long chunks to the keys there are, not to every slot of the table).
    fn chunk(&self, qkv: &Tensor, seqlens: &[usize], slots: &Tensor, table: &Tensor, lens: &Tensor, total_context: usize) -> Result<Tensor> {
        let (q, k, v) = self.split(qkv)?;
        ra::paged_append(&k, &v, &self.k_cache, &self.v_cache, slots)?;
        let (out, _lse) = ra::attention_prefill_paged(&q, &self.k_cache, &self.v_cache, table, lens, seqlens, Some(total_context), &self.p)?;
        Ok(out)
    }

    /// One decode step: one new token per request, appended, then attended over its pages.
    fn decode(&self, qkv: &Tensor, slots: &Tensor, table: &Tensor, lens: &Tensor, max_context: usize) -> Result<Tensor> {
        let (q, k, v) = self.split(qkv)?;
        ra::paged_append(&k, &v, &self.k_cache, &self.v_cache, slots)?;
        let (out, _lse) = ra::attention_decode(&q, &self.k_cache, &self.v_cache, table, lens, max_context, &self.p)?;
        Ok(out)
    }
}

fn device() -> Result<Device> {
    #[cfg(feature = "candle-cuda")]
    if rope_attn::cuda::device_status().is_ok() {
        return Ok(Device::new_cuda(0)?);
    }
    Ok(Device::Cpu)
}

fn main() -> Result<()> {
    let dev = device()?;
    let layer = Layer::new(include_str!("configs/llama-3.1-8b.json"), 16, 16, &dev)?;
    let width = 48 * layer.p.head_dim;
    // Two requests: prompts of 20 and 7 tokens; request 0 owns pages [3, 9], request 1 page [5, 6].
    let table = Tensor::new(&[[3u32, 9], [5, 6]], &dev)?;
    let slot = |page: u32, i: usize| page * layer.page_size as u32 + i as u32;
    let mut slots: Vec<u32> = (0..20).map(|i| slot([3, 9][i / 16], i % 16)).collect();
    slots.extend((0..7).map(|i| slot(5, i)));
    let qkv = Tensor::randn(0f32, 1.0, (27, width), &dev)?.to_dtype(DType::BF16)?;
    let out = layer.prefill(&qkv, &[20, 7], &Tensor::new(slots.as_slice(), &dev)?)?;
    println!("prefill: {:?} {:?} on {:?}", out.dims(), out.dtype(), dev.location());
    let mut lens = [20usize, 7];
    for step in 0..4 {
        let new_slots = [slot([3, 9][lens[0] / 16], lens[0] % 16), slot([5, 6][lens[1] / 16], lens[1] % 16)];
        lens = [lens[0] + 1, lens[1] + 1];
        let qkv = Tensor::randn(0f32, 1.0, (2, width), &dev)?.to_dtype(DType::BF16)?;
        let ctx = Tensor::new(&[lens[0] as u32, lens[1] as u32], &dev)?;
        let out = layer.decode(&qkv, &Tensor::new(&new_slots, &dev)?, &table, &ctx, 32)?;
        let norm = out.to_dtype(DType::F32)?.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
        println!("decode step {step}: contexts {lens:?}, output {:?}, |out| = {norm:.3}", out.dims());
    }
    // A follow-up turn of 5 tokens for request 0 and 2 for request 1, as one chunked prefill.
    let chunk = [5usize, 2];
    let mut chunk_slots = Vec::new();
    for (r, &n) in chunk.iter().enumerate() {
        let pages = [[3u32, 9], [5, 6]][r];
        chunk_slots.extend((lens[r]..lens[r] + n).map(|j| slot(pages[j / 16], j % 16)));
        lens[r] += n;
    }
    let qkv = Tensor::randn(0f32, 1.0, (7, width), &dev)?.to_dtype(DType::BF16)?;
    let ctx = Tensor::new(&[lens[0] as u32, lens[1] as u32], &dev)?;
    let out = layer.chunk(&qkv, &chunk, &Tensor::new(chunk_slots.as_slice(), &dev)?, &table, &ctx, lens.iter().sum())?;
    println!("chunked prefill {chunk:?}: contexts {lens:?}, output {:?}", out.dims());
    Ok(())
}
