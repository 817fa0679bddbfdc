"""Imported weights fitted to the model they start: the training path (transfer.init_state keeps
the backbone, makes a new head, and gives each array the trainer's placement), and ViT weights
from another image size (position embeddings resampled as timm does: timm's logits there).
"""
import numpy as np
import pytest

torch = pytest.importorskip('torch')

import jax  # noqa: E402

from imgcls_jax import models, torch_import, transfer  # noqa: E402
from imgcls_jax import state as state_lib  # noqa: E402
from imgcls_jax.errors import UserError  # noqa: E402
from tests import torch_reference  # noqa: E402
from tests.test_torch_import import _reference  # noqa: E402
from tests.test_torch_import_families import (  # noqa: E402
    _jit_logits, _randomized, _shapes_of, _timm, _tv)



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
    # Its shapes and placement only (no init to compile): the weights are refused by name first.
    other, shardings = state_lib.abstract_state(model_fn, tx, 0, mesh, param_sharding)
    with pytest.raises(UserError, match=r"not in .*resnet18\.safetensors; the weights are from "
                                        r"another architecture: set config\.model\.name="
                                        r"'resnet18' \(the architecture of "):
      cfg.model = ml_collections.ConfigDict({'name': 'resnet34'})
      transfer.init_state(other, shardings, cfg, tx)


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


# timm's ViT-Ti/16 at 2 of its 12 blocks (ours at depth 2): the positions are resampled before
# the first block; each block more only adds compile time.
DEPTH = 2


@pytest.mark.parametrize('new_size', [32, 96])  # from 64 px (a 4x4 grid): to 2x2 and to 6x6
def test_vit_weights_from_another_image_size_match_timm_there(tmp_path, caplog, new_size):
  """Fine-tuning at another resolution: our ViT at ``new_size`` with the imported weights answers
  as timm's ViT created at that size with the same weights loaded through timm's own resampling
  (``resample_abs_pos_embed``, the function its pretrained-weight loading uses)."""
  import logging
  src = _randomized(_timm('vit_tiny_patch16_224', img_size=64, depth=DEPTH))
  path = str(tmp_path / 'vit64.pt')
  torch.save(src.state_dict(), path)
  ref = _timm('vit_tiny_patch16_224', img_size=new_size, depth=DEPTH).eval()
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
                      image_size=new_size, depth=DEPTH)
  rel = np.abs(got - want).max() / np.abs(want).max()
  print(f'64 -> {new_size} px: max |logit diff| / max |logit| = {rel:.2e}')
  assert np.ptp(want) > 0.1 and rel < 1e-5, rel
  grid = new_size // 16
  assert (f'Resampled the position embeddings of vit64.pt from a 4x4 to a {grid}x{grid} patch grid '
          f'(image size 64 -> {new_size} at patch 16;') in caplog.text
  with pytest.raises(UserError, match=r"'pos_embedding' has shape \(1, 17, 192\) in vit64\.pt but "
                                      rf'\(1, {grid * grid + 1}, 192\) in this model'):
    _jit_logits('vit_ti16', weights, x_NCHW.permute(0, 2, 3, 1).numpy(), image_size=new_size,
                depth=DEPTH)


def test_transfer_from_a_vit_file_of_another_image_size_resamples_its_positions(tmp_path):
  """The training path (transfer.init_state, config.transfer.init_from): a timm ViT file trained
  at 64 px into a 32 px vit_ti16 gets the resampled position embeddings (it was refused)."""
  import functools
  import ml_collections
  import optax
  from configs import default
  from imgcls_jax import optim, sharding
  src = _randomized(_timm('vit_tiny_patch16_224', img_size=64, depth=DEPTH))
  path = str(tmp_path / 'vit64.pt')
  torch.save(src.state_dict(), path)
  cfg = default.get_config()
  cfg.transfer.init_from = path
  cfg.model = ml_collections.ConfigDict({'name': 'vit_ti16', 'image_size': 32, 'depth': DEPTH})
  model_fn = functools.partial(models.get, 'vit_ti16', num_classes=10, in_channels=3,
                               image_size=32, depth=DEPTH)
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
  # (names and shapes only: torchvision's ViT-B/16 built on the meta device, not initialised)
  vit = torch_import.convert(_shapes_of(lambda: _tv('vit_b_16', image_size=32)))
  shapes = state_lib.abstract_variables(
      lambda rngs: models.get('vit_b16', num_classes=1000, in_channels=3, rngs=rngs,
                              image_size=32)).params
  assert torch_import.fit_to(vit, shapes) is vit
  resnet = torch_import.convert({k: v.numpy() for k, v in _reference('resnet18').state_dict()
                                 .items()})
  assert torch_import.fit_to(resnet, shapes) is resnet
