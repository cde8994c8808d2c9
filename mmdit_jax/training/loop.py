"""The training loop: build or resume the state, step, log, validate, sample, checkpoint, handle SIGTERM."""
from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from mmdit_jax.errors import MMDiTError
from mmdit_jax.families import family_of_diffusers_config, preset
from mmdit_jax.io import paths
from mmdit_jax.io.files import write_json
from mmdit_jax.progress import duration
from mmdit_jax.sharding import MESH_AXES, make_mesh, under_mesh
from mmdit_jax.training import config as C
from mmdit_jax.training.checkpoints import Checkpointer, Preemption
from mmdit_jax.training.data import make_data
from mmdit_jax.training.distributed import barrier, data_group, own, per_process
from mmdit_jax.training.hooks import prepare_base, run_evaluation
from mmdit_jax.training.metrics import MetricsWriter
from mmdit_jax.training.modes import TrainMode
from mmdit_jax.training.optim import learning_rate, make_optimizer
from mmdit_jax.training.state import create_state
from mmdit_jax.training.step import batch_sharding, jit_train_step, make_eval_loss
from mmdit_jax.training.workdir import prepare_workdir
from mmdit_jax.transformer import Transformer, load_transformer

PREEMPTED_EXIT = 143  # 128 + SIGTERM: the run stopped early but checkpointed; rerun to resume
VAL_SEED_OFFSET = 1_000_003  # the validation noise has its own seed


def network_config(mc):
    if mc.preset is not None:
        return preset(mc.preset)
    dc = dict(mc.diffusers_config)
    return family_of_diffusers_config(dc, "model.diffusers_config").config_from_diffusers(
        dc, "model.diffusers_config")


def train(cfg: C.TrainConfig, workdir: str, *, out=sys.stdout) -> int:
    """Trains to cfg.max_steps (resuming from WORKDIR/checkpoints when there are any). Returns the exit
    status: 0 when done, PREEMPTED_EXIT after a SIGTERM (state saved)."""
    C.validate(cfg)
    workdir = paths.absolute(workdir)
    paths.check_bucket(workdir, "--workdir")
    lead = jax.process_index() == 0
    try:
        mesh = make_mesh({a: getattr(cfg.mesh, a) for a in MESH_AXES})
    except ValueError as e:
        raise MMDiTError(f"--mesh_*: {e}") from None
    batch_sh = batch_sharding(mesh)
    shards = int(np.prod([mesh.shape[a] for a in ("data", "fsdp")]))
    group, groups = data_group(batch_sh, shards)  # processes holding the same rows read the same stream
    global_batch = cfg.batch_size * groups
    if global_batch % shards:
        raise MMDiTError(f"--set=batch_size: global batch {global_batch} does not split over the "
                         f"{shards} data-parallel devices (mesh data x fsdp)")
    ckpt = Checkpointer(paths.join(workdir, "checkpoints"), cfg.checkpoint.every, cfg.checkpoint.keep,
                        cfg.checkpoint.async_save)
    resume_step = ckpt.latest_step()
    preempt = Preemption(resume_step or 0)  # a SIGTERM from here on stops every process at one step
    cfg = prepare_base(cfg, workdir, out, write=lead)  # with base.maker: train from WORKDIR/base
    barrier("mmdit_base")  # the others read the base the lead process writes

    pretrained = teacher = None
    if cfg.model.pretrained is not None:
        # read straight into the shards (a large model never sits whole on one host); a LoRA base is
        # never trained: it is read in its frozen dtype
        dtype = cfg.lora.base_dtype if cfg.lora.enabled else "float32"
        quantize = cfg.lora.base_quantize if cfg.lora.enabled else None  # read quantised: never whole in float
        pretrained = load_transformer(cfg.model.pretrained, dtype, mesh=mesh, quantize=quantize)
        net_cfg = pretrained.config
    else:
        net_cfg = network_config(cfg.model)
    if cfg.distill.enabled:
        teacher = (pretrained if cfg.distill.teacher in (None, cfg.model.pretrained)
                   else load_teacher(cfg, mesh))
        if pretrained is None:
            raise MMDiTError("--set=model.pretrained: guidance distillation starts the student from a "
                             "pretrained network (the teacher's path)")
    mode = TrainMode(cfg, net_cfg, teacher.config if teacher is not None else None)
    net_cfg = mode.net_config  # the student's (with a guidance embedder) when distilling
    model = Transformer(net_cfg, None, "float32")
    base = Transformer(mode.base_config, None, "float32")
    tx = make_optimizer(cfg.optim, cfg.max_steps, mode.trainable_mask(model))
    use_ema = cfg.ema.decay > 0
    encoders = cfg.encoders or cfg.model.pretrained

    if resume_step is not None:
        # restore straight into the target shardings; no init weights are ever computed on resume
        target, state_sh = create_state(model, tx, mesh, cfg.seed, use_ema, abstract_only=True, mode=mode)
        state, meta = ckpt.restore(target, resume_step)
        print(f"resumed from step {resume_step} ({ckpt.directory})", file=out, flush=True)
    else:
        start = mode.initial_trained(pretrained.params, cfg.seed) if pretrained is not None else None
        state, state_sh = create_state(model, tx, mesh, cfg.seed, use_ema, start, mode=mode)
        meta = None
    frozen, frozen_sh = mode.frozen(pretrained.params if pretrained is not None else None,
                                    teacher.params if teacher is not None else None, base, mesh)
    del pretrained, teacher

    data = make_data(cfg, seed=cfg.seed, encoders_path=encoders, process_index=group, process_count=groups)
    # where the stream starts: the validation batches are read from there
    data_start = data.get_state() if meta is None else _own_data(meta, "data_start")
    if meta is not None:
        data.set_state(_own_data(meta, "data"))
    data_start_all = per_process(data_start)  # the meta stores every process's own data stream
    if lead:
        prepare_workdir(workdir, net_cfg, encoders, use_ema,
                        base_transformer=mode.base_transformer)
        write_json(paths.join(workdir, "train_config.json"), C.to_dict(cfg))
    null_text = getattr(data, "null_text", None)
    null_text = None if null_text is None else tuple(jnp.asarray(x) for x in null_text)
    step_fn = jit_train_step(model, tx, cfg, mesh, state_sh, tuple(getattr(data, "text_layout", ()) or ()),
                             null_text, mode, frozen_sh)
    frozen_arg = () if frozen is None else (frozen,)  # full mode trains everything
    lr_at = learning_rate(cfg.optim, cfg.max_steps)

    def put(batch):
        return {k: jax.make_array_from_process_local_data(batch_sh, np.asarray(batch[k]))
                for k in ("latents", "context", "pooled")}

    validate_fn = _validation(cfg, model, data, data_start, put, batch_sh, mode, frozen, null_text)
    grid_fn = _sampler(cfg, model, encoders, data, mode, frozen, mesh) if cfg.log.sample_every else None
    if resume_step is not None and resume_step >= cfg.max_steps:
        print(f"already trained to step {resume_step}: evaluating only", file=out, flush=True)
    writer = MetricsWriter(workdir, resume_step, enabled=lead)
    step = int(jax.device_get(state.step))
    status = 0
    # The host touches the device only on steps that log, validate, sample or save: other steps
    # only enqueue work. Every process takes the same branches at the same step (the intervals, and
    # the preemption stop agreed across processes), so none enters a collective (a metrics fetch,
    # the save and its meta gather) alone.
    with preempt:
        t_last, s_last = time.perf_counter(), step
        # updates skipped for a non-finite gradient: each step's flag is kept (no sync per step) and read
        # when logging
        skipped, skipped_total = [], 0
        while step < cfg.max_steps:
            batch = put(next(data))
            state, metrics = step_fn(state, batch, *frozen_arg)
            skipped.append(metrics["skipped"])
            step += 1
            if step % cfg.log.every == 0 or step == cfg.max_steps:
                m = jax.device_get(metrics)
                n_skipped = int(sum(jax.device_get(skipped)))
                skipped, skipped_total = [], skipped_total + n_skipped
                now = time.perf_counter()
                rate = (step - s_last) / max(now - t_last, 1e-9)
                t_last, s_last = now, step
                # skipped: since the previous record, so the log sums to the run's total across resumes
                scalars = dict(loss=m["loss"], grad_norm=m["grad_norm"], lr=float(lr_at(step - 1)),
                               steps_per_sec=rate, images_per_sec=rate * global_batch, skipped=n_skipped)
                writer.write(step, scalars)
                if lead:
                    print(f"step {step}/{cfg.max_steps}  loss {m['loss']:.5f}  grad_norm {m['grad_norm']:.4f}  "
                          f"lr {scalars['lr']:.2e}  {rate:.2f} step/s  {rate * global_batch:.1f} img/s  "
                          f"skipped {skipped_total}  ETA {duration((cfg.max_steps - step) / max(rate, 1e-9))}",
                          file=out, flush=True)
            if validate_fn is not None and step % cfg.log.val_every == 0:
                writer.write(step, validate_fn(state))
            if grid_fn is not None and step % cfg.log.sample_every == 0:
                grid = grid_fn(state)
                writer.image(step, "samples", grid)
                if lead:
                    _save_png(grid, paths.join(workdir, "samples", f"step_{step:08d}.png"))
            stopping = preempt.stop(step) and step < cfg.max_steps  # asked every step (see Preemption)
            if stopping or ckpt.due(step) or step == cfg.max_steps:
                meta_now = dict(data=per_process(data.get_state()), data_start=data_start_all,
                                process_count=jax.process_count(), config=C.to_dict(cfg))
                if ckpt.save(state, meta_now, force=True, step=step) and lead:
                    mode.export(state, workdir, model)  # LoRA: WORKDIR/lora/pytorch_lora_weights.safetensors
            if stopping:
                print(f"preempted: saved step {step}; rerun the same command to resume", file=out, flush=True)
                status = PREEMPTED_EXIT
                break
    ckpt.close()
    writer.close()
    stats = getattr(data, "stats", None)
    if lead and stats is not None:
        print(f"data: {stats()}", file=out, flush=True)
    if status == 0 and lead:
        # the workdir is a pipeline folder now: evaluate it the way a user samples it
        run_evaluation(cfg, workdir, out)
    return status


def load_teacher(cfg, mesh):
    """The distillation teacher given by its own path, read straight into its shardings on `mesh` (never
    whole on one device) in its frozen dtype."""
    return load_transformer(cfg.distill.teacher, cfg.distill.teacher_dtype, mesh=mesh)


def _own_data(meta, key):
    """This process's data state from a checkpoint meta (keyed by process since multi-process runs)."""
    return own(meta[key], key) if "process_count" in meta else meta[key]


def _validation(cfg, model, data, start_state, put, batch_sh, mode=None, frozen=None, null_text=None):
    """state -> {"val_loss": ..., "val_loss_ema": ...} on fixed batches, sigmas and noise.

    The batches are the first `val_batches` of the run's own stream (read through the iterator's state,
    then rewound), so no second data pipeline (and no second copy of the encoders) is needed; the
    fixed (t, noise) pairs make the number comparable from one evaluation to the next."""
    if not cfg.log.val_every:
        return None
    here = data.get_state()
    data.set_state(start_state)
    fixed = []
    key = jax.random.PRNGKey(cfg.seed + VAL_SEED_OFFSET)
    for i in range(cfg.log.val_batches):
        b = put(next(data))
        n = b["latents"].shape[0]
        # sigmas spread evenly over (0, 1): every noise level weighs in, the same ones every time
        sigma = jax.device_put(jnp.asarray((np.arange(n) + 0.5) / n, jnp.float32), batch_sh)
        eps = jax.device_put(jax.random.normal(jax.random.fold_in(key, i), b["latents"].shape, jnp.float32),
                             batch_sh)
        fixed.append((b, sigma, eps))
    data.set_state(here)
    # jitted inside, under the training mesh, with the frozen tree as an argument
    eval_loss = make_eval_loss(model, cfg, mode, frozen, batch_sh.mesh)

    def run(state):
        out = {"val_loss": float(np.mean([eval_loss(state.params, *f, null_text) for f in fixed]))}
        if state.ema is not None:
            out["val_loss_ema"] = float(np.mean([eval_loss(state.ema, *f, null_text) for f in fixed]))
        return out

    return run


def _sampler(cfg, model, encoders, data, mode=None, frozen=None, mesh=None):
    from mmdit_jax.data.encode import load_encoders
    from mmdit_jax.training.samples import sample_latents, to_grid
    from mmdit_jax.training.modes import cast_floats
    from mmdit_jax.training.timesteps import shift_factor

    # the data's own encoders when it has them (no second copy in memory), else the folder's, loaded as
    # the data would load them: in the compute dtype, text encoders sharded over the local devices
    enc = getattr(data, "encoders", None) or load_encoders(encoders, cfg.model.compute_dtype,
                                                           cfg.data.max_sequence_length)
    vae = enc.vae
    lg = cfg.log
    ctx, pooled = enc.encode_text(list(lg.sample_prompts))  # host arrays: constants of the jitted loop
    null_ctx, null_pooled = enc.encode_text([""])
    side = lg.sample_resolution // vae.config.downsample_factor
    side -= side % 2
    ch = vae.config.latent_channels
    noise = jax.random.normal(jax.random.PRNGKey(cfg.seed), (len(lg.sample_prompts), side, side, ch))
    has_g = bool(getattr(model.config, "guidance_embed", False))
    shift = shift_factor(cfg.timesteps, (side, side))
    compute = jnp.dtype(cfg.model.compute_dtype)

    net = mode.base_net(model) if mode is not None else model  # a quantised LoRA base's structure

    def apply_fn(p, x, s, c, pl, g):
        return net.apply(cast_floats(p, compute), x.astype(compute), s, c.astype(compute), pl.astype(compute), g)

    params_of = mode.sampling_params if mode is not None else (lambda t, f: t)  # LoRA: merged into the base

    def sample(t, f):
        return sample_latents(apply_fn, params_of(t, f), noise, ctx, pooled, null_ctx, null_pooled,
                              steps=lg.sample_steps, guidance=lg.sample_guidance, shift=shift, has_guidance=has_g)

    run = jax.jit(under_mesh(sample, mesh))  # under the mesh the state lives on

    def grid(state):
        z = run(state.ema if state.ema is not None else state.params, frozen)
        return to_grid(vae.decode(np.asarray(z)))

    return grid


def _save_png(grid, path):
    from PIL import Image

    from mmdit_jax.sampling.images import save_png

    save_png(Image.fromarray(grid), path)
