"""ViT, ConvNeXt, EfficientNet and MobileNetV3 weights -> the Flax models: PyTorch's logits within
1e-4 rel, the config.model.name the weights fit, timm's layouts and variants that are not imported
refused by name, and what a ViT's state dict cannot say (its head count, its pooling) warned of.

The PyTorch models are torchvision's and timm's own (``tests/torch_reference.py`` imports them on
a CPU torch); the reference ResNet is test_torch_import.py's.
"""
import numpy as np
import pytest

torch = pytest.importorskip('torch')
from torch import nn  # noqa: E402

import jax  # noqa: E402

from imgcls_jax import models, torch_import  # noqa: E402
from imgcls_jax import weights as weights_lib  # noqa: E402
from imgcls_jax import state as state_lib  # noqa: E402
from imgcls_jax.errors import UserError  # noqa: E402
from tests import torch_reference  # noqa: E402
from tests.test_torch_import import _reference  # noqa: E402



def _randomized(model, seed=0):
  """Every norm weight / bias, layer scale and running statistic random, and the zero-initialised
  tensors (ViT's head and class token) too, so each tensor's mapping shows in the logits."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith('bias'):
        p.copy_(torch.rand(p.shape, generator=g) * 0.4 - 0.2)
      elif p.ndim <= 1 or name.endswith(('layer_scale', 'gamma')):
        p.copy_(torch.rand(p.shape, generator=g) + 0.5)
      elif torch.all(p == 0) or 'token' in name or 'pos' in name:
        p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    for m in model.modules():
      if isinstance(m, nn.BatchNorm2d):
        m.running_mean.uniform_(-0.2, 0.2, generator=g)
        m.running_var.uniform_(0.5, 2.0, generator=g)
  return model.eval()


def _jit_logits(name, weights, x_NHWC, fit=False, **model_kw):
  """The Flax model of ``name`` with ``weights`` (all of them used; first ``torch_import.fit_to``
  the model if ``fit``), jitted, on ``x_NHWC``."""
  model_fn = lambda rngs: models.get(name, num_classes=1000, in_channels=3, rngs=rngs,  # noqa: E731
                                     **model_kw)
  model_def = state_lib.model_def(model_fn)
  shapes = state_lib.abstract_variables(model_fn)
  if fit:
    weights = torch_import.fit_to(weights, shapes.params)
  keep_all = lambda _: False  # noqa: E731
  params, n = weights_lib.merge(shapes.params, weights.params, origin=weights.origin,
                                skip=keep_all)
  stats, _ = weights_lib.merge(shapes.batch_stats, weights.batch_stats, origin=weights.origin,
                               skip=keep_all)
  assert n == len(weights.params)
  fn = jax.jit(lambda p, s, x: model_def.merge(p, s)(x, train=False))
  return np.asarray(fn(params, stats, x_NHWC))


def _tv(name, **kw):
  tv = torch_reference.torchvision()
  if tv is None:
    pytest.skip('torchvision is not installed')
  return getattr(tv.models, name)(**kw)


def _timm(name, **kw):
  timm = torch_reference.timm()
  if timm is None:
    pytest.skip('timm is not installed')
  return timm.create_model(name, pretrained=False, **kw)


def _shapes_of(make) -> dict[str, np.ndarray]:
  """``make()``'s state dict as zeros of its names, shapes and dtypes: the model is built on
  torch's meta device (nothing allocated or initialised). The naming and the refusals below read
  only names and shapes."""
  with torch.device('meta'):
    model = make()
  return {k: np.zeros(tuple(v.shape), torch.empty((), dtype=v.dtype).numpy().dtype)
          for k, v in model.state_dict().items()}


def _tv_vit_b16(**kw):
  """torchvision's ViT-B/16 (what ``vit_b_16`` builds: its class at its sizes) with ``kw``
  (``image_size``, ``num_layers``) set."""
  tv = torch_reference.torchvision()
  if tv is None:
    pytest.skip('torchvision is not installed')
  return tv.models.VisionTransformer(**{'patch_size': 16, 'num_layers': 12, 'num_heads': 12,
                                        'hidden_dim': 768, 'mlp_dim': 3072, **kw})


def _tv_convnext_tiny(depths):
  """torchvision's ConvNeXt-T (``convnext_tiny``: its class, widths and stochastic depth) with
  ``depths`` blocks per stage."""
  tv = torch_reference.torchvision()
  if tv is None:
    pytest.skip('torchvision is not installed')
  cfg = tv.models.convnext.CNBlockConfig
  widths = (96, 192, 384, 768, None)
  return tv.models.ConvNeXt([cfg(widths[i], widths[i + 1], n) for i, n in enumerate(depths)],
                            stochastic_depth_prob=0.1)


def _tv_efficientnet_b0(depth_mult):
  """torchvision's EfficientNet-B0 (``efficientnet_b0``: its stage table, widths and dropout) at
  ``depth_mult`` (blocks per stage rounded up, as torchvision scales B1-B7)."""
  tv = torch_reference.torchvision()
  if tv is None:
    pytest.skip('torchvision is not installed')
  blocks, last_channel = tv.models.efficientnet._efficientnet_conf(
      'efficientnet_b0', width_mult=1.0, depth_mult=depth_mult)
  return tv.models.EfficientNet(blocks, 0.2, last_channel=last_channel)


# (our name, our extra model keys, the PyTorch model, file format). Real architectures at 32 px,
# at fewer blocks where both sides take a depth (the import maps every block alike; JAX's compile
# time grows with the blocks): ViT-B/16 at image_size 32 (a 2x2 patch grid) and 2 blocks, timm's
# ViT-Ti/16 at 2 blocks, torchvision's ConvNeXt-T and timm's convnext_atto (ConvNeXt at widths
# (40, 80, 160, 320) with 1x1-conv MLPs) at depths (1, 1, 2, 1), EfficientNet-B0 at depth_mult
# 0.3 (8 blocks, both kernel sizes and strides); the MobileNetV3 tables are whole.
SHORT_CONVNEXT = (1, 1, 2, 1)
IMPORTS = {
    'torchvision_vit_b16': ('vit_b16', dict(image_size=32, depth=2),
                            lambda: _tv_vit_b16(image_size=32, num_layers=2), 'safetensors'),
    'timm_vit_ti16': ('vit_ti16', dict(image_size=32, depth=2),
                      lambda: _timm('vit_tiny_patch16_224', img_size=32, depth=2), 'pt'),
    'torchvision_convnext_tiny': ('convnext_tiny', dict(depths=SHORT_CONVNEXT),
                                  lambda: _tv_convnext_tiny(SHORT_CONVNEXT), 'pt'),
    'timm_convnext_atto': ('convnext_tiny', dict(depths=SHORT_CONVNEXT,
                                                 widths=(40, 80, 160, 320)),
                           lambda: _timm('convnext_atto', depths=SHORT_CONVNEXT), 'safetensors'),
    'torchvision_efficientnet_b0': ('efficientnet_b0', dict(depth_mult=0.3),
                                    lambda: _tv_efficientnet_b0(0.3), 'safetensors'),
    'torchvision_mobilenet_v3_large': ('mobilenet_v3_large', {}, lambda: _tv('mobilenet_v3_large'),
                                       'pt'),
    # width_mult scales the pre_logits width too, as torchvision's
    'torchvision_mobilenet_v3_small_w05': ('mobilenet_v3_small', dict(width_mult=0.5),
                                           lambda: _tv('mobilenet_v3_small', width_mult=0.5),
                                           'safetensors'),
}


@pytest.mark.parametrize('case', sorted(IMPORTS))
def test_imported_family_matches_pytorch_logits(tmp_path, case):
  name, model_kw, make, fmt = IMPORTS[case]
  ref = _randomized(make())
  path = str(tmp_path / f'{case}.{fmt}')
  if fmt == 'pt':
    torch.save({'model': ref.state_dict()}, path)
  else:
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, path)
  x_NCHW = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    want = ref(x_NCHW).numpy()
  got = _jit_logits(name, torch_import.load(path), x_NCHW.permute(0, 2, 3, 1).numpy(), **model_kw)
  rel = np.abs(got - want).max() / np.abs(want).max()
  print(f'{case}: max |logit diff| / max |logit| = {rel:.2e}')
  assert got.shape == want.shape == (2, 1000)
  assert np.abs(want).max() > 0.1 and np.ptp(want) > 0.1  # logits that carry the weights
  assert rel < 1e-4, rel


def test_imported_layouts_of_the_new_families():
  vit = _tv_vit_b16(image_size=32, num_layers=4)  # ViT-B/16 to its block 3
  w = torch_import.convert({k: v.numpy() for k, v in vit.state_dict().items()})
  qkv = vit.encoder.layers.encoder_layer_3.self_attention.in_proj_weight.detach().numpy()
  np.testing.assert_array_equal(w.params['blocks.3.self_attention.in_proj.kernel'], qkv.T)
  assert w.params['pos_embedding'].shape == (1, 5, 768)
  convnext = _tv('convnext_tiny')
  w = torch_import.convert({k: v.numpy() for k, v in convnext.state_dict().items()})
  np.testing.assert_array_equal(w.params['stages.2.4.layer_scale'],
                                convnext.features[5][4].layer_scale.detach().numpy().ravel())
  down = convnext.features[4][1].weight.detach().numpy()
  np.testing.assert_array_equal(w.params['downsample.1.conv.kernel'], down.transpose(2, 3, 1, 0))
  mobile = _tv('mobilenet_v3_small')
  w = torch_import.convert({k: v.numpy() for k, v in mobile.state_dict().items()})
  se = mobile.features[1].block[1].fc1.weight.detach().numpy()   # block 0: no expansion
  np.testing.assert_array_equal(w.params['blocks.0.se.fc1.kernel'], se[:, :, 0, 0].T)
  assert 'blocks.0.expand.conv.kernel' not in w.params
  np.testing.assert_array_equal(w.batch_stats['blocks.10.project.bn.var'],
                                mobile.features[11].block[3][1].running_var.numpy())
  assert {'last_conv.conv.kernel', 'pre_logits.kernel', 'head.kernel'} <= set(w.params)


def test_a_file_of_another_family_names_the_missing_parameter(tmp_path):
  path = str(tmp_path / 'mnv3.safetensors')
  from safetensors.torch import save_file
  save_file({k: v.contiguous() for k, v in _tv('mobilenet_v3_small').state_dict().items()}, path)
  with pytest.raises(UserError, match=r"Parameter '(blocks|head_conv)\.[\w.]+' .*of this model is "
                                      r'not in mnv3\.safetensors'):
    _jit_logits('efficientnet_b0', torch_import.load(path), np.zeros((1, 32, 32, 3), np.float32))


# (a model saved from PyTorch, the config.model.name it fits or None). Sizes that differ only in
# depth (resnet34 / resnet50, efficientnet_b0 / b1) or in the last width (b1 / b2) are told apart;
# a widened ResNet, ViT-B/32 and timm's convnext_atto fit no registered name.
NAMED = {
    'resnet18': (lambda: _reference('resnet18'), 'resnet18'),
    'resnet50': (lambda: _reference('resnet50'), 'resnet50'),
    'tv_resnet34': (lambda: _tv('resnet34'), 'resnet34'),
    'tv_wide_resnet50_2': (lambda: _tv('wide_resnet50_2'), None),
    'tv_vit_b_16': (lambda: _tv('vit_b_16'), 'vit_b16'),
    'tv_vit_b_32': (lambda: _tv('vit_b_32'), None),
    'timm_vit_small': (lambda: _timm('vit_small_patch16_224'), 'vit_s16'),
    'tv_convnext_small': (lambda: _tv('convnext_small'), 'convnext_small'),
    'timm_convnext_atto': (lambda: _timm('convnext_atto'), None),
    'tv_efficientnet_b0': (lambda: _tv('efficientnet_b0'), 'efficientnet_b0'),
    'tv_efficientnet_b1': (lambda: _tv('efficientnet_b1'), 'efficientnet_b1'),
    'tv_efficientnet_b2': (lambda: _tv('efficientnet_b2'), 'efficientnet_b2'),
    'tv_mobilenet_v3_small': (lambda: _tv('mobilenet_v3_small'), 'mobilenet_v3_small'),
    'tv_mobilenet_v3_large': (lambda: _tv('mobilenet_v3_large'), 'mobilenet_v3_large'),
}


@pytest.mark.parametrize('case', sorted(NAMED))
def test_imported_weights_name_the_model_they_fit(case):
  """``meta['model']`` (as in a checkpoint's meta) is the config.model.name to train them with."""
  make, want = NAMED[case]
  w = torch_import.convert(_shapes_of(make))
  assert w.meta.get('model') == want


@pytest.mark.parametrize('name,family,theirs', [
    ('efficientnet_b0', 'an EfficientNet', 'efficientnet_b0 to _b7'),
    ('mobilenetv3_large_100', 'a MobileNetV3', 'mobilenet_v3_small / _large')],
    ids=['efficientnet_b0', 'mobilenetv3_large_100'])
def test_timm_efficientnet_and_mobilenetv3_layouts_are_named_as_not_importable(name, family,
                                                                                theirs):
  with pytest.raises(UserError) as info:
    torch_import.convert(_shapes_of(lambda: _timm(name)), origin=f'{name}.safetensors')
  assert str(info.value) == (
      f"{name}.safetensors holds {family} in timm's layout (conv_stem, blocks.0.0.conv_dw, ...), "
      "which cannot be imported (only torchvision's EfficientNet and MobileNetV3 layouts can); "
      f"use the weights of torchvision's {theirs} instead.")


@pytest.mark.parametrize('name,variant', [
    ('convnext_zepto_rms',
     "a ConvNeXt with RMSNorm (timm convnext_*_rms: 'stem.1.weight' has no bias)"),
    ('convnext_atto_ols',
     "a ConvNeXt with an overlapping stem (timm convnext_*_ols: 'stem.2.weight')"),
    ('convnextv2_atto',
     "ConvNeXt V2 (timm convnextv2_*: GRN layers, e.g. 'stages.0.blocks.0.mlp.grn.bias')"),
], ids=['rms', 'ols', 'v2'])
def test_timm_convnext_variants_are_refused_saying_which_convnexts_import(name, variant):
  """Not 'match config.model to the run that wrote them' (no config.model fits these)."""
  with pytest.raises(UserError) as info:
    torch_import.convert(_shapes_of(lambda: _timm(name)), origin=f'{name}.pt')
  assert str(info.value) == (
      f'{name}.pt holds {variant}, which cannot be imported; use the weights of a LayerNorm '
      "ConvNeXt: torchvision's convnext_tiny, _small, _base, _large or timm's convnext_atto to "
      'convnext_xxlarge (not the _ols, _rms or _hnf variants, nor convnextv2_*).')


def test_a_vits_head_count_is_assumed_with_a_warning_and_config_model_num_heads_sets_it(
    tmp_path, caplog):
  """No tensor's shape holds a ViT's number of heads (nor anything else in timm's state dict): a
  timm ViT of 8 heads imported as vit_ti16 gets its 3 and answers otherwise, silently (as timm's
  16-head vit_base_patch16_gap_224 as vit_b16: 6e-2 relative). The import says the count it
  assumed and how to set another, unless config.model.num_heads is set; with it, timm's logits."""
  import logging
  ref = _randomized(_timm('vit_tiny_patch16_224', img_size=32, embed_dim=96, depth=2,
                          num_heads=8))
  with torch.no_grad():   # sharper attention than at initialisation: each head's split shows
    for block in ref.blocks:
      block.attn.qkv.weight.mul_(10)
  path = str(tmp_path / 'vit8.safetensors')
  from safetensors.torch import save_file
  save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, path)
  x_NCHW = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    want = ref(x_NCHW).numpy()
  with caplog.at_level(logging.WARNING):   # no registered name fits, nor is config.model known
    torch_import.load(path)
  assert ("the import assumes config.model.num_heads, else config.model.name's default (vit_ti16: "
          '3, vit_s16: 6, vit_b16: 12); if it was trained with another count') in caplog.text
  caplog.clear()
  arch = {'name': 'vit_ti16', 'width': 96, 'depth': 2, 'mlp_dim': 384, 'image_size': 32,
          'pool': 'token'}   # (the pooling set: no warning of the pooling assumed)
  with caplog.at_level(logging.WARNING):
    assumed = torch_import.load(path, model=arch)
  assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
      'vit8.safetensors holds a ViT whose number of attention heads is in none of its tensors: '
      "the import assumes 3 (vit_ti16's default, 32 channels per head); if it was trained with "
      "another count (timm's vit_base_patch16_gap_224 has 16), set config.model.num_heads=N, or "
      'the model answers wrongly without an error.']
  x_NHWC = x_NCHW.permute(0, 2, 3, 1).numpy()
  kw = {k: v for k, v in arch.items() if k != 'name'}
  wrong = _jit_logits('vit_ti16', assumed, x_NHWC, **kw)
  assert np.abs(wrong - want).max() / np.abs(want).max() > 0.1
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    weights = torch_import.load(path, model={**arch, 'num_heads': 8})
  assert not caplog.records
  got = _jit_logits('vit_ti16', weights, x_NHWC, num_heads=8, **kw)
  rel = np.abs(got - want).max() / np.abs(want).max()
  print(f'8 heads: max |logit diff| / max |logit| = {rel:.2e}')
  assert np.ptp(want) > 0.1 and rel < 1e-5, rel


def test_a_vits_pooling_with_a_class_token_is_assumed_with_a_warning(caplog):
  """Nothing in a state dict says whether the head read the class token or the mean of the patch
  tokens (timm's global_pool='avg', fc_norm=False, which imports as pool='token' without an error
  and answers wrongly): the import says which pooling it assumed, unless config.model sets
  pool; a ViT without a class token (pool='gap' alone fits it) is not warned of."""
  import logging
  small = dict(img_size=32, embed_dim=32, depth=1, num_heads=2, fc_norm=False)
  avg = _timm('vit_tiny_patch16_224', global_pool='avg', **small)
  state = {k: v.numpy() for k, v in avg.state_dict().items()}
  with caplog.at_level(logging.WARNING):
    torch_import.convert(state, origin='vit_avg.pt')
  assert [r.getMessage() for r in caplog.records if 'pool' in r.getMessage()] == [
      "vit_avg.pt holds a ViT with a class token, and whether its head reads that token or the "
      "mean of the patch tokens (timm's global_pool='avg') is in none of its tensors: the import "
      "assumes the token (config.model.pool='token'); weights trained with the mean import "
      "without an error but answer wrongly (this project's ViT cannot pool so: its pool='gap' is "
      "for a ViT without a class token); set config.model.pool='token' to say that they read the "
      'token.']
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    torch_import.convert(state, origin='vit_avg.pt',
                         model={'name': 'vit_ti16', 'num_heads': 2, 'pool': 'token'})
  assert not caplog.records
  no_token = _timm('vit_tiny_patch16_224', global_pool='avg', class_token=False, **small)
  with caplog.at_level(logging.WARNING):
    torch_import.convert({k: v.numpy() for k, v in no_token.state_dict().items()},
                         origin='vit_gap.pt', model={'name': 'vit_ti16', 'num_heads': 2})
  assert not caplog.records


def test_a_vit_without_a_class_token_is_refused_for_pool_token_saying_to_set_pool_gap(tmp_path):
  """timm's class_token=False, global_pool='avg' ViT has no class token: into a pool='token'
  model (the default) its import says so in one sentence and names --config.model.pool=gap (not
  'match config.model to the run that wrote them'); with pool='gap' it gives timm's logits."""
  from imgcls_jax import transfer
  ref = _randomized(_timm('vit_tiny_patch16_224', img_size=32, embed_dim=32, depth=1, num_heads=2,
                          class_token=False, global_pool='avg', fc_norm=False))
  path = str(tmp_path / 'vit_gap.safetensors')
  from safetensors.torch import save_file
  save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, path)
  arch = dict(width=32, depth=1, num_heads=2, mlp_dim=128, image_size=32)
  weights = torch_import.load(path, model={'name': 'vit_ti16', **arch})
  token_model = lambda rngs: models.get('vit_ti16', num_classes=1000, in_channels=3,  # noqa: E731
                                        rngs=rngs, pool='token', **arch)
  with pytest.raises(UserError) as info:
    transfer.fitted(weights, state_lib.abstract_variables(token_model).params)
  assert str(info.value) == (
      "vit_gap.safetensors holds a ViT without a class token (its head reads the mean of the "
      "patch tokens, as timm's class_token=False, global_pool='avg'), but "
      "config.model.pool='token' reads a class token; set --config.model.pool=gap (the mean of "
      'the tokens, no class token).')
  x_NCHW = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    want = ref(x_NCHW).numpy()
  got = _jit_logits('vit_ti16', weights, x_NCHW.permute(0, 2, 3, 1).numpy(), fit=True,
                    pool='gap', **arch)
  rel = np.abs(got - want).max() / np.abs(want).max()
  assert np.ptp(want) > 0.1 and rel < 1e-5, rel
