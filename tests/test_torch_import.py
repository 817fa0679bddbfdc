"""torchvision / timm-layout ResNet weights -> the Flax ResNet: PyTorch's logits within 1e-4 rel,
the layouts converted, and the files refused with a one-line message (a pickled model object,
never unpickled; TorchScript; a damaged or foreign file).

The reference ResNet v1.5 is defined here with torchvision's module names and defaults (BN eps
1e-5, MaxPool 3/2/1, stride on the 3x3 conv). ViT, ConvNeXt, EfficientNet and MobileNetV3 are in
test_torch_import_families.py; weights fitted into a training run in test_torch_import_transfer.py.
"""
import numpy as np
import pytest

torch = pytest.importorskip('torch')
from torch import nn  # noqa: E402

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from imgcls_jax import models, torch_import  # noqa: E402
from imgcls_jax import weights as weights_lib  # noqa: E402
from imgcls_jax import state as state_lib  # noqa: E402
from imgcls_jax.errors import UserError  # noqa: E402



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
  abstract = nnx.eval_shape(lambda: model_fn(nnx.Rngs(0)))
  params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
  stats = nnx.to_pure_dict(nnx.state(abstract, nnx.BatchStat))
  keep_all = lambda _: False
  params, n = weights_lib.merge(params, weights.params, origin=weights.origin, skip=keep_all)
  stats, _ = weights_lib.merge(stats, weights.batch_stats, origin=weights.origin, skip=keep_all)
  assert n == len(weights.params)
  model_def = state_lib.model_def(model_fn)  # (after the merges, which the error tests stop)
  # Jitted, as evaluation runs it (eager, each op of the forward pass compiles on its own).
  fn = jax.jit(lambda p, s, x: model_def.merge(p, s)(x, train=False))
  return np.asarray(fn(params, stats, x_NHWC))


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
