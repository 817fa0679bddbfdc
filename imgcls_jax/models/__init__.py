"""The model table: name -> ``Family(constructor, layer_depths, first_conv)``.

Adding a model family is one new file in this package and one line per name in ``_TABLE`` (or one
``register`` call, for a family defined outside the package). Every constructor takes
``num_classes``, ``in_channels``, ``dtype``, ``rngs`` plus its own keyword arguments (from
``config.model``), and returns an ``nnx.Module`` called as ``model(x, train=...)`` on
``x_BxHxWxC`` float images, returning ``logits_BxK``. A sized name (``vit_b16``, ``convnext_tiny``,
``efficientnet_b0``, ...) binds its architecture's keywords with ``functools.partial``; config keys
of the same name override them (e.g. small widths in tests).

A family's ``layer_depths(param_names) -> (depth per name, top depth L)`` orders its parameters for
layer-wise learning-rate decay (``config.transfer.layer_decay``: depth ``d`` trains at
``decay ** (L - d)`` x the rate): the stem at 0, each block or layer one deeper, the head at ``L``.
Names are dotted parameter paths (``layer1.0.conv1.kernel``, see ``imgcls_jax.state.param_names``);
``layers.block_depths`` builds such a rule from "which block holds this parameter".

A family whose first layer is a convolution on the normalised image (after a parameter-free stem,
if any) opts in to patch whitening (``config.init.patch_whitening``, ``whitening.py``) with a
``FirstConv``: the kernel's dotted name and the stem as a numpy function.

A family registered from outside the package is recorded with ``registration.code_origin`` (where
it was defined, which --config file loaded it), so that a run trained with it names that file to a
later mode given ``--workdir`` alone.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import json
import numbers
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

import numpy as np
from flax import nnx

from imgcls_jax import registration
from imgcls_jax.errors import UserError
from imgcls_jax.models import (cnn, convnext, efficientnet, fast_cnn, mobilenet, resnet, vit,
                               wide_resnet)

if TYPE_CHECKING:
  import ml_collections

# (parameter names) -> (depth per name, depth L of the head).
LayerDepths = Callable[[list[str]], tuple[dict[str, int], int]]


@dataclasses.dataclass(frozen=True)
class FirstConv:
  """What patch whitening needs of a family: its first conv's kernel (a dotted parameter name)
  and ``stem(x_NxHxWxC, config.model) -> x``, the parameter-free layers before that conv as a
  numpy function of the normalised images (None: the conv reads them as they are)."""
  kernel: str
  stem: Callable[[np.ndarray, Mapping[str, Any]], np.ndarray] | None = None


@dataclasses.dataclass(frozen=True)
class Family:
  """A registered model: its constructor, its layer-depth rule (None: no layer decay) and its
  first convolution (None: no patch whitening)."""
  constructor: Callable[..., nnx.Module]
  layer_depths: LayerDepths | None = None
  first_conv: FirstConv | None = None


def _resnet(stage_sizes: tuple[int, ...], block: str) -> Family:
  return Family(functools.partial(resnet.ResNet, stage_sizes=stage_sizes, block=block),
                resnet.layer_depths)


def _sized(constructor: Callable[..., nnx.Module], rule: LayerDepths, **size: Any) -> Family:
  """A family member: ``size`` fixes its architecture; config keys may override the defaults."""
  return Family(functools.partial(constructor, **size), rule)


_TABLE: dict[str, Family] = {
    'cnn': Family(cnn.CNN, cnn.layer_depths, FirstConv('convs.0.kernel')),
    'fast_cnn': Family(fast_cnn.FastCNN, fast_cnn.layer_depths,
                       FirstConv('convs.0.kernel', fast_cnn.whitening_stem)),
    'resnet18': _resnet((2, 2, 2, 2), 'basic'),
    'resnet34': _resnet((3, 4, 6, 3), 'basic'),
    'resnet50': _resnet((3, 4, 6, 3), 'bottleneck'),
    'resnet101': _resnet((3, 4, 23, 3), 'bottleneck'),
    'resnet152': _resnet((3, 8, 36, 3), 'bottleneck'),
    'resnet200': _resnet((3, 24, 36, 3), 'bottleneck'),
    'wide_resnet': Family(wide_resnet.WideResNet, wide_resnet.layer_depths),
}
_TABLE.update({name: _sized(vit.ViT, vit.layer_depths, width=w, depth=d, num_heads=h, mlp_dim=m)
               for name, (w, d, h, m) in vit.SIZES.items()})
_TABLE.update({name: _sized(convnext.ConvNeXt, convnext.layer_depths, depths=d, widths=w,
                            drop_path_rate=r) for name, (d, w, r) in convnext.SIZES.items()})
_TABLE.update({name: _sized(efficientnet.EfficientNet, efficientnet.layer_depths, width_mult=w,
                            depth_mult=d, dropout=p)
               for name, (w, d, p) in efficientnet.SIZES.items()})
_TABLE.update({name: _sized(mobilenet.MobileNetV3, mobilenet.layer_depths, arch=a, last_channel=c)
               for name, (a, c) in mobilenet.SIZES.items()})


_BUILT_IN = frozenset(_TABLE)


def names() -> list[str]:
  """All registered model names."""
  return sorted(_TABLE)


def register(name: str, constructor: Callable[..., nnx.Module], *,
             layer_depths: LayerDepths | None = None, first_conv: FirstConv | None = None,
             replace: bool = False) -> None:
  """Adds a model family defined outside this package (same constructor contract as the table)."""
  if name in _TABLE and not replace:
    raise UserError(f"Model '{name}' is already registered; pick another name or pass "
                    'replace=True.')
  _TABLE[name] = Family(constructor, layer_depths, first_conv)
  _ORIGINS[name] = registration.code_origin(constructor)


def unregister(name: str) -> None:
  """Removes ``name`` from the table (nothing happens when it is not there)."""
  _TABLE.pop(name, None)
  _ORIGINS.pop(name, None)


# ---- code registered from outside the package: where it came from ----

_ORIGINS: dict[str, dict[str, str]] = {}   # a registered family's registration.code_origin


def origin(name: str) -> dict[str, str] | None:
  """``registration.code_origin`` of a family registered from outside this package, for a run
  directory to record; None for a built-in or unknown name."""
  return None if name in _BUILT_IN else _ORIGINS.get(name)


def ensure_registered(name: str, where: dict[str, str] | None) -> None:
  """Refuses, naming the code to load, a trained run's model ``name`` that this process does not
  know, when it was registered outside the package at training (``where``: ``origin``'s record).
  Loading a run never imports or runs that code by itself: a run directory, perhaps someone
  else's, would then run any file it names; the user passes it as --config (or imports it)."""
  if name in _TABLE or not where:
    return
  raise registration.unregistered(f"Model '{name}' of this run is a family", 'imgcls_jax.models',
                                  where)


def family(name: str) -> Family:
  """The registered family of ``name`` (UserError for an unknown name)."""
  if name not in _TABLE:
    raise UserError(f"Unknown model '{name}'; set config.model.name to one of: {', '.join(names())}.")
  return _TABLE[name]


def arguments(name: str) -> tuple[list[inspect.Parameter], dict[str, Any], bool]:
  """(the constructor's parameters, the keywords a sized name binds, whether it takes any
  keyword) of model ``name``; UserError for an unknown name."""
  fn, bound = family(name).constructor, {}
  while isinstance(fn, functools.partial):  # a sized name binds its architecture's keywords
    bound = {**fn.keywords, **bound}
    fn = fn.func
  # nnx.Module classes show their metaclass's (*args, **kwargs): read __init__ instead.
  params = list(inspect.signature(fn.__init__ if inspect.isclass(fn) else fn).parameters.values())
  return params, bound, any(p.kind is p.VAR_KEYWORD for p in params)


# Every constructor's arguments, given by the caller (from_config), never by config.model.
_COMMON = ('self', 'num_classes', 'in_channels', 'dtype', 'rngs')


def unknown_arguments(name: str, keys: Iterable[str]) -> list[str]:
  """The ``keys`` (config.model keys, less 'name') that model ``name``'s constructor does not
  take; none when it takes any keyword."""
  params, _, any_keyword = arguments(name)
  taken = {p.name for p in params}
  return [] if any_keyword else [k for k in keys if k not in taken]


def check_arguments(name: str, keys: Iterable[str]) -> None:
  """UserError when model ``name`` does not take one of the config.model ``keys``: naming the
  family they belong to where another one takes them (the config file's model keys stay when
  only config.model.name changes on the command line), else the nearest argument."""
  keys = sorted(set(keys) - {'name'})
  unknown = unknown_arguments(name, keys)
  if not unknown:
    return
  params, bound, _ = arguments(name)
  own = [p.name for p in params if p.name not in _COMMON and p.name not in bound]
  owners = {k: [n for n in names() if n != name and not unknown_arguments(n, [k])]
            for k in unknown}
  foreign = [k for k in unknown if owners[k]]
  if foreign:
    families = [n for n in names() if n != name and not unknown_arguments(n, foreign)]
    whose = f" ({'e.g. ' if len(families) > 1 else ''}{families[0]}'s)" if families else ''
    raise UserError(f"config.model sets {', '.join(foreign)}, which model '{name}' does not take:"
                    f' another family\'s arguments{whose}, which the config file\'s model group '
                    'keeps when only config.model.name changes; replace the whole group, e.g. '
                    f"--config.model=\"{{'name': '{name}'}}\" (adding any of its own arguments: "
                    f"{', '.join(own) or 'none'}).")
  near = difflib.get_close_matches(unknown[0], own, n=1)
  raise UserError(f"config.model.{unknown[0]} is not an argument of model '{name}'"
                  + (f" (did you mean '{near[0]}'?)" if near else '')
                  + f"; its arguments: {', '.join(own) or 'none'}.")


def _kind(default: Any, built_in: bool) -> tuple[Callable[[Any], bool], str] | None:
  """(a test of a value, its words) for the type of a constructor's default; None: any value.
  A family registered from outside the package is held to bools and strings only (its numeric
  defaults may be written ``dropout=0`` for a float)."""
  if isinstance(default, bool):
    return (lambda v: isinstance(v, (bool, np.bool_))), 'True or False'
  if isinstance(default, str):
    return (lambda v: isinstance(v, str)), 'a string'
  if not built_in:
    return None
  if isinstance(default, int):
    return (lambda v: isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))
            ), 'a whole number'
  if isinstance(default, float):
    return (lambda v: isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))
            ), 'a number'
  if isinstance(default, tuple):
    return (lambda v: isinstance(v, (tuple, list))), 'a tuple'
  return None


def defaults(name: str) -> dict[str, Any]:
  """model ``name``'s constructor arguments that a config may set (not ``_COMMON``) -> their
  default now, a sized name's bound keywords included, as JSON values (tuples as lists); an
  argument whose default JSON cannot hold (a function, a dtype object) is left out."""
  params, bound, _ = arguments(name)
  values = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
  out = {}
  for key, value in {**values, **bound}.items():
    if key in _COMMON:
      continue
    try:
      out[key] = json.loads(json.dumps(value))
    except (TypeError, ValueError):
      continue
  return out


def check_types(name: str, kwargs: dict[str, Any]) -> None:
  """UserError for a config.model value of another type than its default in model ``name``'s
  constructor (e.g. ``small_inputs='no'``, which Python would take as True): a group given as a
  whole (``--config.model="{...}"``) is not type-checked by the config parser."""
  params, bound, _ = arguments(name)
  defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
  defaults.update(bound)
  for key, value in kwargs.items():
    kind = _kind(defaults.get(key), name in _BUILT_IN)
    if kind is not None and value is not None and not kind[0](value):
      raise UserError(f'config.model.{key}={value!r} must be {kind[1]} (model \'{name}\'s '
                      f'default is {defaults[key]!r}).')


def get(name: str, **kwargs: Any) -> nnx.Module:
  """Builds the model registered as ``name`` with constructor ``kwargs``."""
  constructor = family(name).constructor
  try:
    return constructor(**kwargs)
  except (TypeError, ValueError, ArithmeticError, KeyError) as e:   # a bad / impossible value
    raise UserError(f"Bad arguments for model '{name}' ({type(e).__name__}: {e}); check the "
                    'config.model keys.') from None


def from_config(config: ml_collections.ConfigDict, num_classes: int,
                in_channels: int) -> Callable[..., nnx.Module]:
  """``rngs -> model`` for ``config.model`` (every key but ``name`` goes to the constructor);
  UserError now for a key the model does not take (``check_arguments``)."""
  kwargs = {k: v for k, v in config.model.items() if k != 'name'}
  check_arguments(config.model.name, kwargs)
  return functools.partial(get, config.model.name, num_classes=num_classes,
                           in_channels=in_channels, dtype=config.dtype, **kwargs)


def layer_depths(model_name: str, param_names: list[str]) -> tuple[dict[str, int], int]:
  """(depth per parameter name, top depth ``L``) from the family of ``model_name``."""
  rule = family(model_name).layer_depths
  if rule is None:
    raise UserError(f"The model '{model_name}' has no layer-depth rule; give its family a "
                    'layer_depths function (see imgcls_jax/models/__init__.py) or set '
                    'config.transfer.layer_decay=1.0.')
  depths, top = rule(list(param_names))
  bad = [n for n in param_names if not 0 <= depths.get(n, -1) <= top]
  if bad:
    raise UserError(f"The layer_depths rule of model '{model_name}' gives parameter '{bad[0]}' "
                    f'no depth in 0..{top}; fix the rule or set config.transfer.layer_decay=1.0.')
  return depths, top
