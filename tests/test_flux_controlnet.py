"""FLUX.1 ControlNet parity with diffusers' FluxControlNetModel, FluxMultiControlNetModel and the
residuals FluxTransformer2DModel adds (controlnet_block_samples / controlnet_single_block_samples)."""
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import max_rel_err, randomize_torch_

import mmdit_jax as mj
from flux_oracle import TINY, correctly_rounded_sinusoid, inputs, tiny_flux

BASE = dict(num_layers=3, num_single_layers=5)  # more blocks than every net: the intervals are exercised
NETS = {
    "plain": dict(num_layers=2, num_single_layers=2),
    "union": dict(num_layers=1, num_single_layers=3, num_mode=4),
    "single_only": dict(num_layers=0, num_single_layers=2),
    # XLabs-style: a conv stack reads the control image (8x the latents) before the control embedding
    "hint": dict(num_layers=2, num_single_layers=0, conditioning_embedding_channels=16, patch_size=2),
}


def torch_net(seed, **kw):
    from diffusers import FluxControlNetModel

    torch.manual_seed(seed)
    cfg = {**TINY, "guidance_embeds": True, **kw}
    return randomize_torch_(FluxControlNetModel(**cfg), std=0.2, seed=seed).eval()


def _ids(b, h, w, n_txt):
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    return FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32), torch.zeros(n_txt, 3)


def _pack(a):
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    t = torch.tensor(a).permute(0, 3, 1, 2)
    return FluxPipeline._pack_latents(t, *t.shape)


def torch_net_kwargs(x, control, mode, scale, hint=False):
    lat, sigma, ctx, pooled, g = x
    img_ids, txt_ids = _ids(lat.shape[0], lat.shape[1], lat.shape[2], ctx.shape[1])
    cond = torch.tensor(control).permute(0, 3, 1, 2) if hint else _pack(control)
    return dict(hidden_states=_pack(lat), controlnet_cond=cond, conditioning_scale=scale,
                controlnet_mode=None if mode is None else torch.tensor(mode).reshape(-1, 1),
                encoder_hidden_states=torch.tensor(ctx), pooled_projections=torch.tensor(pooled),
                timestep=torch.tensor(sigma), img_ids=img_ids, txt_ids=txt_ids, guidance=torch.tensor(g),
                return_dict=False)


def torch_base(base, x, double=None, single=None, repeat=False):
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    lat, sigma, ctx, pooled, g = x
    b, h, w, _ = lat.shape
    img_ids, txt_ids = _ids(b, h, w, ctx.shape[1])
    t = lambda s: None if s is None else [torch.tensor(np.asarray(a)) for a in s]
    out = base(hidden_states=_pack(lat), encoder_hidden_states=torch.tensor(ctx),
               pooled_projections=torch.tensor(pooled), timestep=torch.tensor(sigma), img_ids=img_ids,
               txt_ids=txt_ids, guidance=torch.tensor(g), controlnet_block_samples=t(double),
               controlnet_single_block_samples=t(single), controlnet_blocks_repeat=repeat).sample
    return FluxPipeline._unpack_latents(out, h, w, 1).permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    base = tiny_flux(True, seed=3, **BASE)
    folder = tmp_path_factory.mktemp("base")
    base.save_pretrained(folder)
    nets = {}
    for i, (name, kw) in enumerate(NETS.items()):
        net = torch_net(10 + i, **kw)
        f = tmp_path_factory.mktemp(name)
        net.save_pretrained(f)
        nets[name] = (net, str(f))
    return base, str(folder), nets


def _x(seed=0, h=4, w=6):
    return inputs(np.random.default_rng(seed), {**TINY}, batch=2, h=h, w=w, text_len=5)


def _control(x, hint, seed=7):
    lat = x[0]
    shape = (2, lat.shape[1] * 8, lat.shape[2] * 8, 3) if hint else lat.shape
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("name", list(NETS))
def test_net_outputs_match_diffusers(models, name):
    _, _, nets = models
    torch_model, folder = nets[name]
    x = _x()
    hint = name == "hint"
    control = _control(x, hint)
    mode = np.array([2, 0]) if name == "union" else None
    with correctly_rounded_sinusoid(), torch.no_grad():
        ref = torch_model(**torch_net_kwargs(x, control, mode, 0.6, hint))
    net = mj.load_controlnet(folder)
    got = net.residuals(net.params, *[jnp.asarray(a) for a in x[:4]], jnp.asarray(control), 0.6,
                        guidance=jnp.asarray(x[4]), control_mode=None if mode is None else jnp.asarray(mode))
    for key, r in zip(("controlnet_block_samples", "controlnet_single_block_samples"), ref):
        if r is None:
            assert got[key] is None
            continue
        r = torch.stack(r).numpy()
        assert got[key].shape == r.shape
        assert max_rel_err(got[key], r) < 2e-5, (key, max_rel_err(got[key], r))


@pytest.mark.parametrize("k_double,k_single,repeat", [(1, 2, False), (2, 3, False), (2, 1, True), (5, 7, False)])
def test_base_with_residuals_matches_diffusers(models, k_double, k_single, repeat):
    base, base_folder, _ = models
    x = _x(seed=1, h=6, w=4)
    r = np.random.default_rng(k_double)
    n = (6 // 2) * (4 // 2)
    double = [r.standard_normal((2, n, 64)).astype(np.float32) * 0.5 for _ in range(k_double)]
    single = [r.standard_normal((2, n, 64)).astype(np.float32) * 0.5 for _ in range(k_single)]
    with correctly_rounded_sinusoid(), torch.no_grad():
        ref = torch_base(base, x, double, single, repeat)
        plain = torch_base(base, x)
    tm = mj.load_transformer(base_folder)
    got = np.asarray(tm(*[jnp.asarray(a) for a in x], controlnet_block_samples=jnp.stack(double),
                        controlnet_single_block_samples=single, controlnet_blocks_repeat=repeat))
    assert max_rel_err(got, ref) < 2e-5, max_rel_err(got, ref)
    assert max_rel_err(ref, plain) > 1e-3  # the residuals do change the output


def test_no_residuals_is_bit_identical(models):
    _, base_folder, _ = models
    x = [jnp.asarray(a) for a in _x(seed=2)]
    tm = mj.load_transformer(base_folder)
    np.testing.assert_array_equal(np.asarray(tm.apply(tm.params, *x)),
                                  np.asarray(tm.apply(tm.params, *x, controlnet_block_samples=None,
                                                      controlnet_single_block_samples=None)))


@pytest.mark.parametrize("nets_used", [("union", "plain"), ("union",)])
def test_several_controls_summed_into_the_base_match_diffusers(models, nets_used):
    """Two nets (a Union net with its mode and a plain one), or one Union net read twice with two modes,
    as FluxMultiControlNetModel runs them."""
    from diffusers.models.controlnets.controlnet_flux import FluxMultiControlNetModel

    base, base_folder, nets = models
    x = _x(seed=3)
    controls = [_control(x, False, seed=1), _control(x, False, seed=2)]
    modes = [np.array([1, 3]), np.array([0, 0])]
    scales = [0.7, 0.4]
    multi = FluxMultiControlNetModel([nets[n][0] for n in nets_used])
    lat, sigma, ctx, pooled, g = x
    img_ids, txt_ids = _ids(2, lat.shape[1], lat.shape[2], ctx.shape[1])
    with correctly_rounded_sinusoid(), torch.no_grad():
        double, single = multi(hidden_states=_pack(lat), controlnet_cond=[_pack(c) for c in controls],
                               controlnet_mode=[torch.tensor(m) for m in modes], conditioning_scale=scales,
                               encoder_hidden_states=torch.tensor(ctx), pooled_projections=torch.tensor(pooled),
                               timestep=torch.tensor(sigma), img_ids=img_ids, txt_ids=txt_ids,
                               guidance=torch.tensor(g), return_dict=False)
        ref = torch_base(base, x, double, single)
    tm = mj.load_transformer(base_folder)
    loaded = [mj.load_controlnet(nets[n][1], base=tm) for n in nets_used]
    # the plain net takes no mode: diffusers ignores it there, we pass None
    mode_in = [jnp.asarray(m) for m in modes]
    if len(nets_used) == 2:
        mode_in[1] = None
    res = mj.controlnet.multi_residuals([(n, n.params) for n in loaded], *[jnp.asarray(a) for a in x[:4]],
                                        [jnp.asarray(c) for c in controls], scales, guidance=jnp.asarray(g),
                                        control_modes=mode_in)
    got = np.asarray(tm(*[jnp.asarray(a) for a in x], **res))
    assert max_rel_err(got, ref) < 2e-5, max_rel_err(got, ref)


def test_plan_exports_the_diffusers_keys(models):
    from mmdit_jax.io.rules import export_params

    _, _, nets = models
    for name in ("union", "hint"):
        torch_model, folder = nets[name]
        net = mj.load_controlnet(folder)
        sd = torch_model.state_dict()
        back = dict(export_params(net.kind.plan(net.config), net.params, "diffusers"))
        assert sorted(back) == sorted(sd), name
        for k in sd:
            np.testing.assert_array_equal(back[k], sd[k].numpy(), err_msg=k)
