"""torchvision / timm-layout ResNet weights -> the Flax ResNet: PyTorch's logits within 1e-4 rel.

torchvision cannot be installed beside the pinned torch, so the reference ResNet v1.5 is defined
here with torchvision's module names and defaults (BN eps 1e-5, MaxPool 3/2/1, stride on the 3x3
conv).
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
  model_fn = functools.partial(models.get, 'resnet18', num_classes=10, in_channels=3)
  tx = optim.build(cfg.optim, optax.constant_schedule(0.1), cfg.transfer)
  mesh = sharding.make_mesh(0)
  param_sharding = sharding.ParamSharding.from_config(
      ml_collections.ConfigDict({'param_sharding': placement, 'fsdp_min_size': 1024}))
  fresh, shardings = state_lib.create(model_fn, tx, 0, mesh, param_sharding)
  fresh_head = np.asarray(fresh.params['fc']['kernel'])
  state = transfer.init_state(fresh, shardings, cfg.transfer, tx)
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
