"""ConvNeXt-T on ImageNet-1k: the paper's 300-epoch recipe (Liu et al. 2022, "A ConvNet for the
2020s", appendix A.1; facebookresearch/ConvNeXt's training command).

The recipe, key by key:
  AdamW, lr 4e-3 at batch 4096       optim.name='adamw', learning_rate=4e-3, lr_batch_reference=4096
                                     (peak lr = 4e-3 x batch_size / 4096 at other batch sizes)
  batch 4096 (8 GPUs x 128 x 4 accumulation steps)   batch_size=4096 (add
                                     --config.grad_accumulation_steps=4 for their memory footprint)
  betas 0.9 / 0.999, eps 1e-8        b1, b2, eps
  weight decay 0.05 (PyTorch AdamW: scaled by the lr, as optax.adamw), none on biases and norm /
  layer-scale parameters             weight_decay=0.05 (kernels only: ndim >= 2)
  300 epochs, 20 warmup epochs, cosine to 1e-6   num_epochs=300, warmup_epochs=20,
                                     schedule='cosine', end_lr_factor=1e-6 / 4e-3
  random-resized-crop 224 (8-100%), flip, bicubic   random_resized_crop(size=224,
                                     method='bicubic')|flip_lr
  RandAugment rand-m9-mstd0.5-inc1   randaugment(num_ops=2, magnitude=9, num_bins=11) (timm's
                                     magnitude scale is 0..10)
  random erasing 0.25 (per-pixel noise)   random_erasing(prob=0.25)
  mixup 0.8, cutmix 1.0, switch 0.5, per batch   mixup.mixup_alpha=0.8, cutmix_alpha=1.0,
                                     switch_prob=0.5, prob=1.0, mode='batch'
  label smoothing 0.1                label_smoothing=0.1 (smoothed, then mixed, as timm)
  stochastic depth 0.1, layer scale 1e-6   model.drop_path_rate=0.1, layer_scale=1e-6
  EMA 0.9999                         ema.decay=0.9999 (timm's ModelEma has no warmup: ema.warmup=
                                     False); evaluations use the EMA weights (ema.inference)
  eval resize 256 / center crop 224, bicubic   center_crop(size=224, crop_fraction=0.875,
                                     method='bicubic')
Not the same here: timm's RandAugment applies each of its 2 ops with probability 0.5, draws the
magnitude around 9 with std 0.5 (mstd0.5), uses the "increasing" op variants plus invert and
solarize_add and fills with the ImageNet mean; this one always applies both ops at exactly 9/10
over torchvision's op set (fill 128). Random erasing fills with uniform noise before
normalisation (timm: normal noise after it). Compute is bfloat16 with float32 parameters (the
paper trained in float32).

ImageNet cannot be downloaded automatically: put the manually downloaded ILSVRC2012 tars in a
directory and pass it as manual_dir (tfds prepares it once):
  python -m imgcls_jax.main --config=configs/imagenet_convnext_t.py --workdir=/tmp/convnext_t \
      --config.data.manual_dir=/path/to/imagenet_tars --config.data.data_dir=/path/to/tfds
Not measured: needs accelerators (300 epochs of a 4.5 GFLOP model: days on an 8-GPU node).
Expected: ~82.1% top-1 on the 50k validation images after 300 epochs (the paper's ConvNeXt-T at
224 px).
"""
import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  c = default.get_config()
  c.data.name = 'imagenet2012'
  c.data.train_split = 'train'
  c.data.eval_split = 'validation'
  c.data.train_preprocess = ('random_resized_crop(size=224, method="bicubic")|flip_lr|'
                             'randaugment(num_ops=2, magnitude=9, num_bins=11)|'
                             'random_erasing(prob=0.25)')
  c.data.device_preprocess = ''          # the default's one-pixel shift is for digits
  c.data.eval_preprocess = 'center_crop(size=224, crop_fraction=0.875, method="bicubic")'
  c.data.mean = (0.485, 0.456, 0.406)
  c.data.std = (0.229, 0.224, 0.225)
  c.data.cache = False
  c.data.shuffle_buffer = 16_384

  c.model = ml_collections.ConfigDict()
  c.model.name = 'convnext_tiny'          # depths (3, 3, 9, 3), widths (96, 192, 384, 768)
  c.model.stem_patch = 4
  c.model.drop_path_rate = 0.1
  c.model.layer_scale = 1e-6
  c.dtype = 'bfloat16'

  c.batch_size = 4096
  c.eval_batch_size = 1024
  c.num_epochs = 300.0
  c.label_smoothing = 0.1
  c.mixup.mixup_alpha = 0.8
  c.mixup.cutmix_alpha = 1.0
  c.mixup.prob = 1.0
  c.mixup.switch_prob = 0.5
  c.mixup.mode = 'batch'

  c.optim.name = 'adamw'
  c.optim.learning_rate = 4e-3
  c.optim.lr_batch_reference = 4096
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.05
  c.optim.schedule = 'cosine'
  c.optim.warmup_epochs = 20.0
  c.optim.end_lr_factor = 1e-6 / 4e-3     # their min_lr 1e-6
  c.optim.grad_clip_norm = 0.0            # none in the recipe

  c.ema.decay = 0.9999
  c.ema.warmup = False
  c.ema.inference = True

  c.log_every_steps = 100
  c.eval_every_epochs = 5.0
  c.checkpoint_every_epochs = 1.0
  return c
