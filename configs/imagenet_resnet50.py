"""ResNet-50 v1.5 on ImageNet-1k: the standard 90-epoch recipe.

Batch 1024, SGD with Nesterov momentum 0.9, peak lr 0.1 x batch/256 with 5 linear warmup epochs then
cosine decay, weight decay 1e-4 on kernels, label smoothing 0.1, bf16 compute with f32 parameters,
random-resized-crop 224 + flip for training, resize 256 / center-crop 224 for evaluation.

ImageNet cannot be downloaded automatically: put the manually downloaded ILSVRC2012 tars in a
directory and pass it as manual_dir (tfds prepares it once):
  python -m imgcls_jax.main --config=configs/imagenet_resnet50.py --workdir=/tmp/rn50 \
      --config.data.manual_dir=/path/to/imagenet_tars --config.data.data_dir=/path/to/tfds
Expected: ~76-77% top-1 on the 50k validation images after 90 epochs (the published v1.5 range),
on an accelerator slice (e.g. 8 GPUs / a TPU v4-8; about a day).
"""
import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  c = default.get_config()
  c.data.name = 'imagenet2012'
  c.data.train_split = 'train'
  c.data.eval_split = 'validation'
  c.data.train_preprocess = 'random_resized_crop(size=224)|flip_lr'
  c.data.device_preprocess = ''          # the default's one-pixel shift is for digits
  c.data.eval_preprocess = 'center_crop(size=224, crop_fraction=0.875)'
  c.data.mean = (0.485, 0.456, 0.406)
  c.data.std = (0.229, 0.224, 0.225)
  c.data.cache = False
  c.data.shuffle_buffer = 16_384

  c.model = ml_collections.ConfigDict()
  c.model.name = 'resnet50'
  c.model.small_inputs = False
  c.dtype = 'bfloat16'

  c.batch_size = 1024
  c.eval_batch_size = 1024
  c.num_epochs = 90.0
  c.label_smoothing = 0.1
  c.optim.name = 'sgd'
  c.optim.learning_rate = 0.1
  c.optim.lr_batch_reference = 256
  c.optim.momentum = 0.9
  c.optim.nesterov = True
  c.optim.weight_decay = 1e-4
  c.optim.warmup_epochs = 5.0
  c.optim.schedule = 'cosine'

  c.log_every_steps = 100
  c.eval_every_epochs = 1.0
  c.checkpoint_every_epochs = 1.0
  return c
