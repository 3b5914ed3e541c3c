#!/usr/bin/env python3
"""The peers for bench/attention's prefill rows: torch.nn.functional.scaled_dot_product_attention,
flash and cuDNN backends (cuDNN's is FlashAttention-3-class on Hopper), causal, fp16, on the same
shapes. bench_attention runs this (popen) in the same process run, before its own allocations,
and prints the ratios.

  attention_sdpa.py H:HKV:D:N:BATCH ...   ->  one line per shape and backend:
  sdpa BACKEND H HKV D N BATCH <median ms> <TFLOP/s> <how GQA was run>   (BACKEND: flash, cudnn)
TFLOP/s counts the causal half: 2 * BATCH * H * N^2 * D (QK^T and PV over the lower triangle).
"""
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def median_ms(fn, reps=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def main():
    torch.manual_seed(0)
    for spec in sys.argv[1:]:
        H, HKV, D, N, B = (int(x) for x in spec.split(":"))
        # [B, H, N, D] views of [B, N, H, D] storage: the fused-QKV projection's layout.
        q = torch.randn(B, N, H, D, device="cuda", dtype=torch.float16).transpose(1, 2)
        k = torch.randn(B, N, HKV, D, device="cuda", dtype=torch.float16).transpose(1, 2)
        v = torch.randn(B, N, HKV, D, device="cuda", dtype=torch.float16).transpose(1, 2)
        for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            how = "mha" if H == HKV else "enable_gqa"
            with sdpa_kernel(backend):
                try:
                    fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=H != HKV)
                    fn()
                except RuntimeError:
                    # A backend without GQA support (or this layout): expand K/V once (outside the timing).
                    ke = k.repeat_interleave(H // HKV, dim=1)
                    ve = v.repeat_interleave(H // HKV, dim=1)
                    how = "expanded-kv"
                    fn = lambda: F.scaled_dot_product_attention(q, ke, ve, is_causal=True)
                    try:
                        fn()
                    except RuntimeError as ex:
                        print(f"sdpa {name} {H}:{HKV}:{D}:{N}:{B} failed: {str(ex)[:160]}", flush=True)
                        continue
                ms = median_ms(fn)
            flops = 2.0 * B * H * N * N * D
            print(f"sdpa {name} {H} {HKV} {D} {N} {B} {ms:.4f} {flops / ms / 1e9:.1f} {how}", flush=True)
        del q, k, v
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
