"""SD3 / SD3.5 ControlNets (diffusers' SD3ControlNetModel) as a `ControlNetKind` (its `Family.controlnet`)."""
from mmdit_jax.families import ControlNetKind
from mmdit_jax.sd3 import controlnet, controlnet_weights


def _residuals(net, base, latents, sigma, context, pooled, control, scale, guidance, control_mode, remat):
    from mmdit_jax.errors import MMDiTError

    if control_mode is not None:
        raise MMDiTError("SD3 ControlNets take no control_mode (only FLUX Union nets do)")
    if base is None and not net.config.use_pos_embed:
        raise MMDiTError("this SD3 ControlNet reads the base model's patch tokens: pass base=")
    return controlnet.residuals(net, base, latents, sigma, context, pooled, control, scale, remat=remat)


SD3_CONTROLNET = ControlNetKind(
    family="sd3",
    diffusers_class=controlnet.DIFFUSERS_CLASS,
    config_class=controlnet.SD3ControlNetConfig,
    config_from_weights=controlnet_weights.config_from_weights,
    build=controlnet.SD3ControlNet,
    plan=controlnet_weights.plan,
    detect_layout=controlnet_weights.detect_layout,
    residuals=_residuals,
)
