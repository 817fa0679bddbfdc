"""fast_cnn: its CPU-cheap pieces compute what the standard ones compute."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import export as jax_export

from imgcls_jax import models
from imgcls_jax.errors import UserError
from imgcls_jax.models import fast_cnn, layers


@functools.partial(nnx.jit, static_argnames='train')
def _apply(model, x, train):
  """``model(x, train=train)`` as one jitted program (as training and evaluation run it): eager,
  every op of the forward pass compiles on its own."""
  return model(x, train=train)


def test_affine_batch_norm_matches_flax_batch_norm():
  x = jnp.asarray(np.random.default_rng(0).normal(2.0, 3.0, (16, 5, 5, 6)), jnp.float32)
  ours, ref = fast_cnn.AffineBatchNorm(6), nnx.BatchNorm(6, momentum=0.9, epsilon=1e-5,
                                                         rngs=nnx.Rngs(0))
  for m in (ours, ref):
    m.scale[...] = jnp.linspace(0.5, 2.0, 6)
    m.bias[...] = jnp.linspace(-1.0, 1.0, 6)

  def loss(model, x):
    return jnp.sum(jnp.sin(model(x, use_running_average=False)))

  (lo, go), (lr, gr) = [nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1)))(m, x)
                         for m in (ours, ref)]
  np.testing.assert_allclose(lo, lr, rtol=1e-5)
  np.testing.assert_allclose(go[1], gr[1], atol=1e-4)                  # d/dx
  np.testing.assert_allclose(go[0]['scale'][...], gr[0]['scale'][...], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(go[0]['bias'][...], gr[0]['bias'][...], rtol=1e-4, atol=1e-4)
  ours(x, use_running_average=False)
  ref(x, use_running_average=False)
  np.testing.assert_allclose(ours.mean[...], ref.mean[...], rtol=1e-5)
  np.testing.assert_allclose(ours.var[...], ref.var[...], rtol=1e-4)
  np.testing.assert_allclose(ours(x, use_running_average=True), ref(x, use_running_average=True),
                             atol=1e-5)


def test_pooling_and_space_to_depth():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 7, 9, 3)), jnp.float32)
  np.testing.assert_array_equal(fast_cnn.max_pool_2x2(x), nnx.max_pool(x, (2, 2), strides=(2, 2)))
  x = jnp.arange(2 * 4 * 4 * 1, dtype=jnp.float32).reshape(2, 4, 4, 1)
  s = fast_cnn.space_to_depth(x)
  assert s.shape == (2, 2, 2, 4)
  np.testing.assert_array_equal(s[0, 0, 1], [x[0, 0, 2, 0], x[0, 0, 3, 0], x[0, 1, 2, 0],
                                             x[0, 1, 3, 0]])


def test_registered_model_shapes_and_parameter_count():
  m = models.get('fast_cnn', num_classes=10, in_channels=1, rngs=nnx.Rngs(0))
  # s2d stem: conv 4->32 (1152), 32->64 (18432), 64->128 (73728) + 2 x (32+64+128) BN
  # + flatten 7*7*128 -> 10 (62720 + 10).
  n = sum(p.size for p in jax.tree.leaves(nnx.state(m, nnx.Param)))
  assert n == 1152 + 18432 + 73728 + 2 * (32 + 64 + 128) + 62720 + 10
  out = _apply(m, jnp.zeros((3, 28, 28, 1)), train=True)
  assert out.shape == (3, 10) and out.dtype == jnp.float32
  gap = models.get('fast_cnn', num_classes=4, in_channels=3, rngs=nnx.Rngs(0), stem='none',
                   widths=((8,), (16,)), head='gap', image_size=12)
  assert _apply(gap, jnp.zeros((2, 12, 12, 3)), train=False).shape == (2, 4)
  with pytest.raises(UserError, match='stem'):
    models.get('fast_cnn', num_classes=4, in_channels=1, rngs=nnx.Rngs(0), stem='conv7')
  # Other image sizes: the flatten head's size is fixed (a dot_general traceback, before); the
  # global-average head takes any size.
  with pytest.raises(UserError, match=r'^This fast_cnn was built for 28x28 images \(its flatten '
                     r'head\) but got 8x8; set config.model.image_size to the input size'):
    _apply(m, jnp.zeros((2, 8, 8, 1)), train=False)
  assert _apply(gap, jnp.zeros((2, 16, 16, 3)), train=False).shape == (2, 4)


def test_im2col_convs_compute_what_lax_convs_compute():
  """``conv='im2col'``: the same loss and parameter gradients as XLA's convolutions (the oracle),
  and no convolution left in the program of the forward and backward passes (both jitted: eager
  op-by-op im2col took minutes on 2 busy cores)."""
  kw = dict(num_classes=10, in_channels=1, stem='none', widths=((8,), (16,), (32,)), image_size=16)
  x = jnp.asarray(np.random.default_rng(2).normal(size=(4, 16, 16, 1)), jnp.float32)
  labels = jnp.arange(4)

  def loss(model, x):
    logits = model(x, train=True)
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), labels])

  def run(conv):  # (loss, {parameter path: gradient}, the lowered program's text)
    graphdef, params = nnx.split(models.get('fast_cnn', rngs=nnx.Rngs(0), conv=conv, **kw))
    step = jax.jit(lambda p, x: nnx.value_and_grad(loss)(nnx.merge(graphdef, p), x))
    value, grads = step(params, x)
    return value, dict(nnx.to_flat_state(grads)), step.lower(params, x).as_text()

  (lr, gr, hlo_r), (lo, go, hlo_o) = run('xla'), run('im2col')
  np.testing.assert_allclose(lo, lr, rtol=1e-5)
  assert gr.keys() == go.keys() and any('convs' in str(k) for k in gr)
  for k in gr:
    np.testing.assert_allclose(go[k][...], gr[k][...], rtol=1e-4, atol=1e-5, err_msg=str(k))
  assert 'convolution' not in hlo_o
  assert 'convolution' in hlo_r
  with pytest.raises(UserError, match='conv'):
    models.get('fast_cnn', rngs=nnx.Rngs(0), conv='winograd', **kw)


def test_im2col_is_not_used_under_a_symbolic_batch():
  """An export (symbolic batch) keeps XLA's convolution for ``im2col=True``: the im2col form there
  would be a selection matmul of (h*w) x (h*w*9) constants in the exported model."""
  kernel = jnp.asarray(np.random.default_rng(3).normal(size=(3, 3, 4, 5)), jnp.float32)
  conv = lambda a: layers.conv_general_dilated(a, kernel, (1, 1), ((1, 1), (1, 1)),  # noqa: E731
                                               dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                               im2col=True)
  b, = jax_export.symbolic_shape('b')
  exported = jax_export.export(jax.jit(conv))(jax.ShapeDtypeStruct((b, 6, 6, 4), jnp.float32))
  assert 'convolution' in exported.mlir_module()
  assert 'convolution' not in jax.jit(conv).lower(jnp.zeros((2, 6, 6, 4))).as_text()
  x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 6, 6, 4)), jnp.float32)
  np.testing.assert_allclose(exported.call(x), conv(x), rtol=1e-5, atol=1e-5)


def test_residual_adds_the_input_of_every_equal_width_conv():
  """``residual=True``: the same parameters as the plain net; a conv whose input and output widths
  match adds its input (x + relu(bn(conv(x)))), written out here with jax.lax and numpy."""
  kw = dict(num_classes=3, in_channels=2, stem='none', widths=((6, 6), (6,)), head='gap',
            image_size=8)
  plain = models.get('fast_cnn', rngs=nnx.Rngs(0), **kw)
  res = models.get('fast_cnn', rngs=nnx.Rngs(0), residual=True, **kw)
  assert res.plan == ['conv', 'res', 'pool', 'res']
  assert plain.plan == ['conv', 'conv', 'pool', 'conv']
  x = jnp.asarray(np.random.default_rng(5).normal(size=(4, 8, 8, 2)), jnp.float32)

  def conv_bn_relu(i, a):  # batch statistics, as in training (scale 1, bias 0 at init)
    y = jax.lax.conv_general_dilated(a, res.convs[i].kernel[...], (1, 1), 'SAME',  # no bias
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    y = np.asarray(y, np.float64)
    y = (y - y.mean((0, 1, 2))) / np.sqrt(y.var((0, 1, 2)) + 1e-5)
    return np.maximum(y, 0.0).astype(np.float32)

  a = conv_bn_relu(0, x)
  a = a + conv_bn_relu(1, a)
  a = a.reshape(4, 4, 2, 4, 2, 6).max(axis=(2, 4))
  a = a + conv_bn_relu(2, a)
  want = a.mean((1, 2)) @ np.asarray(res.fc.kernel[...]) + np.asarray(res.fc.bias[...])
  np.testing.assert_allclose(_apply(res, x, train=True), want, rtol=1e-4, atol=1e-4)
  assert not np.allclose(_apply(plain, x, train=True), want, atol=1e-2)
  count = lambda m: sum(p.size for p in jax.tree.leaves(nnx.state(m, nnx.Param)))  # noqa: E731
  assert count(res) == count(plain)
