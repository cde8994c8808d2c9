"""Orbax checkpoints of the train state in WORKDIR/checkpoints: one Composite per saved step with items
"params" and "ema" (each a StandardSave of the params pytree exactly as Transformer.params holds it, so
the workdir's transformer/checkpoint.json pointer loads them), "opt_state" (its leaves, in tree order)
and "meta" (JSON: step, rng, data-iterator state, config).

Restores go straight into the target shardings. A SIGTERM sets a flag; the loop then saves and exits.
"""
from __future__ import annotations

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from mmdit_jax.errors import MMDiTError
from mmdit_jax.io.files import write_json
from mmdit_jax.training.state import TrainState


class Checkpointer:
    def __init__(self, directory: str, every: int, keep: int, async_save: bool):
        self.directory = os.path.abspath(directory)
        opts = ocp.CheckpointManagerOptions(save_interval_steps=every, max_to_keep=keep,
                                            enable_async_checkpointing=async_save, create=True)
        self.mngr = ocp.CheckpointManager(self.directory, options=opts)

    def latest_step(self) -> int | None:
        return self.mngr.latest_step()

    def save(self, state: TrainState, meta: dict, *, force: bool = False) -> bool:
        """Saves when `step` is on the interval (or force); async unless configured otherwise."""
        step = int(_host(state.step))
        items = dict(params=ocp.args.StandardSave(state.params),
                     opt_state=ocp.args.StandardSave(_leaves(state.opt_state)),
                     meta=ocp.args.JsonSave(dict(meta, step=step, rng=_host(state.rng).tolist())))
        if state.ema is not None:
            items["ema"] = ocp.args.StandardSave(state.ema)
        return self.mngr.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, target: TrainState, step: int | None = None) -> tuple[TrainState, dict]:
        """The saved state, placed as `target` (ShapeDtypeStructs with shardings) says, and its meta."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise MMDiTError(f"{self.directory}: no finished checkpoint to resume from")
        opt_leaves, opt_tree = jax.tree.flatten(target.opt_state)
        items = dict(params=ocp.args.StandardRestore(target.params),
                     opt_state=ocp.args.StandardRestore(_leaves(target.opt_state)),
                     meta=ocp.args.JsonRestore())
        if target.ema is not None:
            items["ema"] = ocp.args.StandardRestore(target.ema)
        try:
            out = self.mngr.restore(step, args=ocp.args.Composite(**items))
        except (FileNotFoundError, KeyError, ValueError) as e:
            raise MMDiTError(f"{self.directory}: step {step} cannot be restored into this run's "
                             f"configuration ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
        meta = out["meta"]
        opt = jax.tree.unflatten(opt_tree, [out["opt_state"][str(i)] for i in range(len(opt_leaves))])
        rng = jax.device_put(jnp.asarray(np.asarray(meta["rng"], np.uint32)), target.rng.sharding)
        step_arr = jax.device_put(jnp.asarray(meta["step"], jnp.int32), target.step.sharding)
        state = TrainState(step=step_arr, params=out["params"], opt_state=opt,
                           ema=out["ema"] if target.ema is not None else None, rng=rng)
        return state, meta

    def wait(self) -> None:
        self.mngr.wait_until_finished()

    def close(self) -> None:
        self.mngr.wait_until_finished()
        self.mngr.close()


def _host(x) -> np.ndarray:
    """A replicated array's value from this process's own copy (a multi-process array cannot be
    fetched whole, but every process holds all of a replicated one)."""
    return np.asarray(x.addressable_data(0))


def _leaves(tree) -> dict:
    # optax states hold NamedTuples and placeholder nodes; their leaves in order are all a restore needs
    return {str(i): x for i, x in enumerate(jax.tree.leaves(tree))}


class Preemption:
    """SIGTERM (and SIGINT) -> `requested` becomes True; the loop checkpoints and exits cleanly."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handler (e.g. a library caller's worker)
                pass
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


def write_meta_json(path: str, data: dict) -> None:
    write_json(path, data)
