"""Memory of FLUX.1-dev (or another preset) with int8 / fp8 block kernels at released sizes, from XLA's
memory analysis of the compiled programs with abstract weights on CPU (nothing of that size is allocated):

- sampling: one transformer call (one denoising step) at --resolution, batch 1, 512 text rows, bf16
  compute: its parameters (exact bytes), inputs, XLA's temporaries and output. The text encoders run
  first and are freed, and the VAE decodes after the loop, so the transformer step is the peak.
- LoRA training: `mmdit_jax.training.plan` (what `mmdit-train --plan` prints) for the flux-dev-lora preset
  at --resolution, batch 1 on one device, with lora.base_quantize and --remat.

    python benchmarks/quant_memory.py [--preset flux-dev] [--resolution 1024] [--quantize none,int8,fp8]
        [--remat full] [--what sampling,training]

Prints one line per measurement and a JSON line (BENCH_RESULT) per row.
"""
import argparse
import dataclasses
import json
import math
import time

import common  # noqa: F401  (puts this checkout first on sys.path)

GIB = 2 ** 30


def _bytes(tree) -> int:
    import jax
    import numpy as np

    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def sampling_step(preset: str, quantize, resolution: int) -> dict:
    import jax
    import jax.numpy as jnp

    from mmdit_jax.families import preset as get_preset
    from mmdit_jax.structure import Structure
    from mmdit_jax.training.plan import VAE_SCALE, text_length
    from mmdit_jax.transformer import Transformer, abstract_module

    cfg = get_preset(preset)
    model = Transformer(cfg, None, "bfloat16", quantize)
    params = Structure(abstract_module(cfg, jnp.bfloat16, quantize)).abstract_params()
    side = resolution // VAE_SCALE
    ch = cfg.in_channels // (4 if cfg.family == "flux" else 1)  # FLUX packs 2x2 latent patches
    n = text_length(cfg.family, None)
    sds = jax.ShapeDtypeStruct
    args = (sds((1, side, side, ch), jnp.bfloat16), sds((1,), jnp.float32), sds((1, n, cfg.context_dim), jnp.bfloat16),
            sds((1, cfg.pooled_dim), jnp.bfloat16),
            sds((1,), jnp.float32) if getattr(cfg, "guidance_embed", False) else None)
    t = time.perf_counter()
    compiled = jax.jit(model.apply).lower(params, *args).compile()
    ma = compiled.memory_analysis()
    rows = dict(params=_bytes(params), inputs=int(ma.argument_size_in_bytes) - _bytes(params),
                temporaries=int(ma.temp_size_in_bytes), outputs=int(ma.output_size_in_bytes),
                compile_s=time.perf_counter() - t)
    rows["total"] = rows["params"] + rows["inputs"] + rows["temporaries"] + rows["outputs"]
    return rows


def training_step(quantize, resolution: int, remat: str) -> dict:
    from mmdit_jax.families import preset as get_preset
    from mmdit_jax.training import config as C
    from mmdit_jax.training.plan import plan, total_bytes

    cfg = C.load_config("flux-dev-lora")
    cfg = cfg.replace(model=dataclasses.replace(cfg.model, preset=None, pretrained=None, remat=remat), batch_size=1,
                      mesh=C.MeshConfig(), data=dataclasses.replace(cfg.data, resolution=resolution),
                      lora=dataclasses.replace(cfg.lora, base_quantize=quantize))
    rows = plan(cfg, get_preset("flux-dev"))
    rows.pop("mesh")
    rows["total"] = total_bytes(rows)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="flux-dev")
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--quantize", default="none,int8,fp8")
    ap.add_argument("--remat", default="full")
    ap.add_argument("--what", default="sampling,training")
    a = ap.parse_args()
    for what in a.what.split(","):
        for q in a.quantize.split(","):
            q = None if q == "none" else q
            rows = (sampling_step(a.preset, q, a.resolution) if what == "sampling"
                    else training_step(q, a.resolution, a.remat))
            name = f"{what} {a.preset if what == 'sampling' else 'flux-dev LoRA r16'} {a.resolution}px " \
                   f"{q or 'bf16'}" + (f" remat {a.remat}" if what == "training" else "")
            parts = ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in rows.items() if k != "compile_s")
            print(f"{name}: {parts} (compiled in {rows['compile_s']:.0f} s)", flush=True)
            print(common.RESULT_TAG + json.dumps(dict(name=name, **rows)), flush=True)


if __name__ == "__main__":
    main()
