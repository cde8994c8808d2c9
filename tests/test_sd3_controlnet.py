"""SD3 / SD3.5 ControlNet parity with diffusers' SD3ControlNetModel, SD3MultiControlNetModel and the
residuals SD3Transformer2DModel adds (`block_controlnet_hidden_states`)."""
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import max_rel_err, randomize_torch_
from safetensors.torch import save_file

import mmdit_jax as mj
from sd3_oracle import inputs, tiny_config, tiny_model

BASE = dict(num_layers=5, qk_norm="rms_norm", dual_attention_layers=(1,))
# nets with fewer blocks than the base: the interval logic maps 2 / 3 residuals onto 4 blocks
NETS = {
    "joint": dict(num_layers=2, qk_norm="rms_norm", dual_attention_layers=(1,), extra_conditioning_channels=1),
    "joint_plain": dict(num_layers=3),
    # SD3.5-Large style: no patch embedding, no context embedder, x-only blocks
    "x_only": dict(num_layers=2, joint_attention_dim=None, use_pos_embed=False, pos_embed_type=None,
                   pos_embed_max_size=None, force_zeros_for_pooled_projection=False),
}


def net_config(**kw):
    cfg = tiny_config(**{k: v for k, v in kw.items() if k in tiny_config()})
    cfg.pop("out_channels")
    cfg.update({k: v for k, v in kw.items() if k not in tiny_config()})
    if kw.get("joint_attention_dim", 0) is None:
        cfg["joint_attention_dim"] = None
    return cfg


def torch_net(seed, **kw):
    from diffusers import SD3ControlNetModel

    torch.manual_seed(seed)
    net = SD3ControlNetModel(**net_config(**kw)).eval()
    bufs = ("pos_embed.pos_embed",) if net.pos_embed is not None else ()
    return randomize_torch_(net, std=0.1, seed=seed, buffers=bufs)


def control_for(x, channels, seed=5):
    r = np.random.default_rng(seed)
    return r.standard_normal(x["latents"].shape[:3] + (channels,)).astype(np.float32)


def nchw(a):
    return torch.tensor(a).permute(0, 3, 1, 2)


def torch_net_forward(net, base, x, control, scale):
    if net.pos_embed is None:  # as StableDiffusion3ControlNetPipeline does for these nets
        net.pos_embed = net._get_pos_embed_from_transformer(base)
    joint = net.context_embedder is not None
    out = net(hidden_states=nchw(x["latents"]), controlnet_cond=nchw(control), conditioning_scale=scale,
              encoder_hidden_states=torch.tensor(x["context"]) if joint else None,
              pooled_projections=torch.tensor(x["pooled"]), timestep=torch.tensor(x["sigma"]) * 1000,
              return_dict=False)[0]
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    base = tiny_model(seed=3, **BASE)
    folder = tmp_path_factory.mktemp("base")
    base.save_pretrained(folder)
    nets = {}
    for i, (name, kw) in enumerate(NETS.items()):
        net = torch_net(10 + i, **kw)
        f = tmp_path_factory.mktemp(name)
        net.save_pretrained(f)
        nets[name] = (net, str(f))
    return base, str(folder), nets


def _jax(x):
    return [jnp.asarray(x[k]) for k in ("latents", "sigma", "context", "pooled")]


@pytest.mark.parametrize("name", list(NETS))
def test_net_outputs_match_diffusers(models, name):
    base, base_folder, nets = models
    torch_model, folder = nets[name]
    cfg = net_config(**NETS[name])
    x = inputs(tiny_config(**BASE), batch=2, h=10, w=6, text_len=7)
    control = control_for(x, cfg["in_channels"] + cfg.get("extra_conditioning_channels", 0))
    with torch.no_grad():
        ref = torch.stack(torch_net_forward(torch_model, base, x, control, 0.7)).numpy()
    tm = mj.load_transformer(base_folder)
    net = mj.load_controlnet(folder, base=tm)
    out = net.residuals(net.params, *_jax(x), jnp.asarray(control), 0.7, base=tm.module(tm.params))
    got = np.asarray(out["controlnet_block_samples"])
    assert got.shape == ref.shape == (NETS[name]["num_layers"], 2, 15, 64)
    assert max_rel_err(got, ref) < 2e-5, max_rel_err(got, ref)


def torch_base(base, x, samples):
    return base(hidden_states=nchw(x["latents"]), encoder_hidden_states=torch.tensor(x["context"]),
                pooled_projections=torch.tensor(x["pooled"]), timestep=torch.tensor(x["sigma"]) * 1000,
                block_controlnet_hidden_states=samples).sample.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("k", [1, 2, 3, 7])
def test_base_with_residuals_matches_diffusers(models, k):
    base, base_folder, _ = models
    x = inputs(tiny_config(**BASE), batch=2, h=6, w=10, text_len=5)
    r = np.random.default_rng(k)
    samples = [r.standard_normal((2, 15, 64)).astype(np.float32) * 0.5 for _ in range(k)]
    with torch.no_grad():
        ref = torch_base(base, x, [torch.tensor(s) for s in samples])
        plain = torch_base(base, x, None)
    tm = mj.load_transformer(base_folder)
    got = np.asarray(tm(*_jax(x), controlnet_block_samples=jnp.stack(samples)))
    assert max_rel_err(got, ref) < 2e-5, max_rel_err(got, ref)
    assert max_rel_err(ref, plain) > 1e-2  # the residuals do change the output


def test_no_residuals_is_bit_identical(models):
    _, base_folder, _ = models
    x = inputs(tiny_config(**BASE), batch=2, h=6, w=10, text_len=5)
    tm = mj.load_transformer(base_folder)
    a = np.asarray(tm.apply(tm.params, *_jax(x)))
    b = np.asarray(tm.apply(tm.params, *_jax(x), controlnet_block_samples=None))
    np.testing.assert_array_equal(a, b)


def test_two_nets_summed_into_the_base_match_diffusers(models):
    from diffusers.models.controlnets.controlnet_sd3 import SD3MultiControlNetModel

    base, base_folder, nets = models
    x = inputs(tiny_config(**BASE), batch=2, h=10, w=6, text_len=7)
    (ta, fa), (tb, fb) = nets["joint"], nets["joint_plain"]
    ca, cb = control_for(x, 17, seed=1), control_for(x, 16, seed=2)
    multi = SD3MultiControlNetModel([ta, tb])
    with torch.no_grad():
        samples = multi(hidden_states=nchw(x["latents"]), controlnet_cond=[nchw(ca), nchw(cb)],
                        conditioning_scale=[0.8, 0.5], pooled_projections=torch.tensor(x["pooled"]),
                        encoder_hidden_states=torch.tensor(x["context"]),
                        timestep=torch.tensor(x["sigma"]) * 1000, return_dict=False)[0]
        ref = torch_base(base, x, list(samples))
    tm = mj.load_transformer(base_folder)
    na, nb = mj.load_controlnet(fa), mj.load_controlnet(fb)
    res = mj.controlnet.multi_residuals([(na, na.params), (nb, nb.params)], *_jax(x),
                                        [jnp.asarray(ca), jnp.asarray(cb)], [0.8, 0.5])
    assert res["controlnet_block_samples"].shape[0] == len(samples) == 2  # zipped: the shorter net bounds it
    got = np.asarray(tm(*_jax(x), **res))
    assert max_rel_err(got, ref) < 2e-5, max_rel_err(got, ref)


def to_sai_controlnet(sd):
    """diffusers x-only SD3ControlNetModel state dict -> Stability AI's SD3.5 ControlNet file layout
    (the inverse of diffusers' scripts/convert_sd3_controlnet_to_diffusers.py, written from its table)."""
    out = {}
    for k, v in sd.items():
        if k.startswith("transformer_blocks."):
            i, rest = k.split(".", 2)[1:]
            if rest.startswith(("attn.to_k", "attn.to_v")):
                continue
            if rest.startswith("attn.to_q"):
                s = rest.rsplit(".", 1)[1]
                v = torch.cat([sd[f"transformer_blocks.{i}.attn.to_{n}.{s}"] for n in "qkv"])
                rest = f"attn.qkv.{s}"
            for a, b in (("attn.to_out.0", "attn.proj"), ("ff.net.0.proj", "mlp.fc1"), ("ff.net.2", "mlp.fc2"),
                         ("norm1.linear", "adaLN_modulation.1")):
                rest = rest.replace(a, b)
            k = f"transformer_blocks.{i}.{rest}"
        out[k] = v.detach().clone().contiguous()
    return out


def test_sai_single_file_matches_diffusers(models, tmp_path):
    base, base_folder, _ = models
    # the file records no head width: SD3's 64 is assumed (one head of 64 here, the base's width)
    torch_model = torch_net(20, **NETS["x_only"], attention_head_dim=64, num_attention_heads=1)
    sd = {k: v for k, v in torch_model.state_dict().items() if not k.startswith("pos_embed.")}
    path = tmp_path / "sd3.5_controlnet.safetensors"
    save_file(to_sai_controlnet(sd), str(path))
    tm = mj.load_transformer(base_folder)
    net = mj.load_controlnet(str(path), base=tm)
    assert net.config.num_layers == 2 and not net.config.joint and not net.config.use_pos_embed
    x = inputs(tiny_config(**BASE), batch=2, h=6, w=10, text_len=5)
    control = control_for(x, 16)
    with torch.no_grad():
        ref = torch.stack(torch_net_forward(torch_model, base, x, control, 1.0)).numpy()
    got = net.residuals(net.params, *_jax(x), jnp.asarray(control), base=tm.module(tm.params))
    assert max_rel_err(got["controlnet_block_samples"], ref) < 2e-5


def test_plan_exports_the_diffusers_keys(models):
    from mmdit_jax.io.rules import export_params

    _, _, nets = models
    torch_model, folder = nets["joint"]
    net = mj.load_controlnet(folder)
    plan = net.kind.plan(net.config)
    sd = torch_model.state_dict()
    back = dict(export_params(plan, net.params, "diffusers", patch=2))
    assert sorted(back) == sorted(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k].numpy(), err_msg=k)


def test_remat_and_gradients_through_net_and_base(models):
    """Trainable as the trainer will use it: the net's gradient through the frozen base, with the
    blocks rematerialised, equals the one without remat (and is not zero)."""
    import jax

    _, base_folder, nets = models
    tm = mj.load_transformer(base_folder)
    net = mj.load_controlnet(nets["joint"][1])
    x = _jax(inputs(tiny_config(**BASE), batch=2, h=6, w=4, text_len=5))
    control = jnp.asarray(control_for(inputs(tiny_config(**BASE), batch=2, h=6, w=4), 17))

    def loss(params, remat):
        res = net.residuals(params, *x, control, remat=remat)
        return jnp.sum(tm.apply(tm.params, *x, remat=remat, **res) ** 2)

    g_plain = jax.grad(loss)(net.params, "none")
    g_remat = jax.jit(jax.grad(loss), static_argnums=1)(net.params, "full")
    a, b = g_plain["control_embedder"]["kernel"], g_remat["control_embedder"]["kernel"]
    assert float(jnp.abs(a).max()) > 0
    assert max_rel_err(b, a) < 1e-5
