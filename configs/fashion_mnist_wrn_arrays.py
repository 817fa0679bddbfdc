"""Fashion-MNIST, WideResNet-28-10 (configs/fashion_mnist_wrn.py) from an arrays file with the
augmentation on the device: trains where TensorFlow is not installed (the GPU image).

The same model, optimizer, schedule, label smoothing, bfloat16 and cutmix as fashion_mnist_wrn;
the data is ``benchmarks/.data/fashion_mnist.npz`` (relative to where the command runs: the
repository root) held on the device (``data.device_resident``: 47 MB), and the host augmentation
becomes its device form: random 4-pixel shifts with zero fill (= pad-and-crop 4), horizontal
flips, Random Erasing with noise fill at p = 0.5 (``device_augment.erase``: area 2-33%, aspect
log-uniform, sides clipped to the image; the host op instead retries up to 10 rectangles that
fit). The training order is the arrays file's numpy order (imgcls_jax/data/arrays.py), not the
tf.data shuffle.

Prepare the data once, where TensorFlow is (Debian's dataset-fashion-mnist; ~10 s, 29 MB):
  python -m imgcls_jax.data.write_arrays --dataset=fashion_mnist --compress \\
      --output=benchmarks/.data/fashion_mnist.npz
Command:
  python -m imgcls_jax.main --config=configs/fashion_mnist_wrn_arrays.py --workdir=/tmp/wrn
On a lent GPU (benchmarks/gpu_run.sh --vendor copies ml_collections and tqdm; carry both folders):
  run(command="PYTHONPATH=benchmarks/.vendor python3 -m imgcls_jax.main \\
      --config=configs/fashion_mnist_wrn_arrays.py --workdir=/tmp/wrn --config.batch_size=512 \\
      --config.num_epochs=100 --config.optim.learning_rate=0.2",
      carry=["benchmarks/.vendor", "benchmarks/.data"])
Expected: the target is fashion_mnist_wrn's >= 96.3% top-1 on the 10k test split (Zhong et al.,
AAAI 2020: 96.35% with Random Erasing) after 200 epochs; NOT measured yet: no GPU session has run
it (a session with a GPU should, and record the figure here). On 2 CPU cores only its plumbing is
tested (tests/test_arrays.py runs the arrays path without TensorFlow).
"""
import ml_collections

from configs import fashion_mnist_wrn

DATA_FILE = 'benchmarks/.data/fashion_mnist.npz'


def get_config() -> ml_collections.ConfigDict:
  c = fashion_mnist_wrn.get_config()
  c.data.name = f'arrays:{DATA_FILE}'
  c.data.train_preprocess = ''
  c.data.device_preprocess = 'translate(pad=4)|flip_lr|erase(prob=0.5)'
  c.data.eval_preprocess = ''
  c.data.cache = False
  c.data.device_resident = True
  return c
