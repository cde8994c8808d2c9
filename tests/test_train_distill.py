"""Guidance distillation: a tiny torch SD3 teacher converted by mmdit-convert is distilled by mmdit-train
into a student with a guidance embedder; the student's loss falls well below its start, and the student
sampled with the guidance value and no CFG batch approaches the teacher sampled with CFG. The student
starts equal to its teacher (SD3 and FLUX) and round-trips through its workdir and config.json."""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mmdit_jax as mj
import train_fake
from conftest import randomize_torch_
from mmdit_jax.conversion.to_orbax import convert
from mmdit_jax.training.config import (CheckpointConfig, DistillConfig, EMAConfig, LogConfig, LossConfig,
                                       ModelConfig, OptimConfig, TimestepConfig, apply_overrides, validate)
from mmdit_jax.errors import MMDiTError
from mmdit_jax.training.loop import train
from mmdit_jax.training.metrics import read_jsonl
from mmdit_jax.sharding import make_mesh
from mmdit_jax.training.modes import GUIDANCE_EMBEDDER, TrainMode, with_guidance_embedder
from mmdit_jax.training.step import make_eval_loss
from mmdit_jax.training.samples import sample_latents

TEACHER = dict(sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8,
               num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=10,
               out_channels=16, pos_embed_max_size=8, qk_norm="rms_norm")
G_MIN, G_MAX, STEPS = 1.0, 5.0, 300


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from diffusers import SD3Transformer2DModel

    root = tmp_path_factory.mktemp("distill")
    randomize_torch_(SD3Transformer2DModel(**TEACHER).eval(), std=0.15, seed=11,
                     buffers=("pos_embed.pos_embed",)).save_pretrained(root / "torch")
    teacher = str(root / "teacher")
    convert(str(root / "torch"), teacher)  # what mmdit-convert --src --out runs
    work = str(root / "work")
    assert train(run_config(teacher), work) == 0
    return teacher, work


def run_config(teacher):
    return train_fake.tiny_config(
        model=ModelConfig(pretrained=teacher, compute_dtype="float32"),
        distill=DistillConfig(enabled=True, guidance_min=G_MIN, guidance_max=G_MAX),
        optim=OptimConfig(lr=5e-4, warmup_steps=10, schedule="cosine", clip_norm=1.0, weight_decay=0.0),
        ema=EMAConfig(decay=0.0), loss=LossConfig(encoder_dropout=0.0),
        timesteps=TimestepConfig(sampler="uniform"),
        checkpoint=CheckpointConfig(every=STEPS, keep=1, async_save=False),
        # one fixed batch (random sigma, noise and guidance each step), as the overfitting test does
        data_factory="fake_fixed", log=LogConfig(every=1, val_every=STEPS // 2), batch_size=4, max_steps=STEPS)


@pytest.mark.slow
def test_distillation_loss_falls(run):
    """The distillation loss at fixed (sigma, noise, guidance) on the training batch, before and after."""
    teacher_path, work = run
    losses = [r["loss"] for r in read_jsonl(os.path.join(work, "metrics.jsonl")) if "loss" in r]
    assert len(losses) == STEPS and np.isfinite(losses).all()
    teacher, student = mj.load_transformer(teacher_path), mj.load_transformer(work)
    cfg = run_config(teacher_path)
    mode = TrainMode(cfg, teacher.config)
    frozen, _ = mode.frozen(None, teacher.params, student, make_mesh({"fsdp": -1}))
    data = train_fake.FakeTrainData(4, cfg.seed, fixed=True)
    batch = next(data)
    null = tuple(jnp.asarray(x) for x in data.null_text)
    sigma = jnp.asarray((np.arange(4) + 0.5) / 4, jnp.float32)
    eval_loss = make_eval_loss(student, cfg, mode, frozen)
    start, end = [], []
    for i in range(4):
        eps = jax.random.normal(jax.random.key(i), batch["latents"].shape)
        start.append(float(eval_loss(with_guidance_embedder(student.config, teacher.params, cfg.seed), batch,
                                     sigma, eps, null)))
        end.append(float(eval_loss(student.params, batch, sigma, eps, null)))
    print(f"distillation loss at fixed (sigma, noise, guidance): {np.mean(start):.4f} at the start -> "
          f"{np.mean(end):.4f} after {STEPS} steps")
    assert np.mean(end) < np.mean(start) / 3


@pytest.mark.slow
def test_student_without_cfg_approaches_teacher_with_cfg(run):
    teacher_path, work = run
    teacher, student = mj.load_transformer(teacher_path), mj.load_transformer(work)
    assert student.config == dataclasses.replace(teacher.config, guidance_embed=True)
    data = train_fake.FakeTrainData(4, seed=1, fixed=True)  # the batch it was distilled on
    batch = next(data)
    null_ctx, null_pooled = (jnp.asarray(x) for x in data.null_text)
    noise = jax.random.normal(jax.random.key(3), batch["latents"].shape)
    start = with_guidance_embedder(student.config, teacher.params, 0)  # the student before training
    kw = dict(steps=4, shift=1.0)
    # one compile each; the guidance scale is an argument
    teacher_cfg = jax.jit(lambda g: sample_latents(teacher.apply, teacher.params, noise, batch["context"],
                                                   batch["pooled"], null_ctx, null_pooled, guidance=g,
                                                   has_guidance=False, **kw))
    student_g = jax.jit(lambda p, g: sample_latents(student.apply, p, noise, batch["context"], batch["pooled"],
                                                    null_ctx, null_pooled, guidance=g, has_guidance=True, **kw))
    errs = {}
    for g in (2.0, 4.5):
        ref = teacher_cfg(g)
        for name, params in (("start", start), ("distilled", student.params)):
            got = student_g(params, g)
            errs[name, g] = float(jnp.sqrt(jnp.mean((got - ref) ** 2)) / jnp.sqrt(jnp.mean(ref ** 2)))
    print("relative RMS error of the student (guidance, no CFG) vs the teacher's CFG samples: " +
          ", ".join(f"{n} g={g}: {e:.4f}" for (n, g), e in errs.items()))
    for g in (2.0, 4.5):
        assert errs["distilled", g] < 0.75 * errs["start", g]


def test_student_starts_as_its_teacher():
    """Zero output layer of the fresh embedder: same velocity at any guidance, SD3 and FLUX (schnell-style),
    from a teacher with every weight non-zero (a fresh init's zero output layer would make both 0)."""
    from flux_oracle import TINY

    flux_cfg = mj.FluxConfig.from_diffusers({**TINY, "guidance_embeds": False})
    sd3_cfg = mj.MMDiTConfig.from_diffusers(TEACHER)
    r = np.random.default_rng(0)
    for cfg, shape, ctx, pooled in ((sd3_cfg, (1, 4, 6, 16), 12, 10), (flux_cfg, (1, 4, 6, 16), 24, 20)):
        params = jax.tree.map(lambda x: (x + 0.1 * r.standard_normal(x.shape)).astype(x.dtype),
                              mj.Transformer.init(cfg, seed=1).params)
        teacher = mj.Transformer(cfg, params)
        student_cfg = dataclasses.replace(cfg, guidance_embed=True)
        start = with_guidance_embedder(student_cfg, teacher.params, 2)
        student = jax.jit(mj.Transformer(student_cfg, None).apply)  # one compile for both student params
        args = (r.standard_normal(shape).astype(np.float32), np.array([0.6], np.float32),
                r.standard_normal((1, 5, ctx)).astype(np.float32), r.standard_normal((1, pooled)).astype(np.float32))
        want = np.asarray(teacher(*args))
        assert np.abs(want).max() > 0.1, np.abs(want).max()
        for g in (1.0, 6.0):
            np.testing.assert_array_equal(np.asarray(student(start, *args, np.array([g], np.float32))), want)
        # the guidance does reach the output: with the embedder's output layer non-zero it moves it
        name = GUIDANCE_EMBEDDER[cfg.family]
        moved = jax.tree.map(lambda x: x + 0.1, start[name])
        got = np.asarray(student({**start, name: moved}, *args, np.array([6.0], np.float32)))
        assert np.abs(got - want).max() > 1e-2 * np.abs(want).max()


def test_bad_distill_settings_fail_with_their_key():
    cfg = train_fake.tiny_config(model=ModelConfig(pretrained="/somewhere"), distill=DistillConfig(enabled=True))
    for item, key in (("distill.guidance_max=0.5", "distill.guidance_max"),
                      ("distill.teacher=/no/such/teacher", "distill.teacher"),
                      ("distill.teacher_dtype=int8", "distill.teacher_dtype")):
        with pytest.raises(MMDiTError, match=f"--set={key}"):
            validate(apply_overrides(cfg, [item]))


def test_distillation_loss_is_the_teachers_cfg_velocity_regressed():
    """distill_loss against the teacher applied directly, once to the caption and once to a clearly non-zero
    empty caption: mean (student(x_t, g) - (v_u + g (v_c - v_u)))^2 at per-sample g."""
    from mmdit_jax.training import objective

    cfg_t = mj.MMDiTConfig.from_diffusers(TEACHER)
    r = np.random.default_rng(3)
    params = jax.tree.map(lambda x: (x + 0.1 * r.standard_normal(x.shape)).astype(x.dtype),
                          mj.Transformer.init(cfg_t, seed=1).params)
    student_cfg = dataclasses.replace(cfg_t, guidance_embed=True)
    student = with_guidance_embedder(student_cfg, params, 2)
    student["g_embedder"] = jax.tree.map(lambda x: x + 0.1, student["g_embedder"])  # not the teacher
    cfg = train_fake.tiny_config(distill=DistillConfig(enabled=True))
    mode = TrainMode(cfg, cfg_t)
    net = mj.Transformer(student_cfg, None)
    b = 3
    x0, eps = (r.standard_normal((b, 4, 6, 16)).astype(np.float32) for _ in range(2))
    sigma = np.array([0.2, 0.5, 0.9], np.float32)
    ctx, pooled = r.standard_normal((b, 5, 12)).astype(np.float32), r.standard_normal((b, 10)).astype(np.float32)
    null_ctx = (r.standard_normal((5, 12)) + 1.0).astype(np.float32)
    null_pooled = (r.standard_normal(10) - 1.0).astype(np.float32)
    g = np.array([1.0, 2.5, 4.5], np.float32)

    def loss(nc, npl):
        return float(jax.jit(lambda p, f: objective.distill_loss(
            net.apply, p, mode, f, x0, eps, sigma, ctx, pooled, nc, npl, g, "none", compute=jnp.float32))(
                student, params))

    teacher = jax.jit(mj.Transformer(cfg_t, None).apply)
    x_t = (1 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * eps
    cond = np.asarray(teacher(params, x_t, sigma, ctx, pooled), np.float64)
    pred = np.asarray(jax.jit(net.apply)(student, x_t, sigma, ctx, pooled, g), np.float64)

    def direct(nc, npl):
        uncond = np.asarray(teacher(params, x_t, sigma, np.broadcast_to(nc, ctx.shape),
                                    np.broadcast_to(npl, pooled.shape)), np.float64)
        target = uncond + g[:, None, None, None] * (cond - uncond)
        return float(np.mean((pred - target) ** 2))

    want = direct(null_ctx, null_pooled)
    zeros = direct(np.zeros_like(null_ctx), np.zeros_like(null_pooled))
    print(f"distillation loss {loss(null_ctx, null_pooled):.6g}, direct {want:.6g}, with a zero empty "
          f"caption {zeros:.6g}")
    assert abs(want - zeros) > 0.05 * want  # the empty caption matters to the target
    assert abs(loss(null_ctx, null_pooled) - want) < 1e-5 * want
    # data without an empty-caption encoding: the unconditional text is zeros
    assert abs(loss(None, None) - zeros) < 1e-5 * zeros
