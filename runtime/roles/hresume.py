"""Checkpoints and resume of the horizontal roles.

The weights at a round boundary are the server's (every worker has just received them), so only the server
checkpoints them, in a background thread after it has sent the round's weights. A worker's checkpoint holds
what only it has: its optimiser state (FedAvg with a stateful optimiser: the local slots carry over between
rounds), its local batch cursor, its metrics history and the epoch's batch losses so far. On resume the
server sends every worker the agreed step's weights under ``keys.resume_weights(step)`` (keyed by step, so a
copy left unread by an interrupted agreement is never taken for another step's). Both sides checkpoint at the
same steps, and a worker writes step s only after the server has sent step s's weights, i.e. after the
server finished writing step s - 1: nobody is more than one checkpoint ahead, which the store's two kept
checkpoints cover.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from fldsl.runtime.roles.common import CheckpointWriter, RoleContext, is_checkpoint_step, save_checkpoint
from fldsl.runtime.roles.optstate import get_opt_state, restore_training, set_opt_state
from fldsl.runtime.transport import keys


@dataclass
class RoundState:
    """Where a horizontal role continues from (all zero / empty on a fresh start)."""

    start: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # the metrics of each epoch so far
    local_cursor: int = 0  # FedAvg worker: local steps taken so far (drives the local batch order)
    epoch_losses: list[float] = field(default_factory=list)  # the epoch's batch losses before the checkpoint


class HorizontalCheckpoints:
    """The agreed resume step (None: a fresh start) and the checkpoints due every N rounds / epoch end."""

    def __init__(self, ctx: RoleContext, resume: int | None, rounds_per_epoch: int) -> None:
        self.ctx, self.resume, self.rounds_per_epoch = ctx, resume, rounds_per_epoch

    @property
    def resumed_from(self) -> int | None:
        return self.resume

    def due(self, done: int) -> bool:
        return is_checkpoint_step(self.ctx.plan, done, self.rounds_per_epoch)

    def _load(self) -> tuple[RoundState, dict[str, np.ndarray]]:
        assert self.resume is not None and self.ctx.store is not None  # a resume step comes from the store
        ckpt = self.ctx.store.load(self.resume)
        meta = ckpt.meta
        state = RoundState(start=ckpt.step, history=list(meta.get("history", [])),
                           local_cursor=int(meta.get("local_cursor", 0)),
                           epoch_losses=[float(x) for x in meta.get("epoch_losses", [])])
        return state, ckpt.arrays

    # -- server ----------------------------------------------------------------------------------------------

    def restore_server(self, model: Any, opt: Any | None, variables: list[Any],
                       send_all: Callable[[int, list[np.ndarray]], None]) -> RoundState:
        """Load the agreed checkpoint into the model (and the sync optimiser) and send every worker its
        weights (worker checkpoints hold none)."""
        if self.resume is None:
            return RoundState()
        state, arrays = self._load()
        restore_training(model, opt, variables, arrays)
        del arrays
        send_all(keys.resume_weights(self.resume), model.get_weights())
        return state

    def save_server(self, writer: CheckpointWriter, done: int, arrays: dict[str, np.ndarray],
                    history: list[dict[str, Any]]) -> None:
        """Write checkpoint ``done`` in the background (the caller does not write to ``arrays`` before the
        writer's next wait)."""
        writer.submit(partial(save_checkpoint, self.ctx, done, arrays, {"history": list(history)}))

    # -- worker ----------------------------------------------------------------------------------------------

    def restore_worker(self, model: Any, opt: Any | None, variables: list[Any], server: str,
                       recv_flow: str) -> RoundState:
        """Load this worker's checkpoint (optimiser state, cursor, history) and take the server's weights."""
        if self.resume is None:
            return RoundState()
        state, arrays = self._load()
        if opt is not None:
            set_opt_state(opt, variables, arrays)
        del arrays
        link = self.ctx.links[server]
        key = keys.resume_weights(self.resume)
        received = self.ctx.wait(lambda t: link.recv_arrays(recv_flow, key, t), server)
        model.set_weights(received)
        del received
        _drop_copies(link, recv_flow, key)
        return state

    def save_worker(self, done: int, opt: Any | None, variables: list[Any], local_cursor: int,
                    history: list[dict[str, Any]], losses: list[float]) -> None:
        state = get_opt_state(opt, variables) if opt is not None else {}
        # The epoch's batch losses so far too: resumed mid-epoch, train_loss still covers the whole epoch.
        save_checkpoint(self.ctx, done, state, {"local_cursor": local_cursor, "history": history,
                                                "epoch_losses": list(losses)})


def _drop_copies(link: Any, flow: str, key: int) -> None:
    """Remove further resume-weights messages under ``key`` (an agreement interrupted by a rollback can leave
    one unread; it holds the same step's weights and would keep a full copy of the model alive)."""
    from fldsl.runtime.transport import TransportError

    while True:
        try:
            link.recv_arrays(flow, key, 0)
        except (TimeoutError, TransportError):
            return
