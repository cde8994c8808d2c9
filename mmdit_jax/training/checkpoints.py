"""Orbax checkpoints of the train state in WORKDIR/checkpoints: one Composite per saved step with items
"params" and "ema" (each a StandardSave of the params pytree exactly as Transformer.params holds it, so
the workdir's transformer/checkpoint.json pointer loads them), "opt_state" (its leaves, in tree order)
and "meta" (JSON: step, rng, data-iterator state, config).

Restores go straight into the target shardings. After a SIGTERM every process saves the same step and exits
(see Preemption).
"""
from __future__ import annotations

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from mmdit_jax.errors import MMDiTError
from mmdit_jax.io import paths
from mmdit_jax.training.state import TrainState


class Checkpointer:
    def __init__(self, directory: str, every: int, keep: int, async_save: bool):
        self.directory = paths.absolute(directory)
        opts = ocp.CheckpointManagerOptions(save_interval_steps=every, max_to_keep=keep,
                                            enable_async_checkpointing=async_save, create=True)
        self.mngr = ocp.CheckpointManager(self.directory, options=opts)

    def latest_step(self) -> int | None:
        return self.mngr.latest_step()

    def due(self, step: int) -> bool:
        """Whether `step` is a save step by the options' interval (host-side only, the same answer on
        every process)."""
        return self.mngr.should_save(step)

    def save(self, state: TrainState, meta: dict, *, force: bool = False, step: int | None = None) -> bool:
        """Saves when `step` is on the interval (or force); async unless configured otherwise. `step`:
        the state's step when the caller knows it (saves reading it back from the device)."""
        step = int(_host(state.step)) if step is None else step
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
    """When a SIGTERM (or SIGINT) stops the run: `stop(step)`, asked after every step, is True at the
    step to save and exit at. A host-side check only: it never waits on the device.

    One process: a Python handler sets a flag. Several processes must stop after the same step: one
    that stopped alone would enter the collective save while the others step on into collectives it
    never joins (a deadlock). They agree through JAX's preemption sync on jax.distributed's
    coordination service: its own SIGTERM handler reports the notice to the service; every process's
    background thread then reports the last step it was asked about, and the step after the largest
    becomes every process's stop step. `stop` blocks only while that exchange runs, which needs no
    process's main thread, so no process ever waits on one that waits on it. SIGINT is forwarded to
    that handler as a SIGTERM. `step`: the run's first step, reported should the notice come before
    the loop starts."""

    def __init__(self, step: int = 0):
        self.requested = False
        self._old = {}
        self._sync = jax.process_count() > 1
        if self._sync:
            from jax.experimental import multihost_utils

            try:
                multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:
                raise MMDiTError("--distributed: multi-process runs stop together on SIGTERM through JAX's "
                                 "preemption service; do not turn off jax_enable_preemption_service") from None

    def __enter__(self):
        # several processes: SIGTERM stays with JAX's handler (installed by jax.distributed.initialize)
        handlers = {signal.SIGINT: self._forward} if self._sync else {signal.SIGTERM: self._handle,
                                                                       signal.SIGINT: self._handle}
        for sig, fn in handlers.items():
            try:
                self._old[sig] = signal.signal(sig, fn)
            except ValueError:  # not the main thread: no handler (e.g. a library caller's worker)
                pass
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def _forward(self, signum, frame):
        os.kill(os.getpid(), signal.SIGTERM)

    def stop(self, step: int) -> bool:
        if self._sync:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False
