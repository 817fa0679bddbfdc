"""Orbax checkpoints: periodic async saves, keep-last-N, and restore-or-init of the train state."""
from __future__ import annotations

import logging
import os
from typing import Any

import orbax.checkpoint as ocp

from imgcls_jax.errors import UserError


class Checkpointer:
  """Wraps an Orbax ``CheckpointManager`` in ``<workdir>/checkpoints``; use as a context manager."""

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(keep),
        enable_async_checkpointing=async_save,
        create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def __enter__(self) -> 'Checkpointer':
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, meta: dict[str, Any] | None = None) -> None:
    """Starts an (async) save of ``state`` at ``step``; no-op when that step is already saved."""
    if step in self._manager.all_steps():
      return
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta or {})), force=True)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """(state placed as ``abstract_state``'s shardings say, meta) at ``step`` (default latest)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise UserError(f'No checkpoint in {self.directory}; train first or point --workdir at a '
                      'run directory.')
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as e:
      raise UserError(f'Checkpoint {step} in {self.directory} does not match this model/config '
                      f'({str(e).splitlines()[0][:300]}); use the config that wrote it or a new '
                      '--workdir.') from None
    logging.info('Restored checkpoint %d from %s', step, self.directory)
    return restored['state'], dict(restored['meta'] or {})
