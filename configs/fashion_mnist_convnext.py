"""A small ConvNeXt on Fashion-MNIST sized for 2 CPU cores: 91.1% top-1 in 14.3 minutes, start-up included.

The ConvNeXt family (``convnext_tiny``'s block: 7x7 depthwise conv -> LayerNorm -> 4x MLP -> layer
scale 1e-6) at two stages instead of four: a 4x4/4 patchify stem to 7x7x64, 2 blocks, LayerNorm +
2x2/2 downsampling to 3x3x128, 2 blocks; 385,738 parameters. Trained from scratch with Muon
(lr 0.02, weight decay 0.05 on kernels), batch 128, 0.3 warmup epochs then cosine to 0, label
smoothing 0.1, horizontal flips in the jitted step, flip test-time augmentation at the evaluations
(every epoch), 5 epochs, data-parallel over 2 XLA CPU devices (one per core).
On XLA:CPU its depthwise 7x7 convolutions make an epoch cost ~170 s (the ViT config: ~100 s), so
5 epochs is what 15 minutes holds.

Command (and timed, start-up included, with benchmarks/time_to_accuracy.py):
  python -m imgcls_jax.main --config=configs/fashion_mnist_convnext.py --workdir=/tmp/fmnist_convnext
  python benchmarks/time_to_accuracy.py --target=0.91 --budget=900 -- \
      --config=configs/fashion_mnist_convnext.py --workdir=/tmp/fmnist_convnext_timed
Expected: 91.14% top-1 on the 10k test split (seed 0) at the end of epoch 5, 852 s wall to that
evaluation, start-up included (858 s the whole run, 1540 s CPU; epochs 1-5: 86.25, 87.90, 88.88,
90.51, 91.14%). Measured 2026-12-02 on the project's 2-core AMD EPYC VM (lscpu: "AMD EPYC",
AVX-512), nothing else running; the same run earlier under load gave the same 91.14% (the run is
deterministic) in ~14.5 minutes.
"""
import ml_collections

from configs import fashion_mnist_quick


def get_config() -> ml_collections.ConfigDict:
  c = fashion_mnist_quick.base_config()   # the data, flips on the device, flip TTA, 2 CPU devices
  c.model = ml_collections.ConfigDict()
  c.model.name = 'convnext_tiny'
  c.model.depths = (2, 2)
  c.model.widths = (64, 128)
  c.model.stem_patch = 4
  c.model.drop_path_rate = 0.0
  c.model.layer_scale = 1e-6

  c.batch_size = 128
  c.eval_batch_size = 500
  c.num_epochs = 5.0
  c.optim.name = 'muon'
  c.optim.learning_rate = 0.02
  c.optim.weight_decay = 0.05
  c.optim.schedule = 'cosine'
  c.optim.warmup_epochs = 0.3
  c.eval_every_epochs = 1.0
  return c
