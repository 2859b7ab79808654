"""When checkpoints are due, how one lands (with the landed notices of the resume agreement), and the
background writer that keeps the writes off the training loop's critical path (the checkpoint gate)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from fldsl.artifacts import Plan
from fldsl.runtime.checkpoint import Checkpoint

if TYPE_CHECKING:
    from fldsl.runtime.roles.context import RoleContext


def is_checkpoint_step(plan: Plan, step_done: int, steps_per_epoch: int) -> bool:
    """Whether a checkpoint is due after ``step_done`` steps (counted from 1): every N steps, epoch ends."""
    every = plan.train.checkpoint_every_steps
    return (every is not None and every > 0 and step_done % every == 0) or step_done % steps_per_epoch == 0


def announce_training(ctx: RoleContext, total: int, steps_per_epoch: int, resumed_from: int | None) -> None:
    """The launcher's progress bar sizes itself from this event; resumed_from marks a restart."""
    ctx.progress.emit("plan", total_steps=total, steps_per_epoch=steps_per_epoch,
                      epochs=ctx.plan.train.epochs, resumed_from=resumed_from)
    ctx.progress.emit("phase", name="train")


def save_checkpoint(ctx: RoleContext, step: int, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Land checkpoint ``step`` (with the peers' landed notices read so far), then tell the resume peers."""
    if ctx.store is None:
        return
    ctx.poll_landed(step)
    path = ctx.store.save(Checkpoint(step=step, arrays=arrays, meta=meta))
    ctx.landed_steps = [*ctx.landed_steps, step][-_LANDED_WINDOW:]
    ctx.progress.emit("checkpoint", step=step, path=str(path))
    ctx.announce_landed(step)


# Own checkpoint steps whose notices from the peers are still looked for: a peer's notice of step c arrives
# before this node lands the checkpoint after c (the checkpoint gate), so a few are plenty.


_LANDED_WINDOW = 4


class CheckpointWriter:
    """Runs checkpoint writes in one background thread, one at a time, off the training loop's critical
    path (encoding, sealing and fsync of a large model take a good fraction of a second); a failure surfaces
    at the next ``wait``. Callers hand it arrays no one writes to while it runs (copies, or arrays they
    wait for before touching) and wait before leaving the role (a re-run role lists the store's checkpoints:
    a write must not land after that). See :func:`with_checkpoint_writer`.

    The checkpoint gate: a store keeps two checkpoints, so resuming needs every node to have landed
    checkpoint c before any node lands the next one, c'. A node reaches c' only with its peers' messages for
    step c' - 1, so each node waits for its pending write before it sends a message of the step just before
    a checkpoint step. The write still overlaps every step in between (all of them when checkpoints are an
    epoch apart); with a checkpoint every step it is back on the critical path."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, fn: Callable[[], None]) -> None:
        self.wait()

        def body() -> None:
            try:
                fn()
            except BaseException as e:  # handed to the role's thread at the next wait()
                self._error = e

        self._thread = threading.Thread(target=body, name=self._name)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err


def with_checkpoint_writer(ctx: RoleContext, body: Callable[[CheckpointWriter], dict[str, Any]]
                           ) -> dict[str, Any]:
    """Run a role's ``body`` with a background checkpoint writer; return only once its last write has
    landed (or failed: then raise that), also when ``body`` raises."""
    writer = CheckpointWriter(f"{ctx.node}-checkpoint")
    try:
        result = body(writer)
    except BaseException:
        try:
            writer.wait()
        except Exception:  # the exception already in flight is the one to report
            pass
        raise
    writer.wait()
    ctx.collect_landed()
    return result
