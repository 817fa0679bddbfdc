"""Fashion-MNIST speed run (issue 18): 93% on the 10k test split in 170 s on 2 CPU cores, start-up included.

``fashion_mnist_quick`` (fast_cnn 16-64-128, batch 32, SGD + Nesterov, linear decay, 7 epochs,
2 CPU devices) plus the parts that earned their place in the ablation (benchmarks/NOTES.md,
"Fashion-MNIST speed features, measured"):

- a frozen patch-whitening first convolution (``init.patch_whitening``, ``init.freeze_whitening``:
  the 3x3 conv's 16 filters are the top 8 whitening directions of 5000 training images and their
  negatives): +0.7 points at the end;
- derandomized flips on the device (``data.device_preprocess='flip_alternate'``: each image
  mirrored in alternate epochs): +0.2;
- 2x the learning rate for the BatchNorm parameters (``optim.norm_lr_factor``): +0.1;
- weight EMA 0.999, evaluated (``ema.decay``): 93% one epoch earlier;
- evaluations every epoch with flip test-time augmentation (the time to 93% is read there) and the
  persistent compilation cache (``compilation_cache_dir``: a rerun skips most compiling).
Measured and left out: Lookahead (-0.1 at the end), label smoothing 0.2 (0.1 ended 0.2 higher),
flip + translate test-time augmentation (2 points lower early: training has no shifts and the
flattened head is position-wise), 25 steps per dispatch (~10x slower on XLA:CPU, see
imgcls_jax/dispatch.py).

Prepare the data once:
  python -m imgcls_jax.data.prepare_fashion_mnist
Command (and timed, start-up included):
  python -m imgcls_jax.main --config=configs/fashion_mnist_speedrun.py --workdir=/tmp/fmnist_sr
  python benchmarks/time_to_accuracy.py --target=0.93 -- \
      --config=configs/fashion_mnist_speedrun.py --workdir=/tmp/fmnist_sr_timed
Expected: 93.58% top-1 on the 10k test split (seed 0) at the end of epoch 7; 93% first reached
after 169.7 s wall at epoch 5 (epochs 1-7: 91.18, 92.29, 92.61, 92.92, 93.29, 93.44, 93.58%),
236.6 s the whole run. Measured 2026-12-02 on the project's 2-core AMD EPYC VM (AVX-512), nothing
else running. The PyTorch peer script (../shared/peers/torch_fmnist.py, seed 0) reached 93% after
263.2 s on the same machine an hour earlier: 0.64x its time, short of the issue's 0.5x target;
one seed only (seeds 1 and 2 not run yet). A 4-epoch schedule ended at 93.18% (168 s, at a
slower moment of the VM: the next candidate).
"""
import ml_collections

from configs import fashion_mnist_quick


def get_config() -> ml_collections.ConfigDict:
  c = fashion_mnist_quick.get_config()
  c.data.device_preprocess = 'flip_alternate'   # needs the deterministic host pipeline below
  c.data.train_preprocess = ''

  c.init.patch_whitening = True
  c.init.freeze_whitening = True
  c.init.whitening_examples = 5000
  c.init.whitening_negatives = True

  c.label_smoothing = 0.1                 # 0.2 (airbench) ended 0.18 points lower here
  c.optim.norm_lr_factor = 2.0
  c.ema.decay = 0.999                     # evaluations use the EMA weights (ema.inference)

  c.eval_every_epochs = 1.0
  c.evaluate.tta = 'flip'                 # flip_translate cost 2 points early, 0.2 at the end here:
                                          # training has no shifts and the head is position-wise
  c.eval_subset = 0                       # complete evaluations: the 93% is read from them
  c.steps_per_dispatch = 1                # > 1 runs ~10x slower on XLA:CPU (imgcls_jax/dispatch.py)
  c.compilation_cache_dir = 'default'     # ~/.cache/imgcls_jax/jax_cache: reruns skip compiling
  return c
