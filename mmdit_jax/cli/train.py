"""`mmdit-train --workdir=DIR [--config=PRESET_OR_FILE] [--set=section.field=value ...]`.

--config: a preset (see mmdit_jax.training.config.presets(); `toy` / `toy-flux` train the toy world from
scratch and score it) or a Python file defining get_config().
--set: any config field by its dotted name, repeatable, e.g. --set=optim.lr=3e-5
--set=timesteps.sampler=mode --set=log.sample_prompts="a cat|a dog". Dedicated flags below override
the matching fields. Rerunning the same command resumes from the newest checkpoint in --workdir.
--plan: print the per-device memory of the step for the config and mesh (no weight allocated; on CPU,
XLA_FLAGS=--xla_force_host_platform_device_count=N gives N virtual devices) and exit.
"""
import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Output folder (checkpoints, logs, samples); loadable as a pipeline.")
flags.DEFINE_string("config", None, "Preset name or Python file defining get_config().")
flags.DEFINE_multi_string("set", [], "section.field=value overrides of the config.")
flags.DEFINE_integer("max_steps", None, "Optimizer steps to train for (total, across resumes).")
flags.DEFINE_integer("batch_size", None, "Per-process batch size.")
flags.DEFINE_string("remat", None, "Remat policy: none, full, dots, qkv_attn, attn.")
flags.DEFINE_integer("mesh_data", None, "Mesh axis size for pure data parallelism (-1 fills).")
flags.DEFINE_integer("mesh_fsdp", None, "Mesh axis size for FSDP (-1 fills).")
flags.DEFINE_integer("mesh_tensor", None, "Mesh axis size for tensor parallelism (-1 fills).")
flags.DEFINE_integer("mesh_sequence", None, "Mesh axis size for sequence parallelism (-1 fills).")
flags.DEFINE_bool("distributed", False, "Join a multi-process job (jax.distributed.initialize): settings from "
                  "the flags below, else JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, else "
                  "the cluster's auto-detection (TPU pods, SLURM).")
flags.DEFINE_bool("plan", False, "Print the per-device bytes of parameters, optimizer state, EMA, batch and the "
                  "compiled step's temporaries for the config and mesh, allocating no weights, and exit.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0's coordinator (with --distributed).")
flags.DEFINE_integer("num_processes", None, "Processes in the job (with --distributed).")
flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes) (with --distributed).")


def _fail(msg: str):
    print(f"mmdit-train: {msg}", file=sys.stderr)
    sys.exit(1)


def _parse(argv):
    try:
        return FLAGS(argv)
    except flags.Error as e:
        _fail(str(e).splitlines()[0])


def build_config():
    from mmdit_jax.training.config import apply_overrides, load_config, validate

    cfg = load_config(FLAGS.config)
    sets = list(FLAGS.set)
    for name, key in (("max_steps", "max_steps"), ("batch_size", "batch_size"), ("remat", "model.remat"),
                      ("mesh_data", "mesh.data"), ("mesh_fsdp", "mesh.fsdp"), ("mesh_tensor", "mesh.tensor"),
                      ("mesh_sequence", "mesh.sequence")):
        if getattr(FLAGS, name) is not None:
            sets.append(f"{key}={getattr(FLAGS, name)}")
    return validate(apply_overrides(cfg, sets))


def main(argv):
    from absl import logging

    from mmdit_jax.errors import MMDiTError

    logging.set_verbosity(logging.WARNING)  # Orbax logs every save and restore at INFO; our lines say enough

    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}; all settings are --flags")
    if not FLAGS.workdir and not FLAGS.plan:
        _fail("--workdir is required (the folder to train into; rerun with the same one to resume)")
    try:
        cfg = build_config()  # everything is checked before any work starts
        if FLAGS.distributed:
            from mmdit_jax.training.distributed import initialize

            initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
        elif FLAGS.coordinator_address or FLAGS.num_processes or FLAGS.process_id is not None:
            _fail("--coordinator_address/--num_processes/--process_id need --distributed")
        if FLAGS.plan:
            from mmdit_jax.training.plan import run_plan

            run_plan(cfg, FLAGS.workdir)
            sys.exit(0)
        from mmdit_jax.training.loop import train

        status = train(cfg, FLAGS.workdir)
    except MMDiTError as e:
        _fail(str(e))
    sys.exit(status)


def run():
    app.run(main, flags_parser=_parse)


if __name__ == "__main__":
    run()
