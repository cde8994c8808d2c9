"""LoRA application on tiny random SD3 (QK-norm, a dual-attention layer) and FLUX-dev models: exact no-op
at init, merged == unmerged, stacking, bfloat16 base, dropout, training only the adapters, target
presets and block selection."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mmdit_jax as mj
from conftest import max_rel_err
from lora_oracle import SD3_KW, randomize
from mmdit_jax import lora as L
from mmdit_jax.lora import targets as tg


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{family: (loaded Transformer, inputs)} from randomized tiny diffusers models."""
    import flux_oracle
    import sd3_oracle

    out = {}
    sd3 = sd3_oracle.tiny_model(**SD3_KW)
    folder = tmp_path_factory.mktemp("sd3")
    sd3.save_pretrained(folder)
    x = sd3_oracle.inputs(sd3_oracle.tiny_config(**SD3_KW), batch=2, h=10, w=6, text_len=7)
    out["sd3"] = (mj.load_transformer(folder), tuple(x[k] for k in ("latents", "sigma", "context", "pooled")))
    flux = flux_oracle.tiny_flux(True)
    folder = tmp_path_factory.mktemp("flux")
    flux.save_pretrained(folder)
    args = flux_oracle.inputs(np.random.default_rng(0), flux_oracle.TINY, 2, 4, 6, 5, True)
    out["flux"] = (mj.load_transformer(folder), tuple(args))
    return out


def _fn(model, **kw):
    return jax.jit(lambda params, loras, scales, args: L.apply_lora(model, params, loras, *args,
                                                                     scales=scales, **kw))


def _lora(model, seed=0, **kw):
    return randomize(L.init_lora(model.config, L.LoraConfig(**kw), seed=seed), seed=seed)


FULL = dict(targets="all", rank=4, alpha=3.0, embedders=True)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_zero_b_is_an_exact_no_op(models, family):
    model, args = models[family]
    lora = L.init_lora(model.config, L.LoraConfig(**FULL))
    assert all(float(jnp.abs(w["B"]).max()) == 0 and float(jnp.abs(w["A"]).max()) > 0
               for _, _, w in lora.items())
    base = np.asarray(model(*args))
    merged = L.merge(model.params, lora)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(model.params)))
    for merged in (False, True):  # the same numbers through a differently fused graph
        out = np.asarray(_fn(model, merged=merged)(model.params, lora, None, args))
        print(f"{family} zero-B merged={merged}: max rel err {max_rel_err(out, base):.1e}")
        assert max_rel_err(out, base) < 1e-5


@pytest.mark.parametrize("family,blocks", [("sd3", dict(blocks=(0, 2))),
                                           ("flux", dict(blocks=(1,), single_blocks=(0,)))])
def test_merged_matches_unmerged(models, family, blocks):
    model, args = models[family]
    lora = _lora(model, **FULL, **blocks)
    base = np.asarray(model(*args))
    unmerged = np.asarray(_fn(model)(model.params, lora, None, args))
    merged = np.asarray(_fn(model, merged=True)(model.params, lora, None, args))
    err = max_rel_err(merged, unmerged)
    print(f"{family}: merged vs unmerged max rel err {err:.2e}; LoRA moves the output by "
          f"{max_rel_err(unmerged, base):.2f}")
    assert err < 2e-6
    assert max_rel_err(unmerged, base) > 1e-2  # the adapters do act


def test_two_adapters_stack(models):
    model, args = models["flux"]
    l1 = _lora(model, seed=1, targets="attn", rank=4)
    l2 = _lora(model, seed=2, targets="attn_mlp", rank=2, alpha=5.0, blocks=(0,), single_blocks=(1,))
    scales = (0.7, -1.3)
    both = np.asarray(_fn(model)(model.params, [l1, l2], scales, args))
    merged = np.asarray(_fn(model, merged=True)(model.params, [l1, l2], scales, args))
    one_then_other = np.asarray(_fn(model)(L.merge(model.params, l1, 0.7), l2, -1.3, args))
    only_first = np.asarray(_fn(model)(model.params, l1, 0.7, args))
    first_of_two = np.asarray(_fn(model)(model.params, [l1, l2], (0.7, 0.0), args))
    assert max_rel_err(merged, both) < 2e-6
    assert max_rel_err(one_then_other, both) < 2e-6
    assert max_rel_err(first_of_two, only_first) < 1e-6
    assert max_rel_err(both, only_first) > 1e-2


def test_bfloat16_base_with_float32_adapters(models):
    model, args = models["sd3"]
    lora = _lora(model, **FULL, blocks=(1, 2))
    ref = np.asarray(_fn(model)(model.params, lora, None, args))
    bf = mj.Transformer(model.config, jax.tree.map(lambda x: x.astype(jnp.bfloat16), model.params),
                        "bfloat16")
    for merged in (False, True):
        out = np.asarray(_fn(bf, merged=merged)(bf.params, lora, None, args), np.float32)
        err = max_rel_err(out, ref)
        print(f"bfloat16 base, merged={merged}: max rel err {err:.2e} vs float32")
        assert err < 5e-2
    merged_params = L.merge(bf.params, lora)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(merged_params) if x.dtype != np.float32)
    grads = jax.jit(jax.grad(lambda lo, p: jnp.mean(L.apply_lora(bf, p, lo, *args).astype(jnp.float32) ** 2)))(
        lora, bf.params)
    assert jax.tree.structure(grads) == jax.tree.structure(lora)
    assert all(g.dtype == jnp.float32 and bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))


def test_training_updates_only_the_adapters(models):
    """optax state holds the adapter factors and nothing else; a few Adam steps fit a target that a
    rank-2 adapter can reach, with dropout and remat on, the base params untouched."""
    model, args = models["sd3"]
    teacher = _lora(model, seed=5, targets="attn", rank=2)
    target = _fn(model)(model.params, teacher, None, args)
    student = L.init_lora(model.config, L.LoraConfig(targets="attn", rank=2), seed=6)
    opt = optax.adam(3e-2)
    state = opt.init(student)
    n_state = sum(x.size for x in jax.tree.leaves(state) if x.ndim)
    assert n_state == 2 * student.num_params()
    base = jax.tree.map(np.asarray, model.params)

    def loss_fn(lora, key):
        out = L.apply_lora(model, model.params, lora, *args, dropout=0.05, rng=key, remat="full")
        return jnp.mean((out - target) ** 2)

    @jax.jit
    def step(lora, state, key):
        loss, g = jax.value_and_grad(loss_fn)(lora, key)
        updates, state = opt.update(g, state, lora)
        return optax.apply_updates(lora, updates), state, loss

    losses = []
    for i in range(25):
        student, state, loss = step(student, state, jax.random.key(i))
        losses.append(float(loss))
    print(f"adapter-only training: loss {losses[0]:.4g} -> {losses[-1]:.4g}")
    assert losses[-1] < 0.2 * losses[0]
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(model.params)))


def test_dropout_acts_on_the_adapter_input_only(models):
    model, args = models["flux"]
    lora = _lora(model, targets="attn_mlp", rank=4)
    f = _fn(model, dropout=0.5)
    plain = np.asarray(_fn(model)(model.params, lora, None, args))
    a = np.asarray(f(model.params, lora, None, args))  # no rng: no dropout
    assert np.array_equal(a, plain)
    g = jax.jit(lambda key: L.apply_lora(model, model.params, lora, *args, dropout=0.5, rng=key))
    d1, d1b, d2 = (np.asarray(g(jax.random.key(k))) for k in (1, 1, 2))
    assert np.array_equal(d1, d1b) and not np.allclose(d1, d2) and not np.allclose(d1, plain)
    zero = L.init_lora(model.config, L.LoraConfig(targets="attn_mlp", rank=4))
    z = jax.jit(lambda key: L.apply_lora(model, model.params, zero, *args, dropout=0.5, rng=key))
    assert max_rel_err(z(jax.random.key(3)), model(*args)) < 1e-5  # the base path has no dropout
    with pytest.raises(mj.MMDiTError, match="unmerged"):
        L.apply_lora(model, model.params, lora, *args, merged=True, dropout=0.5, rng=jax.random.key(0))


def test_dropout_is_unbiased_inverted_dropout():
    """On one adapted Linear: kept inputs are scaled by 1/(1-p), so the mean update over masks is the
    update without dropout; about p of the inputs are dropped."""
    from flax import nnx

    from mmdit_jax.layers import Linear
    from mmdit_jax.lora.apply import LoraLinear

    din, dout, r, p = 6, 5, 3, 0.3
    base = Linear(din, dout, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((din, r)).astype(np.float32), rng.standard_normal((r, dout)).astype(np.float32)
    x = jnp.asarray(rng.standard_normal((4, 7, din)).astype(np.float32))

    def run(key_data):
        lin = LoraLinear(base, r, jnp.float32, p, True)
        for name, v in (("lora_a", a), ("lora_b", b), ("lora_scale", np.full(r, 0.5, np.float32)),
                        ("lora_key", key_data)):
            getattr(lin, name).set_value(jnp.asarray(v))
        return lin(x) - base(x)

    keys = jax.random.key_data(jax.random.split(jax.random.key(0), 4000))
    deltas = jax.vmap(run)(keys)
    want = (x @ a) * 0.5 @ b
    assert float(jnp.abs(deltas.mean(0) - want).max()) < 0.05 * float(jnp.abs(want).max())
    one = run(keys[0])
    assert not np.allclose(one, want)


def _modules(lora, model):
    tensors, _ = L.lora_tensors(lora, model, "diffusers")
    return {k[len("transformer."):-len(".lora_A.weight")] for k in tensors if k.endswith("lora_A.weight")}


def _tail(module):
    """Module name inside its block ("transformer_blocks.3.attn.to_q" -> "attn.to_q"); top-level as is."""
    return module.split(".", 2)[-1] if module.startswith(("transformer_blocks.", "single_transformer")) \
        else module


ATTN = {"to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"}


def test_presets_and_block_selection_flux(models):
    model, _ = models["flux"]
    cfg = model.config
    h = cfg.hidden_size
    attn = L.init_lora(cfg, L.LoraConfig(targets="attn", rank=2))
    assert list(attn.parts["single_blocks.blocks.linear1"]) == [f"0:{3 * h}"]  # q, k, v of linear1
    mods = _modules(attn, model)
    assert {m.rsplit("attn.", 1)[-1] for m in mods} == ATTN
    assert {m.split(".")[0] for m in mods} == {"transformer_blocks", "single_transformer_blocks"}
    mlp = L.init_lora(cfg, L.LoraConfig(targets="attn_mlp", rank=2))
    assert list(mlp.parts["single_blocks.blocks.linear1"]) == [f"0:{3 * h + cfg.mlp_hidden}"]
    extra = _modules(mlp, model) - mods
    assert {_tail(m) for m in extra} == {"ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                                                     "ff_context.net.2", "proj_mlp", "proj_out"}
    every = L.init_lora(cfg, L.LoraConfig(targets="all", rank=2))
    extra = _modules(every, model) - _modules(mlp, model)
    assert {_tail(m) for m in extra} == {"norm1.linear", "norm1_context.linear", "norm.linear",
                                                     "norm_out.linear"}
    emb = _modules(L.init_lora(cfg, L.LoraConfig(targets="all", rank=2, embedders=True)), model)
    assert emb - _modules(every, model) == {
        "x_embedder", "context_embedder", "proj_out", "time_text_embed.timestep_embedder.linear_1",
        "time_text_embed.timestep_embedder.linear_2", "time_text_embed.text_embedder.linear_1",
        "time_text_embed.text_embedder.linear_2", "time_text_embed.guidance_embedder.linear_1",
        "time_text_embed.guidance_embedder.linear_2"}
    some = L.init_lora(cfg, L.LoraConfig(targets="attn", rank=2, blocks=(1,), single_blocks=()))
    assert {m.split(".")[:2] == ["transformer_blocks", "1"] for m in _modules(some, model)} == {True}
    assert some.parts["double_blocks.blocks.img_attn.qkv"][f"0:{3 * h}"].rows == (1,)
    assert some.weights["double_blocks.blocks.img_attn.qkv"][f"0:{3 * h}"]["A"].shape == (1, h, 2)


def test_presets_and_block_selection_sd3(models):
    model, _ = models["sd3"]
    cfg = model.config
    attn = _modules(L.init_lora(cfg, L.LoraConfig(targets="attn", rank=2)), model)
    assert {_tail(m) for m in attn} == {f"attn.{n}" for n in ATTN} | {
        f"attn2.{n}" for n in ("to_q", "to_k", "to_v", "to_out.0")}
    assert "transformer_blocks.2.attn.to_add_out" not in attn  # the last block's context is pre-only
    assert "transformer_blocks.1.attn2.to_q" not in attn  # only block 0 has dual attention
    one = L.init_lora(cfg, L.LoraConfig(targets="all", rank=2, blocks=(2,)))
    assert {m.split(".")[1] for m in _modules(one, model) if m.startswith("transformer_blocks.")} == {"2"}
    assert "norm_out.linear" in _modules(one, model)  # "all" includes the final adaLN (not a block)
    assert "transformer_blocks.2.norm1_context.linear" in _modules(one, model)


@pytest.mark.parametrize("kw,msg", [(dict(targets="qkv"), "targets"), (dict(rank=0), "rank"),
                                    (dict(dropout=1.0), "dropout"), (dict(init="zeros"), "init"),
                                    (dict(blocks=(7,)), "blocks"), (dict(single_blocks=(0,)), "single")])
def test_bad_lora_configs(models, kw, msg):
    model, _ = models["sd3"]
    with pytest.raises(mj.MMDiTError, match=msg):
        L.init_lora(model.config, L.LoraConfig(**kw))


def test_target_table_covers_every_linear(models):
    """Every Linear kernel of both models is a target except SD3's conv-stored patch embedding."""
    for family, (model, _) in models.items():
        kernels = set()

        def walk(tree, prefix=()):
            for k, v in tree.items():
                if isinstance(v, dict):
                    walk(v, prefix + (k,))
                elif k == "kernel":
                    kernels.add(prefix)

        walk(model.params)
        have = {t.path for t in tg.targets(model.config)}
        assert kernels - have == ({("x_embedder",)} if family == "sd3" else set())


SHARDED = """
import jax, jax.numpy as jnp, numpy as np
import mmdit_jax as mj
from mmdit_jax import lora as L
from mmdit_jax.sharding import make_mesh
cfg = mj.MMDiTConfig(num_layers=2, num_heads=4, head_dim=16, context_dim=24, pooled_dim=8,
                     pos_embed_max_size=8, qk_norm=True)
tm = mj.Transformer.init(cfg, seed=0)
params = jax.tree.map(lambda p: (p + 0.05 * jnp.sin(jnp.arange(p.size).reshape(p.shape))), tm.params)
bf = mj.Transformer(cfg, jax.tree.map(lambda p: p.astype(jnp.bfloat16), params), "bfloat16")
lora = L.init_lora(cfg, L.LoraConfig(targets="attn_mlp", rank=4), seed=1)
lora = jax.tree.map(lambda a: a + 0.1 * jnp.cos(jnp.arange(a.size).reshape(a.shape)), lora)
r = np.random.default_rng(0)
x = (r.standard_normal((4, 6, 4, 16), np.float32), np.full((4,), 0.5, np.float32),
     r.standard_normal((4, 5, 24), np.float32), r.standard_normal((4, 8), np.float32))
loss = lambda lo, p, key: jnp.mean(L.apply_lora(bf, p, lo, *x, dropout=0.1, rng=key).astype(jnp.float32) ** 2)
step = jax.jit(jax.value_and_grad(loss))
merged = jax.jit(lambda p, lo: L.apply_lora(bf, p, lo, *x, merged=True))
ref_loss, ref_grad = step(lora, bf.params, jax.random.key(0))
ref_out = merged(bf.params, lora)
mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
sharded = jax.device_put(bf.params, bf.param_shardings(mesh))
qkv = sharded["groups"][0]["blocks"]["x_block"]["attn"]["qkv"]["kernel"]
assert qkv.dtype == jnp.bfloat16 and qkv.addressable_shards[0].data.shape == (1, 32, 3, 32)
l, g = step(lora, sharded, jax.random.key(0))
out = merged(sharded, lora)
flat = lambda t: jnp.concatenate([a.reshape(-1) for a in jax.tree.leaves(t)])
gerr = float(jnp.linalg.norm(flat(g) - flat(ref_grad)) / jnp.linalg.norm(flat(ref_grad)))
oerr = float(jnp.abs(out.astype(jnp.float32) - ref_out.astype(jnp.float32)).max()
             / jnp.abs(ref_out.astype(jnp.float32)).max())
lerr = abs(float(l) - float(ref_loss)) / abs(float(ref_loss))
assert lerr < 2e-2 and gerr < 2e-2 and oerr < 4e-2, (lerr, gerr, oerr)
# a float32 base: every adapter's gradient (each factor of each adapter) as on one device
f32 = mj.Transformer(cfg, params)
step32 = jax.jit(jax.grad(lambda lo, p, key: jnp.mean(L.apply_lora(f32, p, lo, *x, dropout=0.1, rng=key) ** 2)))
one = step32(lora, params, jax.random.key(0))
eight = step32(lora, jax.device_put(params, f32.param_shardings(mesh)), jax.random.key(0))
rel = [float(jnp.abs(a - b).max() / jnp.abs(b).max()) for a, b in zip(jax.tree.leaves(eight), jax.tree.leaves(one))]
assert len(rel) == 2 * len(list(lora.items())) and min(float(jnp.abs(b).max()) for b in jax.tree.leaves(one)) > 0
print("F32", len(rel), max(rel))
assert max(rel) < 1e-5, rel
print("OK", float(l), float(ref_loss), gerr, oerr)
"""


@pytest.mark.slow
def test_sharded_bfloat16_base_with_adapters():
    """A bfloat16 base sharded over 8 virtual devices (fsdp x tensor x data) trains float32 adapters
    (dropout on) and samples merged, agreeing with one device up to bfloat16 rounding; with a float32
    base every adapter's gradient agrees with one device's to float32 rounding."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout + res.stderr[-3000:]
    print(res.stdout.strip())
