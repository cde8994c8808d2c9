"""Weight-only int8 / fp8 block kernels (mmdit_jax.quant): the velocity of realistic-width random models
against the float32 reference, parameter bytes at the released sizes, loading quantised straight from
checkpoints, LoRA on a quantised base, gradients to the activations, and one-line errors."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmdit_jax.errors import MMDiTError
from mmdit_jax.layers import Buffer
from mmdit_jax.flux.config import PRESETS as FLUX_PRESETS, FluxConfig
from mmdit_jax.quant import formats
from mmdit_jax.quant.model import QuantScale, dequantize_params, quantize_transformer, sites
from mmdit_jax.sd3.config import PRESETS as SD3_PRESETS, MMDiTConfig
from mmdit_jax.structure import Structure
from mmdit_jax.transformer import Transformer, abstract_module, load_transformer, save_transformer

TOL = {"int8": 3e-2, "fp8": 6e-2}


def _random_everywhere(model, seed):
    """Transformer.init's xavier kernels, and the zero-initialised leaves (adaLN, output layer, biases)
    filled with N(0, 0.02^2): a freshly initialised model is the identity with zero output."""
    leaves, tree = jax.tree.flatten(model.params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    fill = [jnp.where(x == 0, 0.02 * jax.random.normal(k, x.shape, x.dtype), x) if x.ndim else x
            for x, k in zip(leaves, keys)]
    model.params = jax.tree.unflatten(tree, fill)
    return model


def _inputs(seed, latent_shape, ctx_len, context_dim, pooled_dim, guidance):
    k = jax.random.split(jax.random.key(seed), 4)
    b = latent_shape[0]
    return (jax.random.normal(k[0], latent_shape), jnp.linspace(0.2, 0.9, b),
            jax.random.normal(k[1], (b, ctx_len, context_dim)), jax.random.normal(k[2], (b, pooled_dim)),
            jnp.full((b,), 3.5) if guidance else None)


# width 1024 (8 heads of 128 / 16 of 64), a couple of blocks, non-square latents, batch 2
WIDE = {
    "flux": (FluxConfig(in_channels=64, out_channels=64, num_heads=8, head_dim=128, depth=2, depth_single=2,
                        context_dim=512, pooled_dim=96, axes_dim=(16, 56, 56)), (2, 24, 16, 16)),
    "sd3": (MMDiTConfig(num_layers=2, num_heads=16, head_dim=64, context_dim=512, pooled_dim=96,
                        pos_embed_max_size=16, sample_size=16), (2, 24, 16, 16)),
}


@pytest.fixture(scope="module", params=sorted(WIDE))
def wide(request):
    cfg, shape = WIDE[request.param]
    model = _random_everywhere(Transformer.init(cfg, seed=3), seed=4)
    args = _inputs(5, shape, 40, cfg.context_dim, cfg.pooled_dim, getattr(cfg, "guidance_embed", False))
    return request.param, model, args, np.asarray(model(*args), np.float64)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_velocity_error_at_realistic_width(wide, fmt, dtype):
    name, model, args, ref = wide
    base = model if dtype == "float32" else Transformer(model.config, jax.tree.map(
        lambda x: x.astype(jnp.bfloat16), model.params), "bfloat16")
    q = quantize_transformer(base, fmt)
    err = _rel(q(*args), ref)
    err_float = _rel(base(*args), ref)
    print(f"\n{name} {dtype} {fmt}: velocity relative error {err:.2e} (unquantised {dtype}: {err_float:.2e})")
    assert 0 < err <= TOL[fmt]
    # the error is quantisation's own, not some other change: dequantised kernels run unquantised agree
    deq = dequantize_params(q.params, sites(abstract_module(q.config, q.dtype, fmt)), q.dtype)
    np.testing.assert_allclose(np.asarray(base.apply(deq, *args), np.float32), np.asarray(q(*args), np.float32),
                               rtol=0, atol=(2e-5 if dtype == "float32" else 0.1) * np.abs(ref).max())


@pytest.mark.slow
def test_native_dot_switch_close_to_float(wide):
    name, model, args, ref = wide
    for fmt in ("int8", "fp8"):
        err = _rel(quantize_transformer(model, f"{fmt}:native")(*args), ref)
        print(f"\n{name} {fmt}:native velocity relative error {err:.2e}")
        assert 0 < err <= 2 * TOL[fmt]


def _bytes(tree):
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("preset", ["flux-dev", "sd3.5-large", "sd3.5-medium"])
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_parameter_bytes_at_released_sizes(preset, fmt):
    cfg = {**FLUX_PRESETS, **SD3_PRESETS}[preset]
    plain, quant = (Structure(abstract_module(cfg, jnp.bfloat16, q)) for q in (None, fmt))
    # parameters, as count_params counts them: buffers (SD3's position table) are not parameters
    params = [s.map_variables(lambda v: None if isinstance(v, Buffer) else v.get_value()) for s in (plain, quant)]
    ratio = _bytes(params[1]) / _bytes(params[0])
    whole = _bytes(quant.abstract_params()) / _bytes(plain.abstract_params())
    print(f"\n{preset} {fmt}: parameters {_bytes(params[1]) / 2**30:.2f} GiB, {ratio:.3f}x the bfloat16 bytes "
          f"({whole:.3f}x with buffers)")
    assert 0.5 < ratio <= 0.55


def test_quantised_tree_layout_and_sharding_names():
    cfg = WIDE["flux"][0]
    module = abstract_module(cfg, jnp.bfloat16, "fp8")
    structure = Structure(module)
    qkv = structure.abstract_params()["double_blocks"]["blocks"]["img_attn"]["qkv"]
    assert qkv["kernel"].dtype == jnp.float8_e4m3fn and qkv["kernel"].shape == (2, 1024, 3, 1024)
    assert qkv["kernel_scale"].dtype == jnp.bfloat16 and qkv["kernel_scale"].shape == (2, 3, 1024)
    names = structure.map_variables(lambda v: (type(v), v.get_metadata().get("out_sharding")))
    kind, axes = names["double_blocks"]["blocks"]["img_attn"]["qkv"]["kernel_scale"]
    assert kind is QuantScale and axes == ("layers", None, "qkv")  # split over "tensor" like the columns
    assert names["single_blocks"]["blocks"]["linear2"]["kernel_scale"][1] == ("layers", "embed")
    flat = structure.abstract_params()
    # embedders and the final layer stay in the model dtype
    assert flat["txt_in"]["kernel"].dtype == jnp.bfloat16 and "kernel_scale" not in flat["final_layer"]["linear"]
    # double: 2 x (qkv, proj, fc1, fc2, adaLN); single: linear1, linear2, adaLN
    assert len(sites(module)) == 10 + 3


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_per_channel_scales(fmt):
    w = jax.random.normal(jax.random.key(0), (2, 33, 3, 7)) * jnp.linspace(0.1, 5, 7)
    w = w.at[1, :, 2, 4].set(0.0)  # an all-zero channel
    spec = formats.parse_quantize(fmt)
    q, s = formats.quantize(w, spec, (1,), jnp.float32)
    assert q.dtype == spec.storage and s.shape == (2, 3, 7)
    np.testing.assert_allclose(s, np.where(np.abs(w).max(1) > 0, np.abs(w).max(1) / spec.qmax, 1.0), rtol=2e-7)
    assert float(jnp.abs(q.astype(jnp.float32)).max()) == spec.qmax
    back = formats.dequantize(q, s, (1,), jnp.float32)
    bound = s[:, None] * (0.5 if fmt == "int8" else 16.0)  # e4m3: spacing 32 near 448, half of it
    assert bool(jnp.all(jnp.abs(back - w) <= bound * (1 + 1e-6)))
    assert float(jnp.abs(back[1, :, 2, 4]).max()) == 0.0
    qn, sn = formats.quantize(np.asarray(w), spec, (1,), np.float32, xp=np)  # the loaders' host path
    np.testing.assert_array_equal(np.asarray(q).view(np.int8), qn.view(np.int8))
    np.testing.assert_array_equal(np.asarray(s), sn)


@pytest.mark.slow
@pytest.mark.parametrize("dot", ["dequant", "native"])
def test_gradients_reach_the_activations(dot):
    cfg = FluxConfig(in_channels=16, out_channels=16, num_heads=2, head_dim=16, depth=1, depth_single=2,
                     context_dim=24, pooled_dim=12, axes_dim=(4, 6, 6))
    model = _random_everywhere(Transformer.init(cfg, seed=7), seed=8)
    lat, sig, ctx, pooled, g = _inputs(9, (2, 6, 4, 4), 5, 24, 12, True)
    q = quantize_transformer(model, f"int8:{dot}")

    def loss(m, x, c):
        return jnp.sum(m.apply(m.params, x, sig, c, pooled, g) ** 2)

    grad = jax.jit(jax.grad(loss, argnums=(1, 2)), static_argnums=0)
    gq, gf = grad(q, lat, ctx), grad(model, lat, ctx)
    for a, b in zip(gq, gf):
        assert bool(jnp.all(jnp.isfinite(a))) and float(jnp.abs(a).max()) > 0
        assert _rel(a, b) < 0.1


@pytest.fixture(scope="module")
def tiny_saved(tmp_path_factory):
    cfg = MMDiTConfig(num_layers=3, num_heads=2, head_dim=8, context_dim=24, pooled_dim=20, pos_embed_max_size=8,
                      sample_size=8, dual_attention_layers=(0,), qk_norm="rms_norm")
    model = _random_everywhere(Transformer.init(cfg, seed=11), seed=12)
    folder = tmp_path_factory.mktemp("quant") / "transformer"
    save_transformer(model, folder)
    return model, str(folder)


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_load_quantised_matches_quantising_in_memory(tiny_saved, fmt):
    model, folder = tiny_saved
    loaded = load_transformer(folder, "float32", quantize=fmt)
    want = quantize_transformer(model, fmt)
    assert str(loaded.quantize) == fmt
    assert jax.tree.structure(loaded.params) == jax.tree.structure(want.params)
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(want.params)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)))
    args = _inputs(13, (2, 6, 4, 16), 5, 24, 20, False)
    np.testing.assert_allclose(loaded(*args), want(*args), rtol=1e-6, atol=1e-6)
    assert _rel(loaded(*args), model(*args)) < TOL[fmt]


@pytest.mark.slow
def test_lora_on_a_quantised_base(tiny_saved):
    """Adapters on the activations of a quantised base = the float model with the same adapters, to
    within quantisation; merged into the quantised kernels (requantised) likewise."""
    from mmdit_jax.lora import LoraConfig, apply_lora, init_lora, merge

    model, _ = tiny_saved
    q = quantize_transformer(model, "int8")
    lora = init_lora(model.config, LoraConfig(targets="all", rank=4), seed=1)
    lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape), lora)
    args = _inputs(14, (2, 6, 4, 16), 5, 24, 20, False)
    run = jax.jit(lambda m, lo: apply_lora(m, m.params, lo, *args), static_argnums=0)
    ref = run(model, lora)
    assert _rel(ref, model(*args)) > 0.05  # the adapters change the output
    assert _rel(run(q, lora), ref) < TOL["int8"]
    merged = jax.jit(merge)(q.params, lora)
    assert jax.tree.structure(merged) == jax.tree.structure(q.params)
    assert _rel(Transformer(q.config, merged, q.dtype, q.quantize)(*args), ref) < TOL["int8"]
    # gradients of the adapters through the frozen quantised base
    grads = jax.jit(jax.grad(lambda lo: jnp.sum(apply_lora(q, q.params, lo, *args) ** 2)))(lora)
    assert all(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(grads))


@pytest.mark.parametrize("value", ["int4", "INT8", "fp8:fast", 8])
def test_bad_quantize_value_is_one_clear_line(tiny_saved, value):
    _, folder = tiny_saved
    with pytest.raises(MMDiTError) as e:
        load_transformer(folder, quantize=value)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"quantize={value!r}: expected one of int8, fp8")


def test_quantising_twice_is_one_clear_line(tiny_saved):
    model, _ = tiny_saved
    with pytest.raises(MMDiTError, match=r"^quantize=fp8: the model is already quantised \(int8\)$"):
        quantize_transformer(quantize_transformer(model, "int8"), "fp8")
