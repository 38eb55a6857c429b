#!/usr/bin/env python3
"""Torch baselines for `rope-attn bench`: time attention prefill on the shapes the runner asks
for, with CUDA events after warm-up, and print one JSON object per line.

Implementations (each skipped with an "error" line when unavailable):
  sdpa_flash       torch.nn.functional.scaled_dot_product_attention under
                   sdpa_kernel(SDPBackend.FLASH_ATTENTION): no positional encoding
  sdpa_cudnn       the same under SDPBackend.CUDNN_ATTENTION (extra reference): no PE
  flash_attn       flash_attn.flash_attn_func (FlashAttention-2), if importable: no PE
  flash_attn3      flash_attn_interface.flash_attn_func (FlashAttention-3), if importable: no PE
  torch_rope_sdpa  the unfused eager pipeline: transformers-style rotate_half RoPE on Q and K
                   in torch ops, then flash SDPA (rotation included in the time)

Input: JSON on stdin
  {"cases": [{"id": "bf16-d128-b1-n2048-causal", "dtype": "bf16", "batch": 1, "seqlen": 2048,
              "q_heads": 32, "kv_heads": 8, "head_dim": 128, "causal": true}, ...],
   "settings": {"warmup_ms": 50, "rounds": 10, "round_ms": 5, "max_iters": 1000},
   "impls": ["sdpa_flash", ...], "matmul": true, "rope_theta": 500000}
or one case from the command line:
  python3 benches/torch_sdpa.py --dtype bf16 --batch 1 --seqlen 2048 --head-dim 128 --causal

Output lines:
  {"type": "env", "torch": "2.5.1", "cuda_runtime": "12.4", "device": "...", "flash_attn": ...}
  {"type": "result", "id": ..., "impl": ..., "ms_median": ..., "ms_min": ..., "iters": ..., "sets": ..., "note": ...}
  {"type": "error", "id": ..., "impl": ..., "error": ...}
  {"type": "matmul", "dtype": "bf16", "n": 8192, "tflops": ..., "ms_median": ...}
Timing matches the Rust runner (src/bin/rope-attn/bench/device.rs): one untimed call, warm-up
of at least warmup_ms and 3 calls, then `rounds` rounds of back-to-back calls lasting about
round_ms each; the median round's time per call is reported. Small problems rotate through
several input sets so that one pass is at least twice the L2.
"""

import argparse
import json
import math
import sys

ALL_IMPLS = ["sdpa_flash", "sdpa_cudnn", "flash_attn", "flash_attn3", "torch_rope_sdpa"]


def emit(obj):
    print(json.dumps(obj), flush=True)


def environment():
    info = {"type": "env", "python": sys.version.split()[0]}
    try:
        import torch
    except Exception as e:  # noqa: BLE001 - any import failure means "no torch"
        info["torch"] = None
        info["error"] = f"torch not importable: {e}"
        return info, None
    info["torch"] = torch.__version__
    info["cuda_runtime"] = torch.version.cuda
    info["cuda_available"] = bool(torch.cuda.is_available())
    if info["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        info["device"] = torch.cuda.get_device_name(0)
        info["sm_count"] = props.multi_processor_count
        info["l2_bytes"] = getattr(props, "L2_cache_size", None)
        info["cudnn"] = torch.backends.cudnn.version()
    for mod, key in (("flash_attn", "flash_attn"), ("flash_attn_interface", "flash_attn3")):
        try:
            m = __import__(mod)
            info[key] = getattr(m, "__version__", "importable")
        except Exception:  # noqa: BLE001
            info[key] = None
    return info, torch


def measure(torch, fn, s):
    """Milliseconds per call of fn(i): median and min over rounds."""
    fn(0)
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)

    def timed(n, first):
        start.record()
        for i in range(n):
            fn(first + i)
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    spent, calls, one = 0.0, 0, math.inf
    while calls < 3 or (spent < s["warmup_ms"] and calls < 10000):
        t = timed(1, calls + 1)
        spent += t
        calls += 1
        one = min(one, t)
    iters = max(1, min(int(math.ceil(s["round_ms"] / max(one, 1e-4))), max(1, s["max_iters"])))
    nxt = calls + 1
    per = []
    for _ in range(max(1, s["rounds"])):
        per.append(timed(iters, nxt) / iters)
        nxt += iters
    per.sort()
    n = len(per)
    med = per[n // 2] if n % 2 else 0.5 * (per[n // 2 - 1] + per[n // 2])
    return med, per[0], iters


def input_sets(torch, set_bytes):
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 0) or 50 * 2**20
    return max(1, min(16, -(-2 * l2 // max(1, set_bytes))))


def rope_tables(torch, seqlen, d, theta, dtype):
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, device="cuda", dtype=torch.float64) / d))
    ang = torch.arange(seqlen, device="cuda", dtype=torch.float64)[:, None] * inv[None, :]
    emb = torch.cat([ang, ang], dim=-1)
    # [1, 1, n, d] against [b, h, n, d]
    return emb.cos().to(dtype)[None, None], emb.sin().to(dtype)[None, None]


def rotate_half(x):
    import torch

    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def run_case(torch, case, impls, s, theta):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dt = {"bf16": torch.bfloat16, "f16": torch.float16}[case["dtype"]]
    b, n, hq, hkv, d = case["batch"], case["seqlen"], case["q_heads"], case["kv_heads"], case["head_dim"]
    causal = bool(case["causal"])
    cid = case["id"]
    rep = hq // hkv
    sets = input_sets(torch, b * n * (hq + 2 * hkv) * d * 2)
    gen = torch.Generator(device="cuda").manual_seed(1234)

    def uniform(*shape):
        return torch.rand(*shape, device="cuda", dtype=torch.float32, generator=gen).mul_(2).sub_(1).to(dt)

    # Our layout, [b, n, h, d]; SDPA sees the [b, h, n, d] view (last dim contiguous, no copy).
    data = [(uniform(b, n, hq, d), uniform(b, n, hkv, d), uniform(b, n, hkv, d)) for _ in range(sets)]
    bhnd = [tuple(t.transpose(1, 2) for t in x) for x in data]
    expanded = []  # K/V repeated to hq heads, made on first need (outside any timing)
    gqa = {}

    def gqa_native(backend):
        """Whether this torch runs GQA on `backend` itself (enable_gqa); else K/V get expanded."""
        if backend not in gqa:
            q, k, v = bhnd[0]
            try:
                with sdpa_kernel(backend):
                    F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
                gqa[backend] = True
            except Exception:  # noqa: BLE001 - TypeError (old torch) or "No available kernel"
                gqa[backend] = False
        return gqa[backend]

    def kv_for(i, native):
        if native:
            return bhnd[i % sets]
        if not expanded:
            expanded.extend((q, k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)) for q, k, v in bhnd)
        return expanded[i % sets]

    def sdpa(q, k, v, native):
        # Called inside `with sdpa_kernel(backend)`, entered once around the whole measurement
        # (not per call: its Python overhead would be timed on small shapes).
        if native:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    expand_note = f"k,v expanded to {hq} heads before timing (no enable_gqa on this backend)"
    cos, sin = rope_tables(torch, n, d, theta, dt) if "torch_rope_sdpa" in impls else (None, None)
    for impl in impls:
        try:
            backend = None
            if impl in ("sdpa_flash", "sdpa_cudnn"):
                backend = SDPBackend.FLASH_ATTENTION if impl == "sdpa_flash" else SDPBackend.CUDNN_ATTENTION
                native = gqa_native(backend)

                def fn(i, native=native):
                    return sdpa(*kv_for(i, native), native)

                note = "gqa native (enable_gqa)" if native else expand_note
            elif impl in ("flash_attn", "flash_attn3"):
                if impl == "flash_attn":
                    from flash_attn import flash_attn_func
                else:
                    from flash_attn_interface import flash_attn_func

                def fn(i, f=flash_attn_func):
                    q, k, v = data[i % sets]
                    return f(q, k, v, causal=causal)

                note = "gqa native, [b,n,h,d]"
            elif impl == "torch_rope_sdpa":
                backend = SDPBackend.FLASH_ATTENTION
                native = gqa_native(backend)

                def fn(i, native=native):
                    q, k, v = bhnd[i % sets]
                    q2 = q * cos + rotate_half(q) * sin
                    k2 = k * cos + rotate_half(k) * sin
                    if not native:
                        k2, v = k2.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
                    return sdpa(q2, k2, v, native)

                note = "rotate_half RoPE in torch ops + flash SDPA; " + (
                    "gqa native (enable_gqa)" if native else "k,v expanded inside the timing"
                )
            else:
                raise ValueError(f"unknown impl {impl}")
            if backend is None:
                med, mn, iters = measure(torch, fn, s)
            else:
                with sdpa_kernel(backend):
                    med, mn, iters = measure(torch, fn, s)
            emit({"type": "result", "id": cid, "impl": impl, "ms_median": med, "ms_min": mn, "iters": iters, "sets": sets, "note": note})
        except Exception as e:  # noqa: BLE001 - report and go on with the next implementation
            emit({"type": "error", "id": cid, "impl": impl, "error": f"{type(e).__name__}: {e}"[:500]})
    del data, bhnd, expanded
    torch.cuda.empty_cache()


def matmul(torch, s, n=8192):
    a = torch.rand(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.rand(n, n, device="cuda", dtype=torch.bfloat16)
    med, _, _ = measure(torch, lambda i: a @ b, s)
    emit({"type": "matmul", "dtype": "bf16", "n": n, "tflops": 2 * n**3 / (med * 1e-3) / 1e12, "ms_median": med})


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", choices=["bf16", "f16"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seqlen", type=int)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--impls", default=",".join(ALL_IMPLS))
    ap.add_argument("--matmul", action="store_true", help="also time an 8192^3 bf16 matmul")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--check", action="store_true", help="print the env line and exit")
    a = ap.parse_args()

    info, torch = environment()
    emit(info)
    if a.check:
        return 0
    if a.seqlen is not None:
        cid = f"{a.dtype or 'bf16'}-d{a.head_dim}-b{a.batch}-n{a.seqlen}-{'causal' if a.causal else 'full'}"
        req = {
            "cases": [{"id": cid, "dtype": a.dtype or "bf16", "batch": a.batch, "seqlen": a.seqlen, "q_heads": a.heads,
                       "kv_heads": a.kv_heads, "head_dim": a.head_dim, "causal": a.causal}],
            "impls": a.impls.split(","),
            "matmul": a.matmul,
        }
    else:
        req = json.load(sys.stdin)
    s = {"warmup_ms": 50.0, "rounds": 10, "round_ms": 5.0, "max_iters": 1000}
    if a.quick:
        s = {"warmup_ms": 20.0, "rounds": 5, "round_ms": 2.0, "max_iters": 500}
    s.update(req.get("settings", {}))
    if torch is None or not info.get("cuda_available"):
        emit({"type": "error", "id": None, "impl": None, "error": info.get("error", "torch sees no CUDA device")})
        return 0
    impls = [i for i in req.get("impls", ALL_IMPLS) if i in ALL_IMPLS]
    if req.get("matmul"):
        try:
            matmul(torch, s)
        except Exception as e:  # noqa: BLE001
            emit({"type": "error", "id": None, "impl": "matmul", "error": f"{type(e).__name__}: {e}"[:500]})
    for case in req["cases"]:
        run_case(torch, case, impls, s, float(req.get("rope_theta", 500000.0)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
