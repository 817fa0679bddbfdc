"""A small ViT on Fashion-MNIST sized for 2 CPU cores: 91.0% top-1 in 15.6 minutes, start-up included.

ViT with 7x7 patches (a 4x4 grid of 16 tokens; 4x4 patches, 49 tokens, cost ~3x per image and
learned no faster per epoch here), width 128, 6 blocks, 4 heads, MLP 256, global average pooling
(no class token), 805k parameters; trained from scratch with Muon (Newton-Schulz-orthogonalised
momentum on the kernels, Adam on biases and norms; lr 0.02 for both, weight decay 0.05 on kernels),
batch 128, 0.2 warmup epochs then cosine to 0, label smoothing 0.1, horizontal flips in the jitted
step, flip test-time augmentation at the evaluations (every epoch), 9 epochs, one XLA CPU device
(it already keeps both cores busy: 1705 s CPU in 938 s wall).
Tuning, measured on the same machine (shared with other jobs): at 600 steps of batch 64, AdamW
reached 75.2 / 77.6 / 75.8% (lr 1e-3 / 2e-3 / 4e-3) and Muon 84.3 / 84.0 / 80.1% (lr 0.01 / 0.02 /
0.04); after one epoch every variant tried (batch 64 / 128, width 192, MLP 512, depth 4, weight
decay 0) landed at 86.1-86.6%, so the cheapest (batch 128, width 128) won; 6 epochs gave 90.48%.

Command (and timed, start-up included, with benchmarks/time_to_accuracy.py):
  python -m imgcls_jax.main --config=configs/fashion_mnist_vit.py --workdir=/tmp/fmnist_vit
  python benchmarks/time_to_accuracy.py --target=0.92 --budget=900 -- \
      --config=configs/fashion_mnist_vit.py --workdir=/tmp/fmnist_vit_timed
Expected: 91.03% top-1 on the 10k test split (seed 0) at the end of epoch 9, 938 s wall, start-up
included (epochs 1-9: 84.01, 85.55, 85.60, 87.67, 88.54, 89.27, 89.91, 91.16, 91.03%; 91.16% at
833 s). The issue's aim, 92% within 15 minutes, is NOT reached: best within 900 s 91.16%.
Measured 2026-12-02 on the project's 2-core AMD EPYC VM (lscpu: "AMD EPYC", AVX-512), nothing
else running: ~665 training images/s, ~100 s per epoch with its evaluation.
"""
import ml_collections

from configs import fashion_mnist_quick


def get_config() -> ml_collections.ConfigDict:
  c = fashion_mnist_quick.base_config()   # the data, flips on the device, flip TTA, logging
  c.model = ml_collections.ConfigDict()
  c.model.name = 'vit_ti16'               # the ViT family; the keys below replace every size
  c.model.width = 128
  c.model.depth = 6
  c.model.num_heads = 4
  c.model.mlp_dim = 256
  c.model.patch_size = 7
  c.model.image_size = 28
  c.model.pool = 'gap'
  c.model.dropout = 0.0
  c.model.drop_path_rate = 0.0

  c.batch_size = 128
  c.eval_batch_size = 500
  c.num_epochs = 9.0
  c.optim.name = 'muon'
  c.optim.learning_rate = 0.02
  c.optim.weight_decay = 0.05
  c.optim.schedule = 'cosine'
  c.optim.warmup_epochs = 0.2
  c.eval_every_epochs = 1.0
  c.mesh.cpu_devices = 1                  # 1 device already uses both cores (Muon's Newton-Schulz
                                          # would run on every device)
  return c
