"""ViT, ConvNeXt, EfficientNet, MobileNetV3: parameter counts against torchvision itself, a training
step on 8 fake devices equal to 1 device (replicated and FSDP), stochastic depth, config errors
and layer-depth rules."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import default
from imgcls_jax import models, run, sharding
from imgcls_jax import state as state_lib
from imgcls_jax.data.info import DatasetInfo
from imgcls_jax.errors import UserError
from tests import torch_reference

# Small widths (and depths) for fast tests, per family class (any name of the family; 16 px,
# 3 channels); drop-path active wherever the family has it. A family missing here is tested at
# its defaults.
SMALL_BY_CLASS = {
    'ViT': dict(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=4, image_size=16,
                drop_path_rate=0.2),
    'ConvNeXt': dict(depths=(1, 1, 2, 1), widths=(8, 16, 16, 24), stem_patch=2,
                     drop_path_rate=0.2),
    'EfficientNet': dict(width_mult=0.25, depth_mult=0.3, small_inputs=True, drop_path_rate=0.3),
    'MobileNetV3': dict(width_mult=0.25, small_inputs=True),
    'ResNet': dict(width=8, small_inputs=True, drop_path_rate=0.2, stage_sizes=(1, 1, 1, 1)),
    'CNN': dict(widths=(8, 16)),
    'FastCNN': dict(widths=((8,), (16,)), image_size=16),
    'WideResNet': dict(depth=10, width=1),
}


# XLA:CPU options for the one-off programs compiled below (a training step per family and device
# count, the drop-path passes): LLVM at -O0 and XLA's older fusion code generator compile them
# about 5x faster (MobileNetV3's training step on 2 cores: 23 -> 4 s, on 8 devices 32 -> 6 s),
# most of this file's time. The HLO, its SPMD partitioning and every comparison stay the same;
# code generation only moves float32 results by an ulp or so (~1e-6 here; the tolerances are
# 1e-4 relative), and both sides of each comparison are compiled alike. An XLA without these
# options compiles with its defaults.
FAST_COMPILE = {'xla_backend_optimization_level': 0, 'xla_cpu_use_fusion_emitters': False}


def compiled(fn, *args):
  """Jitted ``fn`` compiled for ``args``, with ``FAST_COMPILE`` when every device is a CPU."""
  lowered = fn.lower(*args)
  if all(d.platform == 'cpu' for d in jax.devices()):
    try:
      return lowered.compile(compiler_options=FAST_COMPILE)
    except jax.errors.JaxRuntimeError as e:
      if 'No such compile option' not in str(e):
        raise
  return lowered.compile()


def family_class(name: str) -> str:
  """The class a registered name builds (``ViT`` for every ``vit_*``)."""
  constructor = models.family(name).constructor
  return getattr(constructor, 'func', constructor).__name__


def small(name: str) -> dict:
  """Constructor keywords that make ``name`` small (none for a family not listed)."""
  return dict(SMALL_BY_CLASS.get(family_class(name), {}))


SMALL = {name: small(name) for name in models.names()}
NEW_FAMILIES = ('vit_ti16', 'convnext_tiny', 'efficientnet_b0', 'mobilenet_v3_small')

# torchvision parameter counts named in issue 14 (1000 classes, 224 px): a fixed oracle besides
# the torchvision models built below.
ISSUE_COUNTS = {'vit_b16': 86_567_656, 'convnext_tiny': 28_589_128,
                'efficientnet_b0': 5_288_548, 'mobilenet_v3_large': 5_483_032}


def _torchvision_model(name: str):
  tv = torch_reference.torchvision()
  if tv is None:
    pytest.skip('torchvision is not installed')
  vit = {'vit_ti16': (3, 192, 768), 'vit_s16': (6, 384, 1536), 'vit_b16': (12, 768, 3072)}
  if name in vit:  # torchvision names only ViT-B; Ti and S are its class at their sizes
    heads, hidden, mlp = vit[name]
    return tv.models.VisionTransformer(image_size=224, patch_size=16, num_layers=12,
                                       num_heads=heads, hidden_dim=hidden, mlp_dim=mlp)
  return getattr(tv.models, name)()


def _count(model: nnx.Module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize('name', ['vit_ti16', 'vit_s16', 'vit_b16', 'convnext_tiny',
                                  'convnext_small', 'convnext_base', 'efficientnet_b0',
                                  'efficientnet_b1', 'efficientnet_b2', 'efficientnet_b3',
                                  'mobilenet_v3_small', 'mobilenet_v3_large'])
def test_parameter_count_matches_torchvision(name):
  import torch
  with torch.device('meta'):  # shapes only: nothing is allocated or initialised
    want = sum(p.numel() for p in _torchvision_model(name).parameters())
  ours = _count(nnx.eval_shape(lambda: models.get(name, num_classes=1000, in_channels=3,
                                                  rngs=nnx.Rngs(0))))
  assert ours == want
  if name in ISSUE_COUNTS:
    assert ours == ISSUE_COUNTS[name]


@pytest.mark.parametrize('name', ['mobilenet_v3_small', 'mobilenet_v3_large'])
@pytest.mark.parametrize('width_mult', [0.5, 0.75])
def test_mobilenet_width_mult_scales_every_width_as_torchvision(name, width_mult):
  """``width_mult`` scales the ``pre_logits`` width too (torchvision's ``last_channel``): the
  parameter counts are torchvision's at widths other than 1 (large at 0.5: 1,734,576)."""
  import torch
  tv = torch_reference.torchvision()
  if tv is None:
    pytest.skip('torchvision is not installed')
  with torch.device('meta'):
    want = sum(p.numel() for p in getattr(tv.models, name)(width_mult=width_mult).parameters())
  ours = _count(nnx.eval_shape(lambda: models.get(name, num_classes=1000, in_channels=3,
                                                  rngs=nnx.Rngs(0), width_mult=width_mult)))
  assert ours == want


@pytest.mark.parametrize('name, kw, match', [
    ('resnet18', dict(block='bottlenek'), r"^config.model.block='bottlenek' is not one of basic, "
                                          r'bottleneck\.$'),
    ('mobilenet_v3_small', dict(arch='tiny'), r"^config.model.arch='tiny' is not one of small, "
                                              r'large\.$'),
    # the rate given is named (not a block's share of it), with or without residual blocks
    ('efficientnet_b0', dict(drop_path_rate=1.5),
     r'^config.model.drop_path_rate must be in \[0, 1\), got 1.5\.$'),
    ('efficientnet_b0', dict(drop_path_rate=1.5, depth_mult=0.25),
     r'^config.model.drop_path_rate must be in \[0, 1\), got 1.5\.$'),
    ('efficientnet_b0', dict(drop_path_rate=1.02),
     r'^config.model.drop_path_rate must be in \[0, 1\), got 1.02\.$'),
    ('resnet18', dict(drop_path_rate=1.5, stage_sizes=(1,)),
     r'^config.model.drop_path_rate must be in \[0, 1\), got 1.5\.$'),
    # a scale of 0 or below would silently drop the blocks or widths
    ('efficientnet_b0', dict(depth_mult=0.0),
     r'^config.model.depth_mult must be positive, got 0.0\.$'),
    ('efficientnet_b0', dict(width_mult=-1.0),
     r'^config.model.width_mult must be positive, got -1.0\.$'),
    ('mobilenet_v3_small', dict(width_mult=0.0),
     r'^config.model.width_mult must be positive, got 0.0\.$'),
])
def test_bad_cnn_config_values_are_user_errors_naming_the_value(name, kw, match):
  """Refused before any parameter is made (so built eagerly: nothing is initialised)."""
  with pytest.raises(UserError, match=match):
    models.get(name, num_classes=10, in_channels=3, rngs=nnx.Rngs(0), **kw)


def _model(name: str, rngs: nnx.Rngs | None = None, **kw) -> nnx.Module:
  kw = {**SMALL[name], **kw}
  return models.get(name, num_classes=5, in_channels=3, rngs=rngs or nnx.Rngs(0), **kw)


def host_variables(model_fn: state_lib.ModelFn, *, sd: float = 0.2, seed: int = 7,
                   random_stats: bool = False):
  """(parameters, BatchNorm statistics) of ``model_fn``'s model made on the host from their
  shapes, with no initialisation program to compile (its threefry draws dominate the compile
  time of a small model's test programs): every parameter drawn around its usual start (scales
  around 1, the rest around 0; zero heads and zero last-BN scales moved off), so every branch and
  every logit depends on them; statistics at their start (means 0, variances 1) or, with
  ``random_stats``, moved too (variances around 1.5)."""
  shapes = state_lib.abstract_variables(model_fn)
  rng = np.random.default_rng(seed)

  def param(path, s):
    return (float(path[-1].key == 'scale') + sd * rng.standard_normal(s.shape)).astype(s.dtype)

  def stat(path, s):
    var = path[-1].key == 'var'
    if not random_stats:
      return np.full(s.shape, float(var), s.dtype)
    x = float(var) + sd * rng.standard_normal(s.shape)
    return (np.abs(x) + 0.5 if var else x).astype(s.dtype)
  return (jax.tree_util.tree_map_with_path(param, shapes.params),
          jax.tree_util.tree_map_with_path(stat, shapes.batch_stats))


@pytest.mark.parametrize('name', NEW_FAMILIES)
def test_bfloat16_config_computes_convs_and_matmuls_in_bfloat16(name):
  model_fn = lambda rngs: _model(name, rngs, dtype='bfloat16')  # noqa: E731
  model_def = state_lib.model_def(model_fn)
  shapes = state_lib.abstract_variables(model_fn)  # traced only: nothing is compiled
  params, stats = shapes.params, shapes.batch_stats
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))  # parameters stay f32
  x = jnp.zeros((2, 16, 16, 3), jnp.bfloat16)
  jaxpr = jax.make_jaxpr(lambda p, s: model_def.merge(p, s)(x, train=False))(params, stats)
  heavy = [e for e in jaxpr.jaxpr.eqns if e.primitive.name in ('conv_general_dilated',
                                                              'dot_general')]
  assert len(heavy) >= 4
  assert all(v.aval.dtype == jnp.bfloat16 for e in heavy for v in e.invars), name
  assert jaxpr.out_avals[0].dtype == jnp.float32  # logits are cast back for the loss


def test_vit_on_28px_images_with_patch_4_and_both_poolings():
  x = jnp.ones((2, 28, 28, 1))
  for pool, tokens in (('token', 50), ('gap', 49)):
    def build_and_run(pool=pool):
      m = models.get('vit_ti16', num_classes=10, in_channels=1, rngs=nnx.Rngs(0), patch_size=4,
                     image_size=28, pool=pool)
      return m.pos_embedding[...], m(x, train=False)
    pos, out = nnx.eval_shape(build_and_run)  # shapes only: nothing is computed
    assert pos.shape == (1, tokens, 192)  # 7 x 7 patches (+ the class token)
    assert out.shape == (2, 10)


@pytest.mark.parametrize('kw, match', [
    (dict(patch_size=5, image_size=28), r'patch_size=5 must divide config.model.image_size=28'),
    (dict(pool='max'), r"pool='max' is not one of token, gap"),
    (dict(drop_path_rate=1.0), r'drop_path_rate must be in \[0, 1\), got 1.0'),
])
def test_bad_vit_config_values_are_user_errors(kw, match):
  with pytest.raises(UserError, match=match):
    models.get('vit_ti16', num_classes=10, in_channels=1, rngs=nnx.Rngs(0), **kw)


def test_wrong_input_sizes_are_user_errors():
  def run(name, x, **kw):
    nnx.eval_shape(lambda: _model(name, **kw)(x, train=False))  # traced, not computed
  with pytest.raises(UserError, match=r'built for 32x32 images but got 28x28.*image_size'):
    run('vit_ti16', jnp.ones((1, 28, 28, 3)), image_size=32)
  with pytest.raises(UserError, match='too small for 4 ConvNeXt stages.*stem_patch'):
    run('convnext_tiny', jnp.ones((1, 16, 16, 3)), stem_patch=4)
  with pytest.raises(UserError, match="Unknown model 'vit_x16'"):
    models.get('vit_x16', num_classes=3, in_channels=3, rngs=nnx.Rngs(0))


# ---- stochastic depth ----

def test_drop_path_drops_whole_examples_in_training_only():
  from imgcls_jax.models import layers
  dp = layers.DropPath(0.25, ndim=4, rngs=nnx.Rngs(dropout=3))
  x = jnp.ones((4000, 2, 2, 3))
  y = np.asarray(dp(x, train=True))
  per_example = y.reshape(4000, -1)
  assert set(np.unique(per_example)) <= {0.0, np.float32(1 / 0.75)}
  assert np.all(per_example.min(1) == per_example.max(1))  # one draw per example
  assert abs((per_example[:, 0] == 0).mean() - 0.25) < 0.03  # 4000 draws: 3 sigma ~ 0.02
  np.testing.assert_array_equal(dp(x, train=False), x)
  assert layers.drop_path(0.0, ndim=4, rngs=nnx.Rngs(0)) is None


@pytest.mark.parametrize('name', ['vit_ti16', 'convnext_tiny', 'efficientnet_b0', 'resnet18'])
def test_drop_path_is_random_in_training_and_identity_at_eval(name):
  """The same weights with drop_path_rate 0.5 and 0: eval outputs equal; training outputs vary with
  the step key (the key ``ModelDef.merge`` takes, as in ``steps.train_step``)."""
  # No dropout before the head (EfficientNet's 0.2): the keys' differences are drop-path's alone.
  no_dropout = {} if models.unknown_arguments(name, ['dropout']) else {'dropout': 0.0}
  dropping, plain = (state_lib.model_def(
      lambda rngs, r=rate: _model(name, rngs, drop_path_rate=r, **no_dropout))
      for rate in (0.5, 0.0))

  @jax.jit
  def outputs(params, stats, x):  # one compiled program (eager forward passes are far slower)
    keys = jax.random.split(jax.random.key(0), 3)[jnp.array([0, 1, 2, 0])]
    # lax.map: the training forward pass is traced and compiled once for the four keys.
    train = jax.lax.map(lambda k: dropping.merge(params, stats, k)(x, train=True), keys)
    return (dropping.merge(params, stats)(x, train=False),
            plain.merge(params, stats)(x, train=False), train)

  x = jax.random.normal(jax.random.key(1), (16, 16, 16, 3))  # 16 examples: 3 keys, 3 masks
  variables = host_variables(lambda rngs: _model(name, rngs, drop_path_rate=0.5, **no_dropout))
  eval_dropping, eval_plain, train = jax.device_get(
      compiled(outputs, *variables, x)(*variables, x))
  np.testing.assert_array_equal(eval_dropping, eval_plain)
  assert len({o.tobytes() for o in train[:3]}) == 3  # another key, another set of dropped blocks
  np.testing.assert_array_equal(train[3], train[0])  # the same key, the same blocks


# ---- one training step: 8 fake devices == 1 device, replicated and FSDP ----

def _config(name: str, num_devices: int, placement: str) -> ml_collections.ConfigDict:
  c = default.get_config()
  c.model = ml_collections.ConfigDict({'name': name, **SMALL[name]})
  c.batch_size = 16
  c.eval_batch_size = 16
  c.num_train_steps = 1
  c.optim.update(warmup_epochs=0.0, learning_rate=0.1)
  c.mesh.num_devices = num_devices
  c.mesh.param_sharding = placement
  c.mesh.fsdp_min_size = 256
  c.data.mean, c.data.std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
  return c


INFO = DatasetInfo(name='synthetic', num_classes=5, class_names=tuple('abcde'),
                   image_shape=(16, 16, 3), num_examples={'train': 16, 'test': 16})


def _one_step(name: str, num_devices: int, placement: str, batch: dict[str, np.ndarray],
              init: state_lib.TrainState):
  """((params, batch stats) after one step from ``init``, loss, whether params are split)."""
  s = run.setup(_config(name, num_devices, placement), INFO, steps_per_epoch=1)
  _, shardings = state_lib.abstract_state(s.model_fn, s.tx, 0, s.mesh, s.placement)
  state = jax.device_put(init, shardings)  # the same initial state, placed for this mesh
  split = any(not a.sharding.is_fully_replicated for a in jax.tree.leaves(state.params))
  batch = sharding.put_batch(batch, sharding.batch_sharding(s.mesh))
  state, metrics = compiled(run.jit_train_step(s, shardings), state, batch)(state, batch)
  return jax.device_get((state.params, state.batch_stats)), float(metrics['loss']), split


@pytest.mark.parametrize('name', NEW_FAMILIES)
def test_train_step_on_8_devices_equals_1_device_replicated_and_fsdp(name):
  rng = np.random.default_rng(0)
  batch = {'image': rng.integers(0, 256, (16, 16, 16, 3), dtype=np.uint8),
           'label': rng.integers(0, 5, (16,), dtype=np.int32)}
  s = run.setup(_config(name, 1, 'replicated'), INFO, steps_per_epoch=1)
  params, batch_stats = host_variables(s.model_fn, sd=0.05)  # no init program to compile
  init = jax.device_get(state_lib.TrainState(
      step=np.zeros((), np.int32), params=params, batch_stats=batch_stats,
      opt_state=s.tx.init(params), rng=np.asarray(jax.random.key_data(jax.random.key(0)))))
  one, loss1, _ = _one_step(name, 1, 'replicated', batch, init)
  moved = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(one[0]),
                                                           jax.tree.leaves(init.params)))
  assert moved > 1e-3  # the step changed the parameters
  # FSDP on 8 devices covers "8 == 1" for every family; the replicated 8-device step (another
  # compilation per family) runs for the first family only.
  for placement in ('replicated', 'fsdp') if name == NEW_FAMILIES[0] else ('fsdp',):
    eight, loss8, split = _one_step(name, 8, placement, batch, init)
    assert split == (placement == 'fsdp')
    # float32 sums in another order (per-device partial sums, then across devices) only.
    assert loss8 == pytest.approx(loss1, rel=1e-5)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-5), eight, one)


# ---- layer-wise lr decay rules ----

@pytest.mark.parametrize('name, stem, first_block, head, top', [
    ('vit_ti16', 'pos_embedding', 'blocks.0.ln_1.scale', 'head.kernel', 3),
    ('convnext_tiny', 'stem.conv.kernel', 'stages.0.0.dwconv.kernel', 'head.kernel', 9),
    ('efficientnet_b0', 'stem.conv.kernel', 'blocks.0.dwconv.conv.kernel', 'head_conv.bn.scale',
     9),
    ('mobilenet_v3_small', 'stem.bn.bias', 'blocks.0.se.fc1.kernel', 'pre_logits.kernel', 12),
])
def test_layer_depths_cover_every_parameter_in_network_order(name, stem, first_block, head, top):
  names = state_lib.param_names(lambda rngs: models.get(name, num_classes=5, in_channels=3,
                                                       rngs=rngs, **SMALL[name]))
  depths, got_top = models.layer_depths(name, names)
  assert got_top == top
  assert depths[stem] == 0 and depths[first_block] == 1 and depths[head] == top
  assert sorted(set(depths.values())) == list(range(top + 1))
