"""`Pipeline`: text to image (and image to image) for SD3 / SD3.5 / FLUX.1, matching diffusers'
StableDiffusion3Pipeline / FluxPipeline (and their Img2Img variants) for the same folder.

Host work is small (tokenizing, a schedule of N + 1 numbers); three jitted programs do the rest: text
encoding, the whole denoising loop (denoise.py) and VAE decoding. With several local devices the batch
is split over them (data parallel; parameters replicated). With `mesh` (a mesh over MESH_AXES or a dict
of axis sizes) the transformer's parameters are placed by the logical-axis rules (FSDP / tensor
parallel, for models too large for one device), the batch is split over "data" x "fsdp", and a
"sequence" axis makes attention context parallel.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mmdit_jax.io import paths
from mmdit_jax.errors import MMDiTError
from mmdit_jax.families import family_named, family_of_config
from mmdit_jax.progress import Progress, step_line
from mmdit_jax.sampling import schedules, solvers
from mmdit_jax.sampling.denoise import make_denoise
from mmdit_jax.sampling.guidance import SkipLayerGuidance
from mmdit_jax.sampling.images import to_pil

SCHEDULES = ("diffusers", "bfl")
OUTPUT_TYPES = ("pil", "np", "latent")


@dataclasses.dataclass(frozen=True)
class Defaults:
    """What the family's diffusers pipeline uses when an argument is None (`Family.sampling`), or what
    the folder's model_index.json `_sampling_defaults` sets (see `_folder_defaults`)."""
    num_inference_steps: int = 28
    guidance_scale: float = 7.0
    max_sequence_length: int = 256
    sample_size: int = 128  # latent pixels; images are sample_size * VAE factor


class Pipeline:
    # Latents with more pixels than this decode tile by tile (tiles of `decode_tile_size` image pixels,
    # diffusers' enable_tiling default): the VAE's mid-block attention over h*w latent tokens is
    # quadratic, ~1 GB per example at 128x128 latents (1024 px images) and 16x that at 2048 px.
    tiled_decode_above = 128 * 128
    decode_tile_size = 512

    def __init__(self, transformer, vae, text_encoders, scheduler: schedules.SchedulerConfig, name: str = "",
                 mesh=None):
        self.transformer, self.vae, self.text_encoders, self.scheduler = transformer, vae, text_encoders, scheduler
        self.name = name
        cfg = transformer.config
        self.family = cfg.family  # its name; `_family` the `Family`
        self._family = fam = family_of_config(cfg)
        if fam.sampling is None:
            raise MMDiTError(f"{name or cfg.family}: mj.Pipeline does not sample {cfg.family} models yet; "
                             "load_transformer, load_vae and load_text_encoders read them")
        self.latent_channels = getattr(cfg, "latent_channels", None) or cfg.in_channels
        self.vae_scale_factor = vae.config.downsample_factor
        if vae.config.latent_channels != self.latent_channels:
            raise MMDiTError(f"{name}: the VAE has {vae.config.latent_channels} latent channels but the "
                             f"transformer takes {self.latent_channels}")
        self.patch = fam.latent_patch(cfg)
        s = fam.sampling
        self.defaults = Defaults(s.num_inference_steps, s.guidance_scale, s.max_sequence_length,
                                 cfg.sample_size if s.sample_size is None else s.sample_size)
        self.has_guidance_embed = bool(getattr(cfg, "guidance_embed", False))
        self.progress = Progress(line=step_line)
        # a given mesh shards the transformer by the logical rules (FSDP / tensor / sequence); by default
        # several local devices split the batch and each holds the whole model
        self._sharded = mesh is not None
        if mesh is not None:
            self.mesh = as_mesh(mesh)
        else:
            devices = jax.local_devices()
            self.mesh = Mesh(np.array(devices), ("data",)) if len(devices) > 1 else None
        self._set_transformer_params(transformer.params)
        if self.mesh is not None:  # the placed copy replaces the loaded one (one VAE in memory)
            vae.params = jax.device_put(vae.params, NamedSharding(self.mesh, P()))
        self._vparams = vae.params
        apply = transformer.apply
        self._denoise = make_denoise(lambda p, x, s, c, y, g, skip: apply(p, x, s, c, y, g, skip_layers=skip),
                                     self.progress)
        decode = vae.decode_apply
        self._decode = jax.jit(lambda p, z: jnp.clip(decode(p, z) / 2 + 0.5, 0.0, 1.0))

    def _set_transformer_params(self, tparams):
        """Places `tparams` on the mesh and keeps only the placed copy: `transformer.params` is replaced
        too, else the loaded arrays (on device 0) would stay alive next to their placed copies."""
        if self.mesh is not None:
            sh = (self.transformer.param_shardings(self.mesh) if self._sharded
                  else NamedSharding(self.mesh, P()))
            tparams = jax.device_put(tparams, sh)
        self.transformer.params = self._tparams = tparams

    @classmethod
    def from_pretrained(cls, path, dtype=None, mesh=None, quantize=None) -> "Pipeline":
        """Transformer, VAE, text encoders and scheduler config of a model folder. `dtype` None: bfloat16
        on GPU/TPU, float32 on CPU (`mmdit_jax.transformer.default_dtype`). `mesh`: see the module
        docstring; the transformer's parameters are then read straight into their shards. `quantize`
        "int8" | "fp8": the transformer's block kernels stored quantised (`load_transformer`)."""
        from mmdit_jax.text import load_text_encoders
        from mmdit_jax.transformer import default_dtype, load_transformer
        from mmdit_jax.vae import load_vae

        dtype = default_dtype() if dtype is None else dtype
        path = paths.local(os.fspath(path))
        if not os.path.exists(path):
            raise MMDiTError(f"{path}: no such model folder")
        scheduler = schedules.read_scheduler_config(path)
        mesh = None if mesh is None else as_mesh(mesh)
        transformer = load_transformer(path, dtype, mesh=mesh, quantize=quantize)
        if family_of_config(transformer.config).sampling is None:  # before the VAE and encoders load
            cls(transformer, None, None, None, name=path)
        vae = load_vae(path, dtype)
        text = load_text_encoders(path, dtype, mesh=mesh)
        if family_named(text.family) is not family_of_config(transformer.config):
            raise MMDiTError(f"{path}: text encoders are {text.family}'s but the transformer is "
                             f"{transformer.config.family}")
        pipe = cls(transformer, vae, text, scheduler, name=path, mesh=mesh)
        pipe.defaults = _folder_defaults(path, pipe.defaults)
        return pipe

    def fuse_lora(self, loras, scales=None) -> "Pipeline":
        """Merges LoRA adapters into the transformer's weights (as diffusers' load_lora_weights +
        fuse_lora): `loras` a LoRA file path or `mj.lora.LoRA`, or a list of them (stacked, each with
        its scale in `scales`, default 1). Returns self."""
        from mmdit_jax.lora import load_lora, merge

        items = loras if isinstance(loras, (list, tuple)) else [loras]
        items = [load_lora(x, self.transformer) if isinstance(x, (str, os.PathLike)) else x for x in items]
        self._set_transformer_params(jax.jit(merge)(self.transformer.params, items, scales))
        return self

    # -- settings -----------------------------------------------------------------------------------
    def _size(self, height, width):
        d = self.defaults.sample_size * self.vae_scale_factor
        height, width = int(height or d), int(width or d)
        m = self.vae_scale_factor * self.patch
        if height <= 0 or width <= 0 or height % m or width % m:
            raise MMDiTError(f"height and width must be positive multiples of {m} (VAE factor "
                             f"{self.vae_scale_factor} x patch {self.patch}), got {height}x{width}")
        return height, width

    def _prompts(self, prompt, negative_prompt, n_per_prompt):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise MMDiTError("prompt must be a string or a non-empty list of strings")
        if negative_prompt is not None:
            neg = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
            if len(neg) != len(prompts):
                raise MMDiTError(f"{len(neg)} negative prompts for {len(prompts)} prompts")
        else:
            neg = None
        if not isinstance(n_per_prompt, (int, np.integer)) or n_per_prompt < 1:
            raise MMDiTError(f"num_images_per_prompt must be a positive integer, got {n_per_prompt!r}")
        return prompts, neg

    def _encode(self, prompts, n_per_prompt, max_sequence_length):
        ctx, pooled = self.text_encoders(prompts, max_sequence_length=max_sequence_length)
        # diffusers repeats each prompt's embeddings num_images_per_prompt times in place
        return jnp.repeat(ctx, n_per_prompt, axis=0), jnp.repeat(pooled, n_per_prompt, axis=0)

    def _sigmas(self, n_steps, latent_hw, sigmas, mu, schedule):
        seq_len = (latent_hw[0] // self.patch) * (latent_hw[1] // self.patch)
        sc = self.scheduler
        if schedule == "bfl":
            if sigmas is not None:
                raise MMDiTError("sigmas and schedule='bfl' exclude each other")
            return schedules.bfl_sigmas(n_steps, seq_len, sc.base_shift, sc.max_shift,
                                        shift=sc.use_dynamic_shifting)
        if schedule != "diffusers":
            raise MMDiTError(f"unknown schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")
        if sigmas is not None and n_steps is not None and len(sigmas) != n_steps:
            raise MMDiTError(f"{len(sigmas)} sigmas for num_inference_steps={n_steps}")
        if self._family.sampling.linspace_sigmas_with_mu:
            # FluxPipeline always passes linspace(1, 1/N, N) sigmas and mu
            if sigmas is None:
                sigmas = np.linspace(1.0, 1 / n_steps, n_steps)
            mu = schedules.calculate_shift(seq_len, sc.base_image_seq_len, sc.max_image_seq_len,
                                           sc.base_shift, sc.max_shift) if mu is None else mu
        elif sc.use_dynamic_shifting and mu is None:
            mu = schedules.calculate_shift(seq_len, sc.base_image_seq_len, sc.max_image_seq_len,
                                           sc.base_shift, sc.max_shift)
        return schedules.flow_match_sigmas(sc, n_steps, sigmas=sigmas, mu=mu)

    def _guidance_mode(self, guidance_scale, true_cfg_scale, neg, slg):
        """(cfg on?, cfg scale, embedded guidance or None, skip-layer guidance or None)."""
        s = self._family.sampling
        if s.guidance_scale_is_cfg and not self.has_guidance_embed:
            cfg_on = guidance_scale > 1.0
            if slg is not None and not cfg_on:
                slg = None  # diffusers applies skip-layer guidance inside its CFG branch only
            return cfg_on, float(guidance_scale), None, slg
        if slg is not None:
            raise MMDiTError("skip-layer guidance is for SD3-family models sampled with CFG (this model "
                             "has a guidance embedder)" if s.skip_layer_guidance else
                             "skip-layer guidance is for SD3-family models")
        cfg_on = true_cfg_scale > 1.0 and neg is not None
        return cfg_on, float(true_cfg_scale), (float(guidance_scale) if self.has_guidance_embed else None), None

    def _shard(self, tree):
        if self.mesh is None:
            return tree
        axes = tuple(a for a in ("data", "fsdp") if self.mesh.shape.get(a, 1) > 1)
        n = int(np.prod([self.mesh.shape[a] for a in axes]))

        def put(a):
            spec = P(axes) if axes and a.ndim and a.shape[0] % n == 0 else P()
            return jax.device_put(a, NamedSharding(self.mesh, spec))

        return jax.tree.map(put, tree)

    # -- the run --------------------------------------------------------------------------------------
    def _run(self, *, prompts, neg, n_per_prompt, x0, sigmas, guidance_scale, true_cfg_scale,
             max_sequence_length, sampler, slg, progress):
        batch = x0.shape[0]
        if max_sequence_length is None:
            max_sequence_length = self.defaults.max_sequence_length
        if max_sequence_length > 512:  # both diffusers pipelines refuse longer T5 prompts
            raise MMDiTError(f"max_sequence_length must be at most 512, got {max_sequence_length}")
        solvers.check(sampler)
        cfg_on, cfg_scale, g_embed, slg = self._guidance_mode(guidance_scale, true_cfg_scale, neg, slg)
        cond = self._encode(prompts, n_per_prompt, max_sequence_length)
        uncond = None
        if cfg_on:
            # SD3 encodes "" when there is no negative prompt (FLUX needs one to get here)
            uncond = self._encode(neg if neg is not None else [""] * len(prompts), n_per_prompt,
                                  max_sequence_length)
        n = len(sigmas) - 1
        sigma_in = sigmas[:-1]
        if self._family.sampling.sigma_through_timesteps:
            # FluxPipeline feeds timestep / 1000 with timestep = float32(sigma * 1000)
            sigma_in = schedules.timesteps_of(sigmas) / np.float32(1000)
        steps = dict(solvers.step_table(sampler, sigmas), sigma=sigmas[:-1].astype(np.float32),
                     sigma_in=np.asarray(sigma_in, np.float32),
                     slg=slg.active_steps(n) if slg is not None else np.zeros(n, bool))
        guidance = None if g_embed is None else np.full((batch,), g_embed, np.float32)
        scales = {"cfg": np.float32(cfg_scale), "slg": np.float32(slg.scale if slg else 0.0)}
        args = self._shard((x0, cond, uncond, guidance))
        if progress:
            self.progress.start(n, "sampling")
        # the ambient mesh turns on context-parallel attention with a "sequence" axis, and puts Mosaic
        # (splash) kernels in a shard_map on any mesh
        with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
            return self._denoise(self._tparams, *args, steps, scales, solver=sampler, cfg=cfg_on,
                                 slg_layers=slg.layers if slg else (), show_progress=bool(progress))

    def _noise(self, seed, shape):
        """Image j of a batch starts from normal(fold_in(key(seed), j)): one image's noise does not
        depend on how many are sampled with it."""
        key = jax.random.key(int(seed))
        return jnp.stack([jax.random.normal(jax.random.fold_in(key, j), shape[1:], jnp.float32)
                          for j in range(shape[0])])

    def _check_latents(self, latents, shape, what="latents"):
        latents = jnp.asarray(latents, jnp.float32)
        if latents.shape != shape:
            raise MMDiTError(f"{what} must have shape {shape} (B, h, w, C) NHWC, got {tuple(latents.shape)}")
        return latents

    def _output(self, latents, output_type):
        if output_type == "latent":
            return latents
        if latents.shape[1] * latents.shape[2] > self.tiled_decode_above:
            decoded = self.vae.decode_tiled(latents, tile_size=self.decode_tile_size)
            images = np.clip(np.asarray(decoded, np.float32) / 2 + 0.5, 0.0, 1.0)
        else:
            images = np.asarray(self._decode(self._vparams, latents))
        return images if output_type == "np" else to_pil(images)

    def __call__(self, prompt, negative_prompt=None, height=None, width=None, num_inference_steps=None,
                 guidance_scale=None, seed=0, num_images_per_prompt=1, latents=None, max_sequence_length=None,
                 output_type="pil", *, sigmas=None, mu=None, sampler="euler", schedule="diffusers",
                 true_cfg_scale=1.0, skip_guidance_layers=None, skip_layer_guidance_scale=2.8,
                 skip_layer_guidance_start=0.01, skip_layer_guidance_stop=0.2, progress=False):
        """Images for `prompt` (str or list). Defaults and semantics of the family's diffusers pipeline;
        `latents` (B, h, w, C) NHWC is the initial noise, else it comes from `seed`. output_type "np":
        (B, H, W, 3) float in [0, 1]; "pil": list of PIL images; "latent": the final latents.
        Beyond diffusers: sampler "euler" | "dpmpp_2m" (the SD3.5 reference's), schedule "diffusers" |
        "bfl" (BFL's get_schedule), progress (per-step line on stderr)."""
        if output_type not in OUTPUT_TYPES:
            raise MMDiTError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        prompts, neg = self._prompts(prompt, negative_prompt, num_images_per_prompt)
        height, width = self._size(height, width)
        n_steps = num_inference_steps or (len(sigmas) if sigmas is not None else self.defaults.num_inference_steps)
        gs = self.defaults.guidance_scale if guidance_scale is None else guidance_scale
        f = self.vae_scale_factor
        shape = (len(prompts) * num_images_per_prompt, height // f, width // f, self.latent_channels)
        x0 = self._noise(seed, shape) if latents is None else self._check_latents(latents, shape)
        sig = self._sigmas(n_steps, shape[1:3], sigmas, mu, schedule)
        slg = (skip_guidance_layers, skip_layer_guidance_scale, skip_layer_guidance_start, skip_layer_guidance_stop)
        return self._generate(prompts, neg, num_images_per_prompt, x0, sig, gs, true_cfg_scale, max_sequence_length,
                              sampler, slg, progress, output_type)

    def _generate(self, prompts, neg, n_per_prompt, x0, sigmas, guidance_scale, true_cfg_scale,
                  max_sequence_length, sampler, slg, progress, output_type):
        """The denoising loop from `x0` over `sigmas`, decoded; `slg` = (layers, scale, start, stop)."""
        layers, scale, start, stop = slg
        slg = SkipLayerGuidance(tuple(layers), scale, start, stop) if layers else None
        out = self._run(prompts=prompts, neg=neg, n_per_prompt=n_per_prompt, x0=x0, sigmas=sigmas,
                        guidance_scale=guidance_scale, true_cfg_scale=true_cfg_scale,
                        max_sequence_length=max_sequence_length, sampler=sampler, slg=slg, progress=progress)
        return self._output(out, output_type)

    def img2img(self, image, prompt, strength=0.6, negative_prompt=None, height=None, width=None,
                num_inference_steps=None, guidance_scale=None, seed=0, num_images_per_prompt=1, noise=None,
                max_sequence_length=None, output_type="pil", *, sigmas=None, mu=None, sampler="euler",
                schedule="diffusers", true_cfg_scale=1.0, skip_guidance_layers=None,
                skip_layer_guidance_scale=2.8, skip_layer_guidance_start=0.01, skip_layer_guidance_stop=0.2,
                progress=False):
        """StableDiffusion3Img2ImgPipeline / FluxImg2ImgPipeline: `image` (PIL image(s) or (B, H, W, 3)
        / (H, W, 3) floats in [0, 1]) is encoded (posterior mean), noised to the schedule's sigma at
        `strength`, and denoised over the remaining steps. `noise` (B, h, w, C) replaces the seeded noise.
        Images are repeated (tiled) to the batch as diffusers does."""
        if output_type not in OUTPUT_TYPES:
            raise MMDiTError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        prompts, neg = self._prompts(prompt, negative_prompt, num_images_per_prompt)
        pixels = _image_array(image, height, width)
        height, width = self._size(pixels.shape[1], pixels.shape[2])
        batch = len(prompts) * num_images_per_prompt
        if batch % pixels.shape[0]:
            raise MMDiTError(f"cannot repeat {pixels.shape[0]} images to a batch of {batch}")
        init = self.vae.encode(jnp.asarray(pixels * 2.0 - 1.0))
        init = jnp.concatenate([init] * (batch // pixels.shape[0]), axis=0)
        n_steps = num_inference_steps or (len(sigmas) if sigmas is not None else self.defaults.num_inference_steps)
        sig = self._sigmas(n_steps, init.shape[1:3], sigmas, mu, schedule)
        sig = schedules.truncate_for_strength(sig, float(strength))
        shape = tuple(init.shape)
        eps = self._noise(seed, shape) if noise is None else self._check_latents(noise, shape, "noise")
        s0 = jnp.float32(sig[0])
        x0 = s0 * eps + (1.0 - s0) * init  # the scheduler's scale_noise at the first kept sigma
        gs = self.defaults.guidance_scale if guidance_scale is None else guidance_scale
        slg = (skip_guidance_layers, skip_layer_guidance_scale, skip_layer_guidance_start, skip_layer_guidance_stop)
        return self._generate(prompts, neg, num_images_per_prompt, x0, sig, gs, true_cfg_scale, max_sequence_length,
                              sampler, slg, progress, output_type)


# A pipeline folder may set its own sampling defaults in model_index.json under this key (any of
# `Defaults`' fields; sample_size in latent pixels). diffusers fixes these in each pipeline's code and no
# diffusers config holds them; model_index.json is the one file every pipeline folder has, diffusers
# skips its "_" keys, and a training workdir keeps its base's, so a folder that needs other defaults
# (a small model trained at one image side and T5 length) carries them to every sampler.
SAMPLING_DEFAULTS_KEY = "_sampling_defaults"


def _folder_defaults(path: str, defaults: Defaults) -> Defaults:
    """`defaults` with what the folder's model_index.json `_sampling_defaults` sets."""
    from mmdit_jax.io.sources import read_json

    index = os.path.join(path, "model_index.json")
    folder_index = read_json(index) if os.path.isfile(index) else None
    raw = folder_index.get(SAMPLING_DEFAULTS_KEY) if isinstance(folder_index, dict) else None
    if raw is None:
        return defaults
    where = f"{index}: {SAMPLING_DEFAULTS_KEY}"
    if not isinstance(raw, dict):
        raise MMDiTError(f"{where} must be an object of {', '.join(f.name for f in dataclasses.fields(Defaults))}")
    fields = {f.name: f.type for f in dataclasses.fields(Defaults)}
    out = {}
    for name, value in raw.items():
        if name not in fields:
            raise MMDiTError(f"{where}: unknown setting {name!r}; known: {', '.join(fields)}")
        number = (int, float) if fields[name] == "float" else (int,)
        if isinstance(value, bool) or not isinstance(value, number) or value <= 0:
            raise MMDiTError(f"{where}: {name} must be a positive {fields[name]}, got {value!r}")
        out[name] = value
    return dataclasses.replace(defaults, **out)


def as_mesh(mesh):
    """A jax Mesh as given, or one made from a dict of axis sizes (mmdit_jax.sharding.make_mesh)."""
    if isinstance(mesh, Mesh):
        return mesh
    from mmdit_jax.sharding import make_mesh

    try:
        return make_mesh(dict(mesh))
    except (TypeError, ValueError) as e:
        raise MMDiTError(f"mesh {mesh!r}: {e}") from None


def _image_array(image, height, width) -> np.ndarray:
    """(B, H, W, 3) float32 in [0, 1] from PIL image(s) or arrays; PIL images are resized (Lanczos, as
    diffusers' preprocessing) to height x width when given."""
    from PIL import Image

    items = image if isinstance(image, (list, tuple)) else [image]
    if items and all(isinstance(im, Image.Image) for im in items):
        arrs = []
        for im in items:
            im = im.convert("RGB")
            if height and width and im.size != (width, height):
                im = im.resize((int(width), int(height)), resample=Image.LANCZOS)
            arrs.append(np.asarray(im, np.float32) / 255.0)
        if len({a.shape for a in arrs}) != 1:
            raise MMDiTError("img2img images must all have one size")
        return np.stack(arrs)
    arr = np.asarray(image, np.float32)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise MMDiTError(f"image must be PIL or (B, H, W, 3) / (H, W, 3) floats in [0, 1], got shape {arr.shape}")
    if (height and height != arr.shape[1]) or (width and width != arr.shape[2]):
        raise MMDiTError(f"image is {arr.shape[1]}x{arr.shape[2]} but height x width is {height}x{width}; "
                         "resize it first (or pass a PIL image)")
    return arr
