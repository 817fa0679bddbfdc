"""The embedded default run and the full config schema: a small CNN on scikit-learn's digits.

The data ships inside scikit-learn (no download, ever). Every key is commented; other configs start
from ``default.get_config()`` and change what differs.

Command:
  python -m imgcls_jax.main --config=configs/default.py --workdir=/tmp/imgcls_digits
Expected: 99.56% top-1 on the 450-image held-out test split with seed 0 (seeds 1, 2: 99.33%, 100.0%;
sklearn's SVC(gamma=0.001): 99.1%), in about 30 s on 2 CPU cores, start-up included.
"""
import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0                              # seeds init, data order, augmentation and dropout

  # ---- data (imgcls_jax/data) ----
  c.data = ml_collections.ConfigDict()
  c.data.name = 'sklearn_digits'          # any tfds image-classification dataset name
  c.data.data_dir = config_dict.placeholder(str)    # tfds data_dir (None: tfds default)
  c.data.manual_dir = config_dict.placeholder(str)  # manually downloaded files (e.g. imagenet2012)
  c.data.train_split = 'train'            # tfds split spec, e.g. 'train[:90%]'
  c.data.eval_split = 'test'              # evaluated exactly once per evaluation
  # Preprocessing ops joined by '|' (imgcls_jax/data/pp/); images stay uint8 until the device.
  c.data.train_preprocess = 'pad_crop(pad=1)'     # never flip digits: it changes their meaning
  c.data.eval_preprocess = ''             # e.g. 'center_crop(size=224)' for large images
  # Augmentation inside the jitted train step, after train_preprocess: '' or 'flip_lr' (a random
  # horizontal flip per example, keyed by (seed, step)); saves the host the per-example work.
  c.data.device_preprocess = ''
  c.data.mean = (0.5,)                    # per-channel mean / std in [0, 1] units, applied on device
  c.data.std = (0.5,)
  c.data.cache = True                     # cache decoded examples in memory (small datasets)
  c.data.shuffle_buffer = 50_000          # examples; the whole split when smaller
  c.data.prefetch = 4                     # host-side batches prepared ahead
  # Training stream = this many equally sized, separately shuffled slices of the split, each
  # filling a fixed block of rows of every global batch. Batches do not depend on the process
  # count; a process reads only the slices its rows come from. Multi-host on large data: set it
  # to the host count (or a multiple) so each host reads only its own part of the files.
  c.data.read_shards = 1

  # ---- model (imgcls_jax/models: every key but 'name' goes to the constructor) ----
  c.model = ml_collections.ConfigDict()
  c.model.name = 'cnn'                    # see imgcls_jax.models.names()
  c.model.widths = (32, 64, 128)          # channels per stage
  c.model.convs_per_stage = 2
  c.model.dropout = 0.0                   # before the linear head

  c.dtype = 'float32'                     # compute dtype: 'float32' or 'bfloat16' (params stay f32)

  # ---- optimisation (imgcls_jax/optim.py) ----
  c.batch_size = 128                      # global, over all devices and processes
  c.eval_batch_size = 512                 # global; the last batch is padded and masked
  c.num_epochs = 40.0                     # training length in epochs ...
  c.num_train_steps = -1                  # ... or in steps (> 0 overrides num_epochs)
  # Digits hold-out, seeds 0/1/2: 99.56 / 99.33 / 100.0% with 0.1; 99.11 / 99.56 / 99.56% with 0.
  c.label_smoothing = 0.1
  c.optim = ml_collections.ConfigDict()
  c.optim.name = 'sgd'                    # 'sgd' or 'adamw'
  c.optim.learning_rate = 0.1             # peak learning rate ...
  c.optim.lr_batch_reference = 0          # ... times batch_size / this, when > 0 (e.g. 256)
  c.optim.schedule = 'cosine'             # 'cosine', 'linear' or 'constant' after warmup
  c.optim.warmup_epochs = 2.0             # linear warmup from 0 ...
  c.optim.warmup_steps = -1               # ... or in steps (> 0 overrides warmup_epochs)
  c.optim.end_lr_factor = 0.0             # final learning rate as a fraction of the peak
  c.optim.momentum = 0.9                  # sgd
  c.optim.nesterov = True                 # sgd
  c.optim.b1 = 0.9                        # adamw
  c.optim.b2 = 0.999                      # adamw
  c.optim.eps = 1e-8                      # adamw
  c.optim.weight_decay = 5e-4             # on kernels only (not biases or norm parameters)
  c.optim.grad_clip_norm = 0.0            # global-norm clipping when > 0

  # ---- loop, logging, checkpoints (imgcls_jax/train.py) ----
  c.log_every_steps = 50                  # train metrics to metrics.jsonl / TensorBoard
  c.eval_every_epochs = 10.0              # evaluation period in epochs ...
  c.eval_every_steps = -1                 # ... or in steps (> 0 overrides); always at the end
  c.checkpoint_every_epochs = 10.0        # checkpoint period in epochs ...
  c.checkpoint_every_steps = -1           # ... or in steps (> 0 overrides); always at the end
  c.keep_checkpoints = 3                  # newest checkpoints kept
  c.progress_bar = True                   # tqdm bar with img/s and ETA (process 0, a terminal)
  c.tensorboard = True                    # TensorBoard event files in <workdir>/tensorboard

  # ---- devices (imgcls_jax/sharding.py) ----
  c.mesh = ml_collections.ConfigDict()
  c.mesh.num_devices = 0                  # devices in the data-parallel mesh; 0 = all
  # CPU only: split the host CPU into this many XLA devices, each running its share of the batch
  # on its own thread (about the core count; faster for small models). 0 = JAX's default.
  c.mesh.cpu_devices = 0
  # 'replicated': every device holds the whole train state. 'fsdp': parameters and optimizer
  # state are split along the data axis (each device ~1/num_devices; same maths), for models
  # larger than one device's memory.
  c.mesh.param_sharding = 'replicated'
  c.mesh.fsdp_min_size = 2**14            # fsdp: arrays with fewer elements stay replicated

  # ---- multi-process runs (imgcls_jax/distributed.py; launch/ scripts set these) ----
  c.distributed = ml_collections.ConfigDict()
  c.distributed.enabled = False           # call jax.distributed.initialize() before the mode runs
  # Unset (None) values are auto-detected on Cloud TPU VMs, under SLURM srun and Open MPI.
  c.distributed.coordinator_address = config_dict.placeholder(str)  # 'host:port' of process 0
  c.distributed.num_processes = config_dict.placeholder(int)        # processes in the run
  c.distributed.process_id = config_dict.placeholder(int)           # this process: 0..n-1
  c.distributed.local_device_ids = ''     # e.g. '0,1,2,3': GPUs this process drives ('' = JAX's
                                          # default: all; under SLURM, one per task)
  c.distributed.initialization_timeout = 300  # seconds to wait for every process to join

  # ---- evaluation report (--mode=evaluate, imgcls_jax/evaluate.py; also cross-validation) ----
  c.evaluate = ml_collections.ConfigDict()
  c.evaluate.checkpoint = 'best'          # 'best' (by config.checkpoint.best_metric; runs saved
                                          # without metrics: highest eval top-1 in metrics.jsonl;
                                          # else the latest), 'latest', or a step number
  c.evaluate.split = ''                   # tfds split to evaluate; '' = data.eval_split
  c.evaluate.tta = ''                     # test-time augmentation: '' (none) or 'flip' (average
                                          # the probabilities of the image and its mirror image);
                                          # applies to the evaluations during training too
  c.evaluate.calibration_bins = 15        # equal-width confidence bins of the ECE / reliability plot
  c.evaluate.top_confused = 10            # most confused class pairs listed in the report
  c.evaluate.output_dir = ''              # report files; '' = the workdir

  # ---- k-fold cross-validation (imgcls_jax/cross_validation.py) ----
  c.cross_validation = ml_collections.ConfigDict()
  # 0 = off. K >= 2: the train command trains K models on stratified folds of data.train_split
  # (folds fixed by `seed`), each in <workdir>/fold_<i> (resumable), evaluates each on its
  # held-out fold and reports every fold and the mean +- std (e.g. data.train_split='train+test').
  c.cross_validation.folds = 0

  # ---- checkpoint policy, fault tolerance (imgcls_jax/checkpoint.py, imgcls_jax/preemption.py)
  # Periods are checkpoint_every_* above; keep_checkpoints newest are kept. A rerun of the same
  # command resumes from the newest readable checkpoint (damaged ones are moved to
  # <workdir>/corrupt_checkpoints). SIGTERM / SIGINT: finish the step, save, exit 0.
  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.async_save = True          # write checkpoints in the background; training goes on
  c.checkpoint.keep_best = 1              # also keep this many best evaluated checkpoints (0: off);
                                          # when > 0, every evaluation also saves a checkpoint
  c.checkpoint.best_metric = 'accuracy'   # eval metric that ranks them ('accuracy', 'loss', ...)
  c.checkpoint.best_mode = 'max'          # 'max' or 'min' ('min' for 'loss')

  # ---- transfer learning (imgcls_jax/transfer.py, imgcls_jax/torch_import.py) ----
  c.transfer = ml_collections.ConfigDict()
  # Weights to start from when the workdir has no checkpoint yet: a run directory of this project
  # (or its checkpoints/<step>), or a local .safetensors / .pt / .pth file of a torchvision- or
  # timm-layout ResNet (model.name must be the matching resnetNN). '' = train from scratch.
  c.transfer.init_from = ''
  c.transfer.init_step = -1               # checkpoint step of init_from; -1 = its latest
  c.transfer.mode = 'finetune'            # 'finetune' (all parameters train) or 'linear_probe'
                                          # (only the head trains; the rest is frozen by optax masking)
  c.transfer.layer_decay = 1.0            # layer-wise lr decay: depth d trains at lr * decay**(L-d)
                                          # (stem 0, +1 per block / conv layer, head L); 1.0 = off
  c.transfer.head = ''                    # top-level attribute of the head; '' = fc / head / classifier
  c.transfer.keep_head = False            # True: load the head too (same classes); False: new head

  # ---- --mode=predict (imgcls_jax/predict.py): top-k classes of image files ----
  c.predict = ml_collections.ConfigDict()
  c.predict.inputs = ''                   # comma-separated image files and/or folders (recursive)
  c.predict.output = ''                   # file to write; '' = stdout
  c.predict.format = 'jsonl'              # 'jsonl' (one JSON object per image) or 'csv'
  c.predict.top_k = 5                     # classes reported per image
  c.predict.batch_size = 64               # images per forward pass
  c.predict.step = -1                     # checkpoint step in the workdir; -1 = latest

  # ---- --mode=export (imgcls_jax/export.py): TF SavedModel (uint8 images in) + TFLite ----
  c.export = ml_collections.ConfigDict()
  c.export.output_dir = ''                # '' = <workdir>/export
  c.export.tflite = True                  # also write model.tflite (converted from the SavedModel)
  c.export.dtype = 'float32'              # compute dtype of the exported model ('' = the run's)
  c.export.verify_examples = 256          # eval-split images the export is checked on against JAX
  c.export.tolerance = 1e-4               # max |probability difference| allowed, else export fails
  c.export.step = -1                      # checkpoint step in the workdir; -1 = latest

  # ---- --mode=serve (imgcls_jax/serve.py): HTTP classification service ----
  c.serve = ml_collections.ConfigDict()
  c.serve.host = '127.0.0.1'              # loopback by default; '0.0.0.0' exposes it to the network
  c.serve.port = 8080                     # 0 = any free port (printed at start)
  c.serve.max_batch_size = 32             # concurrent requests batched into one forward pass
  c.serve.batch_timeout_ms = 5.0          # how long a batch waits to fill after its first request
  c.serve.max_upload_bytes = 10 * 2**20   # larger bodies get 413
  c.serve.max_pixels = 40_000_000         # larger decoded images (width x height) get 413
  c.serve.max_queue = 1024                # requests waiting for the model; beyond it, 503
  c.serve.top_k = 5                       # default classes per answer (?top_k=N overrides)
  c.serve.step = -1                       # checkpoint step in the workdir; -1 = latest

  # ---- the user's image folders (imgcls_jax/data/image_folder.py) ----
  # With data.name = 'image_folder': images in <folder>/<split>/<class>/*.{jpg,jpeg,png,bmp,gif},
  # splits named by data.train_split / data.eval_split; unreadable files are skipped and listed.
  # Mixed sizes need a size-fixing op, e.g. train_preprocess='random_resized_crop(size=224)|flip_lr'
  # and eval_preprocess='center_crop(size=224)'.
  c.data.folder = config_dict.placeholder(str)

  # ---- mixup / cutmix on the device (imgcls_jax/mixup.py); both alphas 0 = off ----
  c.mixup = ml_collections.ConfigDict()
  c.mixup.mixup_alpha = 0.0               # Beta(a, a) mixing weight of whole images (e.g. 0.2-0.8)
  c.mixup.cutmix_alpha = 0.0              # Beta(a, a) kept area of cutmix boxes (e.g. 1.0)
  c.mixup.prob = 1.0                      # probability that a batch / example is mixed at all
  c.mixup.switch_prob = 0.5               # with both alphas > 0: probability of cutmix vs mixup
  c.mixup.mode = 'batch'                  # 'batch': one weight per batch; 'example': one per example
  return c
