"""Why a checkpoint's train state does not fit the one this config builds, said in config keys.

Some keys that ``configlib`` lets a resumed run change (they change its trajectory, not its model)
also change the state's tree: gradient clipping switched on, another optimizer, a weight EMA
switched off, a frozen layer. The restore then finds tree paths such as
``opt_state/1/0/trace/convs/0/kernel`` only in the checkpoint; this module names the keys behind
them instead (``configlib.config_differences``' words, as for a changed ``model.*`` key).
"""
from __future__ import annotations

from typing import Any, Mapping

import ml_collections

from imgcls_jax import configlib

# The config keys that can shape each part of the train state (state.TrainState) that a resumed run
# may change, and the part's name; keys ending in '.' are prefixes. The other parts (parameters,
# batch statistics) follow the model, whose keys (configlib.MUST_MATCH) are refused before this.
# Not the values alone (a learning rate, betas, the schedule): blamed, they would mislead.
_SHAPED_BY = {
    'opt_state': ('optimizer state', (
        'optim.name', 'optim.grad_clip_norm', 'optim.weight_decay', 'optim.momentum',
        'optim.freeze', 'optim.lookahead.', 'optim.norm_lr_factor', 'optim.bias_lr_factor',
        'transfer.', 'init.freeze_whitening')),
    'ema': ('weight EMA', ('ema.',)),
}


def _part(difference: str) -> str:
  """The state part ('opt_state', 'ema', ...) of a ``checkpoint.structure_differences`` line."""
  return difference.split(' ', 1)[0].split('/', 1)[0]


def changed_keys_message(differences: list[str], saved: Mapping[str, Any] | None,
                         config: ml_collections.ConfigDict, where: str) -> str | None:
  """One sentence naming the keys of ``config`` that differ from ``saved`` (the config that wrote
  the checkpoint ``where``, e.g. 'checkpoint 20 in /runs/a/checkpoints') among those that shape
  the state parts ``differences`` (``checkpoint.structure_differences``) name, and the fix; None
  when no such key differs, nothing was saved, or a part no key shapes differs too."""
  found = {_part(d) for d in differences}
  if not saved or not found <= set(_SHAPED_BY):   # e.g. other parameters: not a key's doing
    return None
  parts = [p for p in _SHAPED_BY if p in found]
  keys = tuple(k for p in parts for k in _SHAPED_BY[p][1])
  changed = configlib.config_differences(saved, configlib.config_dict(config), keys)
  if not changed:
    return None
  what = ' and '.join(_SHAPED_BY[p][0] for p in parts)
  return (f'Cannot resume {where} with this config ({"; ".join(changed)}): its {what} has another '
          "structure now; resume it with the checkpoint's values (config.json in the workdir) or "
          'start the new run in a new --workdir.')
