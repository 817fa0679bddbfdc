"""ViT-S/16 on ImageNet-1k: big_vision's 90-epoch "Better plain ViT baselines" recipe.

big_vision's ``configs/vit_s16_i1k.py`` (Beyer, Zhai, Kolesnikov 2022, arXiv:2205.01580), key by key:
  batch 1024, 90 epochs              batch_size=1024, num_epochs=90
  train split 'train[:99%]'          data.train_split (the last 1% is their minival; not used here)
  decode_jpeg_and_inception_crop(224) random_resized_crop(size=224, area_min=0.05): their
                                     inception crop keeps 5-100% of the area (torchvision: 8%)
  flip_lr                            flip_lr
  randaug(2, 10)                     randaugment(num_ops=2, magnitude=10, num_bins=11): their
                                     magnitude scale is 0..10, so 10 is the strongest setting
                                     (the same as torchvision's 30 of 0..30); fill 128 as theirs
  value_range(-1, 1)                 data.mean = data.std = 0.5
  eval resize_small(256)|central_crop(224)   center_crop(size=224, crop_fraction=0.875)
  mixup p=0.2 (one Beta(0.2, 0.2) weight per batch)   mixup.mixup_alpha=0.2, mixup.mode='batch'
  softmax_xent, no label smoothing   label_smoothing=0.0
  ViT 'S/16', pool_type='gap'        model.name='vit_s16' (384 wide, 12 blocks, 6 heads, MLP 1536),
                                     pool='gap' (no class token), patch 16, image_size 224; the
                                     classifier starts at zero as theirs (head_zeroinit)
  scale_by_adam (b1 0.9, b2 0.999)   optim.name='adamw', b1=0.9, b2=0.999, eps=1e-8
  lr 0.001, warmup_steps 10_000, cosine to 0   learning_rate=1e-3, warmup_steps=10000,
                                     schedule='cosine', end_lr_factor=0.0
  wd 0.0001 (decoupled)              optim.weight_decay=0.1. big_vision adds wd * w to the update
                                     scaled by the schedule's multiplier only (peak 1), not by the
                                     learning rate: w -= s_t * (lr * adam + wd * w). optax.adamw
                                     (this codebase) does w -= lr_t * (adam + weight_decay * w)
                                     with lr_t = lr * s_t, so the same decay is 1e-4 / 1e-3 = 0.1.
  grad_clip_norm 1.0                 optim.grad_clip_norm=1.0
Not supported here, so this is the recipe minus these (each should cost little, ~0.1-0.5 points):
  * posemb='sincos2d': this ViT has a learned position embedding (normal, std 0.02), and it gets
    weight decay (the decay mask is every parameter with ndim >= 2; big_vision decays '.*/kernel$').
  * rep_size=True: big_vision's pre-logits layer (dense 384 + tanh before the head) is absent.
  * mu_dtype='bfloat16' (Adam's first moment in bf16): moments stay float32 (memory only).
  * RandAugment ops: this codebase has torchvision's set (identity, auto_contrast, equalize, rotate,
    solarize, color, posterize, contrast, brightness, sharpness, shear/translate x/y); big_vision's
    (the EfficientNet TF set) also has invert, cutout and solarize_add and no identity; at full
    magnitude solarize inverts every pixel here (torchvision's scale) but none in theirs.
  * mixup partners: the batch reversed here, rolled by one in big_vision (same distribution).
Compute in bfloat16 with float32 parameters (big_vision runs float32 parameters on TPUs, whose
matmuls take bf16 inputs by default).

ImageNet cannot be downloaded automatically: put the manually downloaded ILSVRC2012 tars in a
directory and pass it as manual_dir (tfds prepares it once):
  python -m imgcls_jax.main --config=configs/imagenet_vit_s16.py --workdir=/tmp/vit_s16 \
      --config.data.manual_dir=/path/to/imagenet_tars --config.data.data_dir=/path/to/tfds
Not measured: needs accelerators (big_vision: 6-7 h on a TPU v3-8).
Expected: ~76.5% top-1 on the 50k validation images after 90 epochs (the paper's 90-epoch figure;
78.5% at 150 and 80.0% at 300 epochs with --config.num_epochs), a little lower without the
sincos position embedding and pre-logits layer listed above.
"""
import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  c = default.get_config()
  c.data.name = 'imagenet2012'
  c.data.train_split = 'train[:99%]'
  c.data.eval_split = 'validation'
  c.data.train_preprocess = ('random_resized_crop(size=224, area_min=0.05)|flip_lr|'
                             'randaugment(num_ops=2, magnitude=10, num_bins=11)')
  c.data.device_preprocess = ''          # the default's one-pixel shift is for digits
  c.data.eval_preprocess = 'center_crop(size=224, crop_fraction=0.875)'
  c.data.mean = (0.5, 0.5, 0.5)           # big_vision's value_range(-1, 1)
  c.data.std = (0.5, 0.5, 0.5)
  c.data.cache = False
  c.data.shuffle_buffer = 250_000         # big_vision's shuffle_buffer_size

  c.model = ml_collections.ConfigDict()
  c.model.name = 'vit_s16'
  c.model.image_size = 224
  c.model.patch_size = 16
  c.model.pool = 'gap'
  c.model.dropout = 0.0
  c.model.drop_path_rate = 0.0
  c.dtype = 'bfloat16'

  c.batch_size = 1024
  c.eval_batch_size = 1024
  c.num_epochs = 90.0
  c.label_smoothing = 0.0
  c.mixup.mixup_alpha = 0.2
  c.mixup.cutmix_alpha = 0.0
  c.mixup.prob = 1.0
  c.mixup.mode = 'batch'

  c.optim.name = 'adamw'
  c.optim.learning_rate = 1e-3
  c.optim.lr_batch_reference = 0          # 1e-3 is the rate at batch 1024 (not scaled)
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.1              # = big_vision's wd 1e-4 at lr 1e-3 (see the docstring)
  c.optim.schedule = 'cosine'
  c.optim.warmup_steps = 10_000
  c.optim.end_lr_factor = 0.0
  c.optim.grad_clip_norm = 1.0

  c.log_every_steps = 50
  c.eval_every_epochs = 1.0
  c.checkpoint_every_epochs = 1.0
  return c
