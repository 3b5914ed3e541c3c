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
        # Ways to run it, tried in order until one works (K/V expanded once, outside the timing, for
        # a backend without GQA; contiguous [B, H, N, D] copies for one that refuses the strided views).
        def expand(t):
            return t.repeat_interleave(H // HKV, dim=1)

        variants = [("mha" if H == HKV else "enable_gqa", lambda: (q, k, v, H != HKV)),
                    ("expanded-kv", lambda: (q, expand(k), expand(v), False)),
                    ("expanded-kv-contiguous", lambda: (q.contiguous(), expand(k).contiguous(), expand(v).contiguous(), False))]
        for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            ms, errors = None, []
            with sdpa_kernel(backend):
                for how, make in variants:
                    qq, kk, vv, gqa = make()
                    fn = lambda: F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=gqa)
                    try:
                        fn()
                    except RuntimeError as ex:
                        errors.append(f"{how}: {str(ex)[:100]}")
                        continue
                    ms = median_ms(fn)
                    break
            if ms is None:
                print(f"sdpa {name} {H}:{HKV}:{D}:{N}:{B} failed: {'; '.join(errors)}", flush=True)
                continue
            flops = 2.0 * B * H * N * N * D
            print(f"sdpa {name} {H} {HKV} {D} {N} {B} {ms:.4f} {flops / ms / 1e9:.1f} {how}", flush=True)
        del q, k, v
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
