#!/usr/bin/env python3
"""What Hugging Face transformers computes when it runs a checkpoint in float16, as Atom's code runs a model.

For each fixture directory given, loads it with dtype=float16 (eager attention) on the GPU, runs the
`input_ids` of its reference.safetensors from position 0, and writes reference_fp16.safetensors with
layer 0's fp16 tensors (widened to float32), named as the modules whose output (or `.in`: input) they are:

    input_ids                              int32 [T]
    layers.0.input_layernorm               the q/k/v input (embedding -> RMSNorm)
    layers.0.self_attn.{q,k,v}_proj        the projections, before RoPE
    layers.0.self_attn.o_proj.in           the attention output
    layers.0.post_attention_layernorm.in   the residual stream after attention
    layers.0.post_attention_layernorm      the gate/up input
    layers.0.mlp.{gate,up}_proj            the projections
    layers.0.mlp.down_proj.in              silu(gate) * up

nibble's fp16-activation mode (--atom-compat) must reproduce each step from the step before it
(tests/test_arch_fixtures.cpp). Only fixtures whose weights are stored in 16 bits fit: HF rounds fp32
weights to fp16, nibble keeps them.

Needs torch, transformers, safetensors (run on the GPU machine):
    python3 tools/make_fp16_reference.py [--out DIR] tests/fixtures/mistral tests/fixtures/llama3-rope
(without --out each file is written beside its reference.safetensors)
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402


def main():
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "device": torch.cuda.get_device_name(0)}
    print(versions, flush=True)
    args = sys.argv[1:]
    out_root = None
    if args[:1] == ["--out"]:
        out_root, args = args[1], args[2:]
    for d in args:
        ref = load_file(os.path.join(d, "reference.safetensors"))
        ids = ref["input_ids"].long().unsqueeze(0).cuda()
        model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float16,
                                                                  attn_implementation="eager").cuda().eval()
        layer = model.model.layers[0]
        tensors = {"input_ids": ref["input_ids"].int().contiguous()}

        def keep(name, use_input):
            def hook(module, inputs, output):
                t = inputs[0] if use_input else output
                assert t.dtype == torch.float16, f"{name} is {t.dtype}"
                tensors[name] = t[0].float().cpu().contiguous()
            return hook

        hooks = [("input_layernorm", False), ("self_attn.q_proj", False), ("self_attn.k_proj", False),
                 ("self_attn.v_proj", False), ("self_attn.o_proj", True), ("post_attention_layernorm", True),
                 ("post_attention_layernorm", False), ("mlp.gate_proj", False), ("mlp.up_proj", False),
                 ("mlp.down_proj", True)]
        for name, use_input in hooks:
            layer.get_submodule(name).register_forward_hook(
                keep(f"layers.0.{name}" + (".in" if use_input else ""), use_input))
        with torch.no_grad():
            model(ids, use_cache=False)
        out_dir = os.path.join(out_root, os.path.basename(os.path.normpath(d))) if out_root else d
        os.makedirs(out_dir, exist_ok=True)
        save_file(tensors, os.path.join(out_dir, "reference_fp16.safetensors"),
                  metadata={k: str(v) for k, v in versions.items()})
        print(d, {k: list(v.shape) for k, v in tensors.items()}, flush=True)


if __name__ == "__main__":
    main()
