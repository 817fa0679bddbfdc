"""Fashion-MNIST, the strongest recipe here: WideResNet-28-10 with the augmentation suite.

WRN-28-10 (36.5M parameters), SGD with Nesterov momentum, batch 128, peak lr 0.1 (1 warmup epoch),
cosine decay over 200 epochs, weight decay 5e-4 on kernels, label smoothing 0.1, bfloat16 compute;
augmentation: pad-and-crop (4 px), horizontal flip, random erasing (p=0.5, noise fill), and
cutmix on the device for half of the batches. Accelerator-sized: 21.6 GFLOP per training image
(XLA cost analysis, benchmarks/throughput.py), 200 epochs ~ 2.6e17 FLOP: on the project's 2-core
CPU one step of 128 images takes 24.5 s (float32, mesh.cpu_devices=2), i.e. ~27 days for the run.
On one NVIDIA H200 (2026-12-04, jax 0.11.2, benchmarks/gpu_run.sh) the bf16 step of 128 images
takes 9.92 ms (12,897 images/s, 35% of the bf16 peak): 200 epochs are 15.5 minutes of steps
(batch 512: 16,186 images/s).

Command (prepare the data once, see configs/fashion_mnist_quick.py):
  python -m imgcls_jax.main --config=configs/fashion_mnist_wrn.py --workdir=/tmp/fmnist_wrn
Expected: >= 96.3% top-1 on the 10k test split. Reference: Zhong et al., Random Erasing Data
Augmentation (AAAI 2020), WRN-28-10 on Fashion-MNIST: 95.92% without, 96.35% with random erasing.
NOT measured yet: the one GPU session so far (15 minutes of device time) had no TensorFlow on
the GPU machine for the data pipeline and too little time for 200 epochs; only the step was
timed (benchmarks/NOTES.md, "Session 20"). A session with a GPU and TensorFlow should run the
command above and record the result here.
"""
import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  c = default.get_config()
  c.data.name = 'fashion_mnist'
  c.data.train_split = 'train'
  c.data.eval_split = 'test'
  c.data.train_preprocess = ('pad_crop(pad=4)|flip_lr|'
                             "random_erasing(prob=0.5, value='random')")
  c.data.device_preprocess = ''          # the default's one-pixel shift is for digits
  c.data.eval_preprocess = ''
  c.data.mean = (0.286,)
  c.data.std = (0.353,)
  c.data.cache = True

  c.model = ml_collections.ConfigDict()
  c.model.name = 'wide_resnet'
  c.model.depth = 28
  c.model.width = 10
  c.model.dropout = 0.0
  c.dtype = 'bfloat16'

  c.batch_size = 128
  c.eval_batch_size = 1000
  c.num_epochs = 200.0
  c.label_smoothing = 0.1
  c.optim.name = 'sgd'
  c.optim.learning_rate = 0.1
  c.optim.momentum = 0.9
  c.optim.nesterov = True
  c.optim.weight_decay = 5e-4
  c.optim.warmup_epochs = 1.0
  c.optim.schedule = 'cosine'

  c.mixup.cutmix_alpha = 1.0
  c.mixup.prob = 0.5
  c.mixup.mode = 'batch'

  c.log_every_steps = 100
  c.eval_every_epochs = 5.0
  c.checkpoint_every_epochs = 5.0
  return c
