"""FLUX.1 ControlNets (diffusers' FluxControlNetModel) as a `ControlNetKind` (its `Family.controlnet`)."""
from mmdit_jax.families import ControlNetKind
from mmdit_jax.flux import controlnet, controlnet_weights


def _residuals(net, base, latents, sigma, context, pooled, control, scale, guidance, control_mode, remat):
    # a FLUX net reads nothing of the base; a dev-style net takes the guidance a dev base takes
    return net(latents, sigma, context, pooled, control, scale, guidance if net.config.guidance_embed else None,
               control_mode, remat=remat)


FLUX_CONTROLNET = ControlNetKind(
    family="flux",
    diffusers_class=controlnet.DIFFUSERS_CLASS,
    config_class=controlnet.FluxControlNetConfig,
    config_from_weights=controlnet_weights.config_from_weights,
    build=controlnet.FluxControlNet,
    plan=controlnet_weights.plan,
    detect_layout=controlnet_weights.detect_layout,
    residuals=_residuals,
)
