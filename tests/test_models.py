"""Model table: parameter counts against torchvision's, output shapes, init details, the
layer-depth rule of each family."""
import functools
import re
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from imgcls_jax import models, state
from imgcls_jax.errors import UserError
from tests.conftest import REPO
from tests.test_families import host_variables


def _abstract(name, **kw):
  kw.setdefault('num_classes', 1000)
  kw.setdefault('in_channels', 3)
  return nnx.eval_shape(lambda: models.get(name, rngs=nnx.Rngs(0), **kw))


def _count(model):
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


# torchvision.models.resnetXX(num_classes=1000) parameter counts (BN running stats excluded).
@pytest.mark.parametrize('name,expected', [
    ('resnet18', 11_689_512), ('resnet34', 21_797_672), ('resnet50', 25_557_032),
    ('resnet101', 44_549_160), ('resnet152', 60_192_808), ('resnet200', 64_673_832),
])
def test_resnet_parameter_counts_match_torchvision(name, expected):
  assert _count(_abstract(name)) == expected


def test_wide_resnet_28_10_parameter_count():
  # WRN-28-10 for 10 classes: 36.5M in the paper; 36,479,194 with BN affine params and conv biases off.
  assert _count(_abstract('wide_resnet', num_classes=10, depth=28, width=10)) == 36_479_194


def test_wide_resnet_rejects_bad_depth():
  with pytest.raises(UserError, match='6n\\+4'):
    _abstract('wide_resnet', depth=27)


@pytest.mark.parametrize('name,kw,shape', [
    ('cnn', {}, (2, 8, 8, 1)),
    ('cnn', {'widths': (8, 16, 32)}, (2, 28, 28, 3)),
    ('resnet18', {'small_inputs': True}, (2, 32, 32, 3)),
    ('resnet50', {}, (2, 64, 64, 3)),
    ('wide_resnet', {'depth': 10, 'width': 1, 'dropout': 0.3}, (2, 32, 32, 3)),
])
def test_forward_shapes_train_and_eval(name, kw, shape):
  """Both passes of the model's own graph in one jitted program, on parameters and statistics
  drawn on the host from its shapes (``host_variables``; an eager init compiles one random
  program per parameter shape, most of this test's time). Kernels of std 0.02 keep ResNet-50's
  eval logits (start statistics: no normalisation) near 1, far from overflow."""
  model_fn = functools.partial(models.get, name, num_classes=7, in_channels=shape[-1], **kw)
  model_def = state.model_def(model_fn)

  @jax.jit
  def both(params, stats, x):
    return tuple(model_def.merge(params, stats)(x, train=train) for train in (True, False))
  for out in both(*host_variables(model_fn, sd=0.02), jnp.ones(shape)):
    assert out.shape == (2, 7) and out.dtype == jnp.float32
    assert np.all(np.isfinite(out))


def test_small_input_stem_keeps_resolution():
  small = _abstract('resnet18', num_classes=10, small_inputs=True)  # shapes only
  large = _abstract('resnet18', num_classes=10)
  assert small.conv1.kernel.shape == (3, 3, 3, 64)
  assert large.conv1.kernel.shape == (7, 7, 3, 64)


@pytest.mark.parametrize('name,last_bn,blocks', [('resnet18', 'bn2', 8), ('resnet50', 'bn3', 16)])
def test_last_bn_scale_of_each_residual_block_is_zero(name, last_bn, blocks):
  # The init itself, eager as models.get runs it, from a key of the 'rbg' PRNG: the threefry
  # default compiles a far larger random program for each parameter shape; the scales' values
  # come from constant initialisers, not the key.
  m = models.get(name, num_classes=10, in_channels=3, width=8,
                 rngs=nnx.Rngs(jax.random.key(0, impl='rbg')))
  scales = {'.'.join(map(str, k)): np.asarray(v[...])
            for k, v in nnx.to_flat_state(nnx.state(m, nnx.Param)) if k[-1] == 'scale'}
  zero = {n for n in scales if re.fullmatch(rf'layer\d\.\d+\.{last_bn}\.scale', n)}
  assert len(zero) == blocks
  for n, scale in scales.items():
    np.testing.assert_array_equal(scale, 0.0 if n in zero else 1.0, err_msg=n)
  assert len(scales) > 2 * blocks  # stem bn1, the other BNs of each block, downsample BNs: ones


def test_bfloat16_compute_keeps_float32_params_and_logits():
  model_fn = functools.partial(models.get, 'cnn', num_classes=10, in_channels=1,
                               dtype='bfloat16')
  shapes = state.abstract_variables(model_fn)  # the init's dtypes, traced only
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(shapes.params))
  model_def = state.model_def(model_fn)
  logits = jax.jit(lambda p, s, x: model_def.merge(p, s)(x, train=False))(
      *host_variables(model_fn), jnp.ones((2, 8, 8, 1)))
  assert logits.dtype == jnp.float32


def test_unknown_model_is_a_clear_error():
  with pytest.raises(UserError, match="Unknown model 'resnet51'.*resnet50"):
    models.get('resnet51', num_classes=10, in_channels=3, rngs=nnx.Rngs(0))


def test_bad_model_argument_names_the_model():
  with pytest.raises(UserError, match="Bad arguments for model 'cnn'"):
    models.get('cnn', num_classes=10, in_channels=3, rngs=nnx.Rngs(0), depth=3)


def _default_config():
  if REPO not in sys.path:
    sys.path.insert(0, REPO)
  from configs import default
  return default.get_config()


def test_another_familys_model_keys_name_the_keys_and_the_whole_group_fix():
  c = _default_config()   # its model group: cnn's widths, convs_per_stage, dropout
  c.model.name = 'resnet18'   # what --config.model.name=resnet18 does
  with pytest.raises(UserError) as e:
    models.from_config(c, num_classes=10, in_channels=1)
  assert str(e.value) == (
      "config.model sets convs_per_stage, dropout, widths, which model 'resnet18' does not take: "
      "another family's arguments (cnn's), which the config file's model group keeps when only "
      'config.model.name changes; replace the whole group, e.g. '
      '--config.model="{\'name\': \'resnet18\'}" (adding any of its own arguments: width, '
      'small_inputs, drop_path_rate).')
  # The fix it gives builds resnet18: torchvision's 11,689,512 parameters with a 10-class head
  # (990 fewer outputs of 512 weights and a bias) and a 3x3 stem on one channel (-9,408 + 576).
  c.model = ml_collections.ConfigDict({'name': 'resnet18', 'small_inputs': True})
  model = nnx.eval_shape(lambda: models.from_config(c, 10, 1)(rngs=nnx.Rngs(0)))
  assert _count(model) == 11_689_512 - 990 * 513 - 9_408 + 576
  # A key no family takes is a typo; a bad value of a key the model takes keeps its message.
  c = _default_config()
  c.model.widht = (8,)
  with pytest.raises(UserError, match=r"^config.model.widht is not an argument of model 'cnn' "
                                      r"\(did you mean 'widths'\?\); its arguments: widths, "
                                      r'convs_per_stage, dropout\.$'):
    models.from_config(c, 10, 1)
  c = _default_config()
  c.model.widths = (0,)
  with pytest.raises(UserError, match=r"^Bad arguments for model 'cnn' \(ValueError: widths="):
    models.from_config(c, 10, 1)(rngs=nnx.Rngs(0))


def test_small_input_conv_matches_lax_in_value_and_gradient():
  """The shift-and-matmul path (inputs smaller than the kernel) computes the same convolution."""
  from imgcls_jax.models import layers
  rng = np.random.default_rng(0)  # (eager jax.random draws compile a program per shape)
  x = jnp.asarray(rng.standard_normal((4, 2, 2, 5)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((3, 3, 5, 7)), jnp.float32)
  pad = ((1, 1), (1, 1))
  dn = jax.lax.conv_dimension_numbers(x.shape, k.shape, ('NHWC', 'HWIO', 'NHWC'))
  ref = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), pad, dimension_numbers=dn)
  ours = lambda x, k: layers.conv_general_dilated(x, k, (1, 1), pad, dimension_numbers=dn)
  # Jitted, as the models run it (eager, each op of the shift-and-matmul path compiles alone):
  # values and gradients of both paths in one program.
  grad = lambda f: jax.grad(lambda x, k: (f(x, k) ** 2).sum(), argnums=(0, 1))  # noqa: E731
  out_ours, out_ref, g_ours, g_ref = jax.jit(
      lambda x, k: (ours(x, k), ref(x, k), grad(ours)(x, k), grad(ref)(x, k)))(x, k)
  np.testing.assert_allclose(out_ours, out_ref, rtol=1e-5, atol=1e-5)
  for a, b in zip(g_ours, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  # Inputs at least as large as the kernel go to lax unchanged (bitwise).
  big = jnp.asarray(rng.standard_normal((2, 6, 6, 5)), jnp.float32)
  np.testing.assert_array_equal(ours(big, k), ref(big, k))


def _depths(name, **kw):
  """(depth of each parameter, top depth) by the table's rule for ``name`` on its real names."""
  names = state.param_names(functools.partial(models.get, name, num_classes=10, in_channels=3,
                                              **kw))
  depths, top = models.layer_depths(name, names)
  assert sorted(depths) == sorted(names)
  return depths, top


def _by_group(depths, group_of):
  """{group: depth} for the groups ``group_of(name)`` (each group must hold exactly one depth)."""
  out = {}
  for n, d in depths.items():
    out.setdefault(group_of(n), set()).add(d)
  assert all(len(v) == 1 for v in out.values()), out
  return {g: v.pop() for g, v in out.items()}


def _block(n, lists=('layer1', 'layer2', 'layer3', 'layer4', 'convs', 'norms', 'blocks')):
  parts = n.split('.')
  return '.'.join(parts[:2]) if parts[0] in lists else parts[0]


def test_resnet_layer_depths():
  depths, top = _depths('resnet18')
  assert top == 9
  assert _by_group(depths, _block) == {
      'conv1': 0, 'bn1': 0, 'layer1.0': 1, 'layer1.1': 2, 'layer2.0': 3, 'layer2.1': 4,
      'layer3.0': 5, 'layer3.1': 6, 'layer4.0': 7, 'layer4.1': 8, 'fc': 9}
  assert depths['layer2.0.downsample.conv.kernel'] == 3
  depths, top = _depths('resnet50')  # 3 + 4 + 6 + 3 bottleneck blocks
  groups = _by_group(depths, _block)
  assert top == 17 and groups['fc'] == 17 and groups['conv1'] == 0
  assert (groups['layer1.2'], groups['layer2.0'], groups['layer3.5'], groups['layer4.2']) == (
      3, 4, 13, 16)


def test_cnn_layer_depths():
  depths, top = _depths('cnn', widths=(16, 32), convs_per_stage=2)
  assert top == 5
  assert _by_group(depths, _block) == {
      'convs.0': 1, 'norms.0': 1, 'convs.1': 2, 'norms.1': 2, 'convs.2': 3, 'norms.2': 3,
      'convs.3': 4, 'norms.3': 4, 'head': 5}


def test_fast_cnn_layer_depths_put_the_hidden_layer_with_the_head():
  depths, top = _depths('fast_cnn', hidden=16)  # widths ((32, 64), (128,)): three conv layers
  assert top == 4
  assert _by_group(depths, _block) == {
      'convs.0': 1, 'norms.0': 1, 'convs.1': 2, 'norms.1': 2, 'convs.2': 3, 'norms.2': 3,
      'hidden': 4, 'fc': 4}


def test_wide_resnet_layer_depths_put_the_final_norm_with_the_head():
  depths, top = _depths('wide_resnet', depth=16, width=1)  # 3 groups of 2 blocks
  assert top == 7
  assert _by_group(depths, _block) == {
      'stem': 0, 'blocks.0': 1, 'blocks.1': 2, 'blocks.2': 3, 'blocks.3': 4, 'blocks.4': 5,
      'blocks.5': 6, 'bn': 7, 'fc': 7}
  assert depths['blocks.2.shortcut.kernel'] == 3


def test_every_table_entry_has_a_layer_depth_rule():
  for name in models.names():
    assert models.layer_depths(name, ['fc.kernel'])[1] >= 1, name  # a UserError when it has none


def test_layer_depths_of_an_unknown_model_is_a_clear_error():
  with pytest.raises(UserError, match="Unknown model 'resnet51'"):
    models.layer_depths('resnet51', ['fc.kernel'])


def test_small_input_conv_exports_without_gathers_and_matches_under_a_symbolic_batch():
  """A batch-polymorphic export (the exporter's) takes the selection-matmul path: no gather in the
  StableHLO (TFLite cannot convert one), and the same outputs as the concrete-batch path."""
  from jax import export as jax_export
  from imgcls_jax.models import layers
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(3, 2, 2, 4)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 4, 5)), jnp.float32)
  conv = lambda a: layers.conv_general_dilated(a, kernel, (1, 1), ((1, 1), (1, 1)))  # noqa: E731
  b, = jax_export.symbolic_shape('b')
  exported = jax_export.export(jax.jit(conv))(jax.ShapeDtypeStruct((b, 2, 2, 4), jnp.float32))
  assert not re.search(r'stablehlo\.(dynamic_)?gather', exported.mlir_module())
  want = jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  np.testing.assert_allclose(exported.call(x), want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(conv(x), want, rtol=1e-5, atol=1e-5)
