"""Bad ControlNet input: one MMDiTError line naming what is wrong."""
import jax.numpy as jnp
import numpy as np
import pytest

import mmdit_jax as mj
from mmdit_jax.flux.config import FluxConfig
from mmdit_jax.flux.controlnet import FluxControlNetConfig
from mmdit_jax.sd3.config import MMDiTConfig
from mmdit_jax.sd3.controlnet import SD3ControlNetConfig

SD3_BASE = MMDiTConfig(num_layers=3, num_heads=2, head_dim=32, context_dim=40, pooled_dim=24, pos_embed_max_size=12)
FLUX_BASE = FluxConfig(num_heads=2, head_dim=32, depth=2, depth_single=2, context_dim=24, pooled_dim=20,
                       axes_dim=(4, 14, 14), guidance_embed=False)
SD3_NET = SD3ControlNetConfig(num_layers=2, num_heads=2, head_dim=32, context_dim=40, pooled_dim=24,
                              pos_embed_max_size=12, extra_conditioning_channels=1)
FLUX_NET = FluxControlNetConfig(num_heads=2, head_dim=32, depth=1, depth_single=1, context_dim=24, pooled_dim=20,
                                axes_dim=(4, 14, 14), num_mode=3)


def one_line(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg and msg
    return msg


@pytest.fixture(scope="module")
def nets():
    return {"sd3": mj.ControlNet.init(SD3_NET), "flux": mj.ControlNet.init(FLUX_NET)}


@pytest.fixture(scope="module")
def folders(tmp_path_factory, nets):
    out = {}
    for name, cfg in (("sd3", SD3_NET), ("flux", FLUX_NET)):
        net = nets[name]
        folder = tmp_path_factory.mktemp(name)
        from mmdit_jax.io.files import write_json
        from mmdit_jax.io.orbax_io import save_params

        write_json(str(folder / "config.json"), cfg.to_diffusers())
        save_params(str(folder), net.params)
        out[name] = str(folder)
    return out


def test_orbax_folder_round_trip(folders):
    net = mj.load_controlnet(folders["sd3"])
    assert net.config == SD3_NET


@pytest.mark.parametrize("net,base", [("sd3", FLUX_BASE), ("flux", SD3_BASE)])
def test_net_for_the_other_family(folders, net, base):
    with pytest.raises(mj.MMDiTError) as e:
        mj.load_controlnet(folders[net], base=base)
    assert "cannot steer" in one_line(e) and folders[net] in str(e.value)


def test_net_of_another_width():
    with pytest.raises(mj.MMDiTError) as e:
        SD3ControlNetConfig(num_layers=1, num_heads=3, head_dim=32).check_base(SD3_BASE)
    assert "do not match" in one_line(e)


def test_transformer_folder_is_not_a_controlnet(tmp_path):
    from mmdit_jax.io.files import write_json

    write_json(str(tmp_path / "config.json"), SD3_BASE.to_diffusers())
    from safetensors.numpy import save_file

    save_file({"pos_embed.proj.weight": np.zeros((64, 16, 2, 2), np.float32)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(mj.MMDiTError) as e:
        mj.load_controlnet(str(tmp_path))
    assert "not a ControlNet" in one_line(e)


def _sd3_inputs(h=6, w=4):
    r = np.random.default_rng(0)
    return (jnp.asarray(r.standard_normal((2, h, w, 16)), jnp.float32), jnp.full((2,), 0.5),
            jnp.zeros((2, 5, 40)), jnp.zeros((2, 24)))


@pytest.mark.parametrize("shape", [(2, 6, 6, 17), (2, 6, 4, 16), (1, 6, 4, 17), (2, 6, 4)])
def test_sd3_wrong_control_shape(nets, shape):
    net = nets["sd3"]
    with pytest.raises(mj.MMDiTError) as e:
        net.residuals(net.params, *_sd3_inputs(), jnp.zeros(shape))
    assert "control latents of shape" in one_line(e)


@pytest.mark.parametrize("shape", [(2, 6, 6, 16), (2, 6, 4, 17), (2, 48, 32, 3)])
def test_flux_wrong_control_shape(nets, shape):
    net = nets["flux"]
    lat, sigma, _, _ = _sd3_inputs()
    with pytest.raises(mj.MMDiTError) as e:
        net.residuals(net.params, lat, sigma, jnp.zeros((2, 5, 24)), jnp.zeros((2, 20)), jnp.zeros(shape),
                      control_mode=1)
    assert "control latents of shape" in one_line(e)


def test_flux_union_needs_a_mode_in_range(nets):
    net = nets["flux"]
    lat, sigma, _, _ = _sd3_inputs()
    args = (net.params, lat, sigma, jnp.zeros((2, 5, 24)), jnp.zeros((2, 20)), jnp.zeros(lat.shape))
    with pytest.raises(mj.MMDiTError) as e:
        net.residuals(*args)
    assert "control_mode" in one_line(e)
    with pytest.raises(mj.MMDiTError) as e:
        net.residuals(*args, control_mode=3)
    assert "outside 0..2" in one_line(e)


def test_residuals_of_the_wrong_shape_for_the_base():
    tm = mj.Transformer.init(SD3_BASE)
    with pytest.raises(mj.MMDiTError) as e:
        tm.apply(tm.params, *_sd3_inputs(), controlnet_block_samples=jnp.zeros((2, 2, 7, 64)))
    assert "controlnet_block_samples of shape" in one_line(e)
    tf = mj.Transformer.init(FLUX_BASE)
    lat, sigma, _, _ = _sd3_inputs()
    with pytest.raises(mj.MMDiTError) as e:
        tf.apply(tf.params, lat, sigma, jnp.zeros((2, 5, 24)), jnp.zeros((2, 20)),
                 controlnet_single_block_samples=jnp.zeros((1, 2, 6, 32)))
    assert "controlnet_single_block_samples of shape" in one_line(e)


def test_bad_config_values():
    with pytest.raises(mj.MMDiTError) as e:
        SD3ControlNetConfig.from_diffusers({"_class_name": "SD3ControlNetModel", "pos_embed_type": "rope"})
    assert "pos_embed_type" in one_line(e)
    with pytest.raises(mj.MMDiTError) as e:
        FluxControlNetConfig(num_heads=2, head_dim=32, axes_dim=(4, 14, 14), conditioning_embedding_channels=8)
    assert "conditioning_embedding_channels" in one_line(e)
