"""torchvision / timm-layout weights -> the Flax models: PyTorch's logits within 1e-4 rel.

The reference ResNet v1.5 is defined here with torchvision's module names and defaults (BN eps
1e-5, MaxPool 3/2/1, stride on the 3x3 conv); ViT, ConvNeXt, EfficientNet and MobileNetV3 are
torchvision's and timm's own models (``tests/torch_reference.py`` imports them on a CPU torch).
"""
import numpy as np
import pytest

torch = pytest.importorskip('torch')
from torch import nn  # noqa: E402

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from imgcls_jax import models, torch_import, transfer  # noqa: E402
from imgcls_jax import weights as weights_lib  # noqa: E402
from imgcls_jax import state as state_lib  # noqa: E402
from imgcls_jax.errors import UserError  # noqa: E402
from tests import torch_reference  # noqa: E402


class _Basic(nn.Module):
  expansion = 1

  def __init__(self, inp, width, stride, downsample):
    super().__init__()
    self.conv1 = nn.Conv2d(inp, width, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(width)
    self.relu = nn.ReLU()
    self.downsample = downsample

  def forward(self, x):
    y = self.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class _Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, inp, width, stride, downsample):
    super().__init__()
    self.conv1 = nn.Conv2d(inp, width, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(width)
    self.conv3 = nn.Conv2d(width, width * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(width * 4)
    self.relu = nn.ReLU()
    self.downsample = downsample

  def forward(self, x):
    y = self.relu(self.bn1(self.conv1(x)))
    y = self.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class TorchResNet(nn.Module):
  """torchvision.models.ResNet's structure and state-dict names."""

  def __init__(self, block, layers, num_classes=1000):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.relu = nn.ReLU()
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    inp = 64
    for i, n in enumerate(layers):
      width, blocks = 64 * 2**i, []
      for j in range(n):
        stride = 2 if i > 0 and j == 0 else 1
        down = None
        if stride != 1 or inp != width * block.expansion:
          down = nn.Sequential(nn.Conv2d(inp, width * block.expansion, 1, stride, bias=False),
                               nn.BatchNorm2d(width * block.expansion))
        blocks.append(block(inp, width, stride, down))
        inp = width * block.expansion
      setattr(self, f'layer{i + 1}', nn.Sequential(*blocks))
    self.avgpool = nn.AdaptiveAvgPool2d(1)
    self.fc = nn.Linear(inp, num_classes)

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    for i in range(1, 5):
      x = getattr(self, f'layer{i}')(x)
    return self.fc(torch.flatten(self.avgpool(x), 1))


def _reference(name, num_classes=1000, seed=0):
  torch.manual_seed(seed)
  block, layers = {'resnet18': (_Basic, [2, 2, 2, 2]),
                   'resnet50': (_Bottleneck, [3, 4, 6, 3])}[name]
  model = TorchResNet(block, layers, num_classes)
  with torch.no_grad():  # non-trivial BN: random affine parameters and running statistics
    for m in model.modules():
      if isinstance(m, nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.2, 0.2)
        m.running_mean.uniform_(-0.2, 0.2)
        m.running_var.uniform_(0.5, 2.0)
  return model.eval()


def _flax_logits(name, weights, x_NHWC, num_classes=1000):
  model_fn = lambda rngs: models.get(name, num_classes=num_classes, in_channels=3, rngs=rngs)
  model_def = state_lib.model_def(model_fn)
  abstract = nnx.eval_shape(lambda: model_fn(nnx.Rngs(0)))
  params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
  stats = nnx.to_pure_dict(nnx.state(abstract, nnx.BatchStat))
  keep_all = lambda _: False
  params, n = weights_lib.merge(params, weights.params, origin=weights.origin, skip=keep_all)
  stats, _ = weights_lib.merge(stats, weights.batch_stats, origin=weights.origin, skip=keep_all)
  assert n == len(weights.params)
  model = model_def.merge(jax.tree.map(np.asarray, params), stats)
  return np.asarray(model(x_NHWC, train=False))


@pytest.mark.parametrize('name,fmt', [('resnet18', 'pt'), ('resnet50', 'safetensors')])
def test_imported_resnet_matches_pytorch_logits(tmp_path, name, fmt):
  ref = _reference(name)
  path = str(tmp_path / f'{name}.{fmt}')
  if fmt == 'pt':
    torch.save({'state_dict': ref.state_dict()}, path)   # wrapped, as training scripts save it
  else:
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, path)
  x_NCHW = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    want = ref(x_NCHW).numpy()
  got = _flax_logits(name, torch_import.load(path), x_NCHW.permute(0, 2, 3, 1).numpy())
  rel = np.abs(got - want).max() / np.abs(want).max()
  assert got.shape == want.shape == (2, 1000)
  assert rel < 1e-4, rel
  assert (got.argmax(-1) == want.argmax(-1)).all()


def test_layouts_are_converted():
  ref = _reference('resnet18', num_classes=7)
  w = torch_import.convert({k: v.numpy() for k, v in ref.state_dict().items()})
  np.testing.assert_array_equal(w.params['conv1.kernel'],
                                ref.conv1.weight.detach().numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(w.params['fc.kernel'], ref.fc.weight.detach().numpy().T)
  np.testing.assert_array_equal(w.batch_stats['layer2.0.downsample.bn.var'],
                                ref.layer2[0].downsample[1].running_var.numpy())
  assert w.params['layer2.0.downsample.conv.kernel'].shape == (1, 1, 64, 128)
  assert not any('num_batches_tracked' in k for k in {**w.params, **w.batch_stats})


def test_wrong_architecture_names_the_parameter(tmp_path):
  path = str(tmp_path / 'r18.pt')
  torch.save(_reference('resnet18').state_dict(), path)
  with pytest.raises(UserError, match=r"'layer1\.0\.bn3\.bias'.* not in r18\.pt"):
    _flax_logits('resnet50', torch_import.load(path), np.zeros((1, 32, 32, 3), np.float32))


def test_class_count_mismatch_names_the_head_parameter(tmp_path):
  path = str(tmp_path / 'r18.pt')
  torch.save(_reference('resnet18', num_classes=1000).state_dict(), path)
  with pytest.raises(UserError, match=r"'fc\.bias' has shape \(1000,\) .* but \(10,\)"):
    _flax_logits('resnet18', torch_import.load(path), np.zeros((1, 32, 32, 3), np.float32),
                 num_classes=10)


def test_unknown_layout_and_bad_files_are_user_errors(tmp_path):
  sd = {k: v.numpy() for k, v in _reference('resnet18').state_dict().items()}
  sd['conv1.0.weight'] = sd.pop('conv1.weight')  # timm's deep-stem "resnet18d" layout
  with pytest.raises(UserError, match=r"'conv1\.0\.weight'.*not part of a torchvision/timm ResNet"):
    torch_import.convert(sd)
  junk = tmp_path / 'junk.safetensors'
  junk.write_bytes(b'not a safetensors file at all')
  with pytest.raises(UserError, match='corrupt or not a safetensors file'):
    torch_import.load(str(junk))
  module = tmp_path / 'module.pt'
  torch.save([1, 2, 3], str(module))
  with pytest.raises(UserError, match='not a state dict'):
    torch_import.load(str(module))
  with pytest.raises(UserError, match='does not exist'):
    torch_import.load(str(tmp_path / 'missing.pt'))
  with pytest.raises(UserError, match=r"Cannot tell which model family x\.pt holds.*; only state "
                                      r"dicts of torchvision's or timm's ResNet, ViT and ConvNeXt, "
                                      r"and torchvision's EfficientNet and MobileNetV3 can be "
                                      r"imported\.$"):
    torch_import.convert({'encoder.weight': np.zeros((3, 3), np.float32)}, origin='x.pt')


_UNPICKLED = []


class _TinyNet(nn.Module):
  """A model saved whole (``torch.save(model)``); unpickling it would append to ``_UNPICKLED``."""

  def __init__(self):
    super().__init__()
    self.fc = nn.Linear(2, 3)

  def forward(self, x):
    return self.fc(x)

  def __setstate__(self, state):
    _UNPICKLED.append(True)
    super().__setstate__(state)


def _message(path):
  """The UserError text of ``torch_import.load(path)``: one line, no terminal escape codes."""
  with pytest.raises(UserError) as info:
    torch_import.load(str(path))
  text = str(info.value)
  assert '\n' not in text and '\x1b' not in text and 'weights_only' not in text, text
  return text


@pytest.mark.parametrize('how', ['zip', 'legacy', 'protocol4', 'wrapped'])
def test_a_pickled_model_object_is_named_and_never_unpickled(tmp_path, how):
  path = tmp_path / 'whole.pt'
  model = _TinyNet()
  kw = {'legacy': {'_use_new_zipfile_serialization': False},
        'protocol4': {'pickle_protocol': 4}}.get(how, {})
  torch.save({'model': model} if how == 'wrapped' else model, str(path), **kw)
  _UNPICKLED.clear()
  text = _message(path)
  assert text == (f'{path} holds a pickled model object (tests.test_torch_import._TinyNet), not a '
                  'state dict; save it with torch.save(model.state_dict(), path) (pickled objects '
                  'are not loaded: that could run arbitrary code).')
  assert not _UNPICKLED


@pytest.mark.filterwarnings('ignore::DeprecationWarning')  # torch.jit.script / save
def test_other_pickled_objects_and_torchscript_are_named(tmp_path):
  import argparse
  path = tmp_path / 'ckpt.pt'
  torch.save({'state_dict': _TinyNet().state_dict(), 'args': argparse.Namespace(lr=0.1)},
             str(path))
  assert _message(path).startswith(f'{path} holds pickled Python objects besides tensors '
                                   '(argparse.Namespace), which are not loaded')
  path = tmp_path / 'scripted.pt'
  torch.jit.save(torch.jit.script(_TinyNet()), str(path))
  assert _message(path) == (f'{path} is a TorchScript archive (torch.jit.save), not a state '
                            'dict; save the weights with torch.save(model.state_dict(), path).')


def test_a_file_that_is_not_a_torch_file_or_is_cut_short(tmp_path):
  import os
  import zipfile
  junk = tmp_path / 'junk.pt'
  junk.write_bytes(os.urandom(4096))
  assert _message(junk) == (f'{junk} is not a PyTorch state dict file (damaged, or another '
                            'format); give a file saved with torch.save(model.state_dict(), '
                            'path), or a .safetensors file.')
  empty = tmp_path / 'empty.pt'
  empty.write_bytes(b'')
  assert _message(empty).startswith(f'{empty} is not a PyTorch state dict file (the file is '
                                    'empty)')
  npz = tmp_path / 'arrays.pt'    # a zip archive, but numpy's
  with open(npz, 'wb') as f:
    np.savez(f, w=np.zeros(3))
  assert 'is not a PyTorch state dict file' in _message(npz)
  state_dict = _reference('resnet18', num_classes=7).state_dict()
  for legacy in (False, True):
    whole = tmp_path / 'whole.pt'
    torch.save(state_dict, str(whole), _use_new_zipfile_serialization=not legacy)
    data = whole.read_bytes()
    cut = tmp_path / f'cut{int(legacy)}.pt'
    cut.write_bytes(data[:200] if legacy else data[:len(data) // 2])  # legacy: inside the pickle
    where = 'pickle data is cut short' if legacy else 'zip archive is truncated'
    assert _message(cut) == (f'{cut} is a damaged PyTorch file (its {where} or corrupt); copy it '
                             'again, or save it again with torch.save(model.state_dict(), path).')
  # An intact archive that torch still cannot read (a tensor's bytes are missing): torch's reason.
  torch.save(state_dict, str(whole))
  holed = tmp_path / 'holed.pt'
  with zipfile.ZipFile(whole) as src, zipfile.ZipFile(holed, 'w') as dst:
    for name in src.namelist():
      if not name.endswith('/data/0'):
        dst.writestr(name, src.read(name))
  assert _message(holed).startswith(f'Cannot load {holed} as a PyTorch state dict (RuntimeError: ')
  # An archive whose entries claim encryption: the look inside fails too, still one line.
  data = bytearray(whole.read_bytes())
  at = data.find(b'PK\x01\x02')
  while at >= 0:                                   # each central-directory entry's flag bit 0
    data[at + 8] |= 1
    at = data.find(b'PK\x01\x02', at + 4)
  locked = tmp_path / 'locked.pt'
  locked.write_bytes(bytes(data))
  assert _message(locked).startswith(f'Cannot load {locked} as a PyTorch state dict (')


@pytest.mark.parametrize('placement', ['replicated', 'fsdp'])
def test_init_state_from_a_torch_file_keeps_backbone_and_makes_a_new_head(tmp_path, placement):
  """The training path (transfer.init_state): 1000-class torch weights -> a 10-class model."""
  import functools

  import ml_collections
  import optax
  from safetensors.torch import save_file

  from imgcls_jax import optim, sharding
  from configs import default
  ref = _reference('resnet18')
  path = str(tmp_path / 'resnet18.safetensors')
  save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, path)
  cfg = default.get_config()
  cfg.transfer.init_from = path
  cfg.model = ml_collections.ConfigDict({'name': 'resnet18'})
  model_fn = functools.partial(models.get, 'resnet18', num_classes=10, in_channels=3)
  tx = optim.build(cfg.optim, optax.constant_schedule(0.1), cfg.transfer)
  mesh = sharding.make_mesh(0)
  param_sharding = sharding.ParamSharding.from_config(
      ml_collections.ConfigDict({'param_sharding': placement, 'fsdp_min_size': 1024}))
  fresh, shardings = state_lib.create(model_fn, tx, 0, mesh, param_sharding)
  fresh_head = np.asarray(fresh.params['fc']['kernel'])
  state = transfer.init_state(fresh, shardings, cfg, tx)
  sd = {k: v.numpy() for k, v in ref.state_dict().items()}
  np.testing.assert_array_equal(np.asarray(state.params['layer3'][1]['conv2']['kernel']),
                                sd['layer3.1.conv2.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(np.asarray(state.batch_stats['bn1']['var']), sd['bn1.running_var'])
  np.testing.assert_array_equal(np.asarray(state.params['fc']['kernel']), fresh_head)  # new head
  assert state.params['fc']['kernel'].shape == (512, 10)
  # Every array keeps the placement the trainer gave it (FSDP-split or replicated).
  split = not state.params['layer4'][1]['conv2']['kernel'].sharding.is_fully_replicated
  assert split == (placement == 'fsdp')
  jax.tree.map(lambda a, s: a.sharding.is_equivalent_to(s, a.ndim) or pytest.fail(str(s)),
               state.params, shardings.params)
  jax.tree.map(lambda a, s: a.sharding.is_equivalent_to(s, a.ndim) or pytest.fail(str(s)),
               state.opt_state, shardings.opt_state)
  if placement == 'replicated':   # a model of another depth: the error names the file's model
    model_fn = functools.partial(models.get, 'resnet34', num_classes=10, in_channels=3)
    other, shardings = state_lib.create(model_fn, tx, 0, mesh, param_sharding)
    with pytest.raises(UserError, match=r"not in .*resnet18\.safetensors; the weights are from "
                                        r"another architecture: set config\.model\.name="
                                        r"'resnet18' \(the architecture of "):
      cfg.model = ml_collections.ConfigDict({'name': 'resnet34'})
      transfer.init_state(other, shardings, cfg, tx)


# ---- ViT, ConvNeXt, EfficientNet, MobileNetV3 from torchvision's and timm's own models ----

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


# (our name, our extra model keys, the PyTorch model, file format). Real architectures at 32 px
# (ViT-B/16 at image_size 32: a 2x2 patch grid); timm's convnext_atto is ConvNeXt at depths
# (2, 2, 6, 2), widths (40, 80, 160, 320).
IMPORTS = {
    'torchvision_vit_b16': ('vit_b16', dict(image_size=32),
                            lambda: _tv('vit_b_16', image_size=32), 'safetensors'),
    'timm_vit_ti16': ('vit_ti16', dict(image_size=32),
                      lambda: _timm('vit_tiny_patch16_224', img_size=32), 'pt'),
    'torchvision_convnext_tiny': ('convnext_tiny', {}, lambda: _tv('convnext_tiny'), 'pt'),
    'timm_convnext_atto': ('convnext_tiny', dict(depths=(2, 2, 6, 2), widths=(40, 80, 160, 320)),
                           lambda: _timm('convnext_atto'), 'safetensors'),
    'torchvision_efficientnet_b0': ('efficientnet_b0', {}, lambda: _tv('efficientnet_b0'),
                                    'safetensors'),
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
  vit = _tv('vit_b_16', image_size=32)
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
  w = torch_import.convert({k: v.numpy() for k, v in make().state_dict().items()})
  assert w.meta.get('model') == want


# ---- weights from another resolution; timm layouts and variants that are not imported ----

@pytest.mark.parametrize('old,new', [(14, 7), (7, 12), (3, 5), (4, 2), (24, 14), (2, 6), (5, 5)])
def test_position_resampling_is_torchs_antialiased_bicubic(old, new):
  """timm's resample_abs_pos_embed defaults: F.interpolate(bicubic, antialias=True)."""
  from imgcls_jax.torch_import import vit
  grid = torch.randn(1, 8, old, old, generator=torch.Generator().manual_seed(old * 31 + new),
                     dtype=torch.float64)
  want = torch.nn.functional.interpolate(grid, size=(new, new), mode='bicubic', antialias=True,
                                         align_corners=False)[0].numpy()
  m = vit.resample_matrix(old, new)
  np.testing.assert_allclose(np.einsum('ih,chw,jw->cij', m, grid[0].numpy(), m), want,
                             rtol=0, atol=1e-12)


@pytest.mark.parametrize('new_size', [32, 96])  # from 64 px (a 4x4 grid): to 2x2 and to 6x6
def test_vit_weights_from_another_image_size_match_timm_there(tmp_path, caplog, new_size):
  """Fine-tuning at another resolution: our ViT at ``new_size`` with the imported weights answers
  as timm's ViT created at that size with the same weights loaded through timm's own resampling
  (``resample_abs_pos_embed``, the function its pretrained-weight loading uses)."""
  import logging
  src = _randomized(_timm('vit_tiny_patch16_224', img_size=64))
  path = str(tmp_path / 'vit64.pt')
  torch.save(src.state_dict(), path)
  ref = _timm('vit_tiny_patch16_224', img_size=new_size).eval()
  sd = dict(src.state_dict())
  resample_abs_pos_embed = torch_reference.timm().layers.resample_abs_pos_embed
  sd['pos_embed'] = resample_abs_pos_embed(sd['pos_embed'], new_size=ref.patch_embed.grid_size,
                                           num_prefix_tokens=1)
  ref.load_state_dict(sd)
  x_NCHW = torch.randn(2, 3, new_size, new_size, generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    want = ref(x_NCHW).numpy()
  weights = torch_import.load(path)
  with caplog.at_level(logging.INFO):
    got = _jit_logits('vit_ti16', weights, x_NCHW.permute(0, 2, 3, 1).numpy(), fit=True,
                      image_size=new_size)
  rel = np.abs(got - want).max() / np.abs(want).max()
  print(f'64 -> {new_size} px: max |logit diff| / max |logit| = {rel:.2e}')
  assert np.ptp(want) > 0.1 and rel < 1e-5, rel
  grid = new_size // 16
  assert (f'Resampled the position embeddings of vit64.pt from a 4x4 to a {grid}x{grid} patch grid '
          f'(image size 64 -> {new_size} at patch 16;') in caplog.text
  with pytest.raises(UserError, match=r"'pos_embedding' has shape \(1, 17, 192\) in vit64\.pt but "
                                      rf'\(1, {grid * grid + 1}, 192\) in this model'):
    _jit_logits('vit_ti16', weights, x_NCHW.permute(0, 2, 3, 1).numpy(), image_size=new_size)


def test_transfer_from_a_vit_file_of_another_image_size_resamples_its_positions(tmp_path):
  """The training path (transfer.init_state, config.transfer.init_from): a timm ViT file trained
  at 64 px into a 32 px vit_ti16 gets the resampled position embeddings (it was refused)."""
  import functools
  import ml_collections
  import optax
  from configs import default
  from imgcls_jax import optim, sharding
  src = _randomized(_timm('vit_tiny_patch16_224', img_size=64))
  path = str(tmp_path / 'vit64.pt')
  torch.save(src.state_dict(), path)
  cfg = default.get_config()
  cfg.transfer.init_from = path
  cfg.model = ml_collections.ConfigDict({'name': 'vit_ti16', 'image_size': 32})
  model_fn = functools.partial(models.get, 'vit_ti16', num_classes=10, in_channels=3,
                               image_size=32)
  tx = optim.build(cfg.optim, optax.constant_schedule(0.1), cfg.transfer)
  fresh, shardings = state_lib.create(model_fn, tx, 0, sharding.make_mesh(0),
                                      sharding.ParamSharding())
  state = transfer.init_state(fresh, shardings, cfg, tx)
  want = torch_reference.timm().layers.resample_abs_pos_embed(
      src.state_dict()['pos_embed'], new_size=(2, 2), num_prefix_tokens=1).numpy()
  flat = {'/'.join(str(getattr(p, 'key', p)) for p in path_): np.asarray(v)
          for path_, v in jax.tree_util.tree_leaves_with_path(state.params)}
  (got,) = [v for k, v in flat.items() if 'pos_embedding' in k]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_fit_to_leaves_weights_that_already_fit_alone():
  vit = torch_import.convert({k: v.numpy() for k, v in _tv('vit_b_16', image_size=32)
                              .state_dict().items()})
  shapes = state_lib.abstract_variables(
      lambda rngs: models.get('vit_b16', num_classes=1000, in_channels=3, rngs=rngs,
                              image_size=32)).params
  assert torch_import.fit_to(vit, shapes) is vit
  resnet = torch_import.convert({k: v.numpy() for k, v in _reference('resnet18').state_dict()
                                 .items()})
  assert torch_import.fit_to(resnet, shapes) is resnet


@pytest.mark.parametrize('name,family,theirs', [
    ('efficientnet_b0', 'an EfficientNet', 'efficientnet_b0 to _b7'),
    ('mobilenetv3_large_100', 'a MobileNetV3', 'mobilenet_v3_small / _large')],
    ids=['efficientnet_b0', 'mobilenetv3_large_100'])
def test_timm_efficientnet_and_mobilenetv3_layouts_are_named_as_not_importable(name, family,
                                                                                theirs):
  with pytest.raises(UserError) as info:
    torch_import.convert({k: v.numpy() for k, v in _timm(name).state_dict().items()},
                         origin=f'{name}.safetensors')
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
    torch_import.convert({k: v.numpy() for k, v in _timm(name).state_dict().items()},
                         origin=f'{name}.pt')
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
