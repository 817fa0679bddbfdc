"""The embedded default run and the full config schema: a small CNN on scikit-learn's digits.

The data ships inside scikit-learn (no download, ever). Every key is commented; other configs start
from ``default.get_config()`` and change what differs.

Command:
  python -m imgcls_jax.main --config=configs/default.py --workdir=/tmp/imgcls_digits
Expected: 99.33% top-1 on the 450-image held-out test split with seed 0 (seeds 0-6: 99.33 / 99.33
/ 99.56 / 99.33 / 100.0 / 99.56 / 99.78%, mean 99.56%; sklearn's SVC(gamma=0.001): 99.1%), in
17.0-17.9 s wall on a 2-core Zen 4 AMD EPYC (family 25 model 17), start-up included: the first
step 5.6 s after the start, 2.8 s with a warm compilation cache (2026-12-06, session 36). Read as
arrays, no TensorFlow imported. The same run read through tfds and tf.data (``tfds_digits``
below; host pad_crop(pad=1) instead of the device's one-pixel shift, another batch order), run
alternately beside it: 99.78 / 99.56 / 99.78 / 99.33 / 99.78 / 99.56 / 99.78% (mean 99.65%) in
20.1-22.4 s, the first step after 8.1 s.
"""
import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0                              # seeds init, data order, augmentation and dropout

  # ---- data (imgcls_jax/data) ----
  c.data = ml_collections.ConfigDict()
  # A tfds image-classification dataset name ('sklearn_digits': the same digits through tfds and
  # tf.data), 'image_folder' (config.data.folder / manifest) or 'arrays:/path/x.npz' / 'arrays:NAME'
  # (numpy, no TensorFlow: data/arrays.py). The default reads the embedded digits as arrays
  # written from scikit-learn on first use (<tfds data_dir>/arrays/sklearn_digits.npz).
  c.data.name = 'arrays:sklearn_digits'
  c.data.data_dir = config_dict.placeholder(str)    # tfds data_dir (None: tfds default)
  c.data.manual_dir = config_dict.placeholder(str)  # manually downloaded files (e.g. imagenet2012)
  c.data.train_split = 'train'            # tfds split spec, e.g. 'train[:90%]'
  c.data.eval_split = 'test'              # evaluated exactly once per evaluation
  # Preprocessing ops joined by '|' (imgcls_jax/data/pp/); images stay uint8 until the device.
  # Ops: pad_crop(pad, mode), flip_lr, rotate(degrees, fill, interpolation), random_resized_crop
  # (size, ...), resize(size), center_crop(size), random_erasing(prob, ...), randaugment(num_ops,
  # magnitude, ...), trivial_augment_wide(num_bins, fill, ops); e.g. 'rotate(degrees=15)'.
  # Host ops run in tf.data: not for arrays (they augment on the device, below).
  c.data.train_preprocess = ''
  c.data.eval_preprocess = ''             # e.g. 'center_crop(size=224)' for large images
  # Augmentation inside the jitted train step, after train_preprocess (imgcls_jax/device_augment.py;
  # saves the host the per-example work), ops joined by '|': 'flip_lr' (a random horizontal flip
  # per example, keyed by (seed, step)), 'flip_alternate' (derandomized: each example mirrored in
  # alternate epochs, from a per-example coin keyed by (seed, its pixels): first, and with no
  # random train_preprocess op, or training refuses it), 'translate(pad=2)' (a random shift by
  # -2..2 pixels per axis and example, keyed by (seed, step); the uncovered border black, or
  # mirrored with mode=reflect), 'erase(prob=0.5, area_min=0.02, area_max=0.33, fill=noise)'
  # (Random Erasing: one rectangle per example filled with noise or zeros, keyed by (seed, step);
  # after flip_alternate). E.g. 'flip_alternate|translate(pad=2)'; '' = none.
  # The digits' augmentation: a one-pixel random shift (never flip digits: it changes their
  # meaning). Set '' (or your ops) when you read other data with other train_preprocess ops.
  c.data.device_preprocess = 'translate(pad=1)'
  # False when a horizontal flip changes what an image shows (text, digits, arrows, left/right
  # classes): flips in train_preprocess / device_preprocess and flip TTA are refused; the mark is
  # saved with the run (evaluate refuses flip TTA on it; a resume must keep it). sklearn_digits,
  # mnist, emnist, kmnist and svhn_cropped are never flipped anyway (data/info.py).
  c.data.mirror_safe = True
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
  # Multi-label (tagging): labels are sets of classes. A CSV manifest (config.data.manifest) with
  # rows path,tag1;tag2[,split], or a tfds dataset whose label feature is a sequence of class
  # labels. Training uses sigmoid binary cross-entropy; evaluation reports mAP, F1, exact match
  # and Hamming loss (see config.evaluate.threshold_split and config.loss.pos_weight).
  c.data.multilabel = False
  # Class-balanced sampling (single-label): every training example is drawn with probability
  # proportional to 1 / (its class's count), so each class fills ~1/K of every batch; an "epoch"
  # stays len(split) examples. Seeded and exactly resumable like the plain stream.
  c.data.balanced_sampling = False
  # The training split held on the devices (imgcls_jax/data/resident.py): for small datasets, each
  # step gathers its batch there from indices, in exactly the streamed order, and no host pipeline
  # runs beside training. Needs one process, train_preprocess='' (augment with device_preprocess),
  # read_shards=1, no balanced_sampling, and a split within device_resident_max_mb.
  c.data.device_resident = False
  c.data.device_resident_max_mb = 1024.0

  # ---- model (imgcls_jax/models: every key but 'name' goes to the constructor) ----
  c.model = ml_collections.ConfigDict()
  c.model.name = 'cnn'                    # see imgcls_jax.models.names(); each family's keys:
                                          # README, "Model families" (replace the whole group)
  c.model.widths = (32, 64, 128)          # channels per stage
  c.model.convs_per_stage = 2
  c.model.dropout = 0.0                   # before the linear head
  # Keys of the other families (set c.model anew when you pick one: every key but 'name' goes to
  # the constructor; on the command line --config.model="{'name': 'resnet18', 'small_inputs':
  # True}", as --config.model.name alone keeps the keys above). Sizes (vit_ti16, convnext_tiny,
  # efficientnet_b0, mobilenet_v3_large, ...) fix the architecture; these keys override it:
  #   resnet*:        width, small_inputs (3x3/1 stem for 8-32 px), drop_path_rate
  #   vit_*:          image_size (the input size, 224), patch_size (16; must divide image_size),
  #                   pool ('token': class token, or 'gap': mean of the tokens), dropout,
  #                   drop_path_rate (stochastic depth, 0 -> rate linearly over the blocks)
  #   convnext_*:     drop_path_rate (torchvision's 0.1 / 0.4 / 0.5), stem_patch (4; 1-2 for
  #                   28-32 px), layer_scale (1e-6), depths / widths
  #   efficientnet_*: drop_path_rate (0.2), dropout (0.2-0.3), small_inputs, width_mult / depth_mult
  #   mobilenet_v3_*: dropout (0.2), small_inputs, width_mult (last_channel too), last_channel

  c.dtype = 'float32'                     # compute dtype: 'float32' or 'bfloat16' (params stay f32)

  # ---- optimisation (imgcls_jax/optim.py) ----
  c.batch_size = 128                      # global, over all devices and processes
  c.grad_accumulation_steps = 1           # k > 1: each step runs the batch as k micro-batches of
                                          # batch_size / k (less activation memory) and applies one
                                          # update of their summed gradients: the same update as
                                          # one batch (exactly so without BatchNorm; BN sees b/k)
  c.eval_batch_size = 512                 # global; the last batch is padded and masked
  c.num_epochs = 40.0                     # training length in epochs ...
  c.num_train_steps = -1                  # ... or in steps (> 0 overrides num_epochs)
  # Digits hold-out (read through tf.data), seeds 0/1/2: 99.56 / 99.33 / 100.0% with 0.1; 99.11 /
  # 99.56 / 99.56% with 0.
  c.label_smoothing = 0.1
  # ---- the loss (imgcls_jax/steps.py): rare classes ----
  c.loss = ml_collections.ConfigDict()
  c.loss.class_weights = ''               # '' (every class 1), 'balanced' (n / (K * n_k) from the
                                          # training split's counts, as sklearn's
                                          # compute_class_weight) or K comma-separated weights;
                                          # the loss is sum(w_y * CE) / sum(w_y), as PyTorch's
  c.loss.focal_gamma = 0.0                # > 0: focal loss, CE scaled by (1 - p_true)^gamma
                                          # (Lin et al. 2017; e.g. 2.0)
  c.loss.logit_adjustment = 0.0           # tau > 0: train on logits + tau * log(class prior of the
                                          # training split), predict with the plain logits (Menon et
                                          # al. 2021: aims at balanced accuracy; e.g. 1.0)
  c.loss.pos_weight = ''                  # multi-label: '' (1), 'balanced' (negatives / positives
                                          # of each tag in the training split, at most 100) or K
                                          # comma-separated weights of each tag's positive term,
                                          # as PyTorch's BCEWithLogitsLoss(pos_weight)
  c.optim = ml_collections.ConfigDict()
  # 'sgd', 'adamw', 'lamb' / 'lars' (large batches), 'muon' (Newton-Schulz-orthogonalised momentum
  # for kernels, Adam for the rest) or 'schedule_free_adamw' (use schedule='constant'; evaluated
  # and loaded at its averaged iterate x). Weight decay acts on kernels only in all of them. The
  # keys below marked with optimizers are read by those only (one set on the command line for
  # another optimizer is warned about); adding an optimizer or schedule: optim.OPTIMIZERS / README.
  c.optim.name = 'sgd'
  c.optim.learning_rate = 0.1             # peak learning rate ...
  c.optim.lr_batch_reference = 0          # ... times batch_size / this, when > 0 (e.g. 256)
  c.optim.schedule = 'cosine'             # 'cosine', 'linear' or 'constant' after warmup
  c.optim.warmup_epochs = 2.0             # linear warmup from 0 ...
  c.optim.warmup_steps = -1               # ... or in steps (> 0 overrides warmup_epochs)
  c.optim.end_lr_factor = 0.0             # final learning rate as a fraction of the peak
  c.optim.momentum = 0.9                  # sgd, lars
  c.optim.nesterov = True                 # sgd, lars
  c.optim.b1 = 0.9                        # adamw, lamb, schedule_free_adamw; muon's Adam part
  c.optim.b2 = 0.999                      # adamw, lamb, schedule_free_adamw; muon's Adam part
  c.optim.eps = 1e-8                      # adamw, lamb, muon, schedule_free_adamw
  c.optim.trust_coefficient = 0.001       # lars: update norm = this x parameter norm per kernel
  c.optim.muon_beta = 0.95                # muon: momentum of the orthogonalised kernels
  # schedule_free_adamw with BatchNorm: before each evaluation and save, the running statistics
  # (collected at the gradient point y) are replaced by the average of this many training batches'
  # statistics at the evaluated x (the first batches of the training stream, held in host memory
  # for the run, at most 1 GiB of them; host preprocessing applied, device augmentation not; as
  # torch's swa_utils.update_bn); 0 = keep those collected at y. Not with a weight EMA (config.ema).
  c.optim.schedule_free_bn_batches = 16
  c.optim.weight_decay = 5e-4             # on kernels only (not biases or norm parameters)
  c.optim.grad_clip_norm = 0.0            # global-norm clipping when > 0
  # Per-group learning rates (all but schedule_free_adamw): the rate of the parameters of
  # normalisation layers (BatchNorm / LayerNorm scale and bias) and of the other biases, as a
  # multiple of the schedule's. Weight decay stays on kernels only. airbench trains BN biases at a
  # higher rate. 1.0 = the same rate.
  c.optim.norm_lr_factor = 1.0
  c.optim.bias_lr_factor = 1.0
  # Frozen parameters by name: dotted prefixes of parameter names (e.g. 'norms.0' for fast_cnn's
  # first BatchNorm, 'layer1' for a ResNet stage). They keep their initial values, get no
  # gradient (XLA drops the backward pass that only they needed) and no optimizer state updates;
  # BatchNorm statistics still update. '' = none; several: 'norms.0,convs.1'.
  c.optim.freeze = ''
  # Lookahead (Zhang et al. 2019; airbench): every sync_period steps the slow weights move alpha
  # of the way to the fast (trained) ones and training continues from them; composes with every
  # optimizer but schedule_free_adamw. The slow weights are checkpointed with the optimizer state;
  # evaluations use the current weights (equal to the slow ones right after a sync).
  c.optim.lookahead = ml_collections.ConfigDict()
  c.optim.lookahead.sync_period = 0       # 0 = off; e.g. 5
  c.optim.lookahead.alpha = 0.5           # slow step size in (0, 1]

  # ---- initialisation (imgcls_jax/whitening.py) ----
  c.init = ml_collections.ConfigDict()
  # Patch whitening (airbench): the first convolution's filters are the eigenvectors of the
  # covariance of its input patches in the first whitening_examples training images, scaled to
  # whiten them (1 / sqrt(eigenvalue + whitening_eps)); with whitening_negatives also their
  # negatives (v1, -v1, v2, -v2, ...; extra output channels keep their random init). Models cnn
  # and fast_cnn; a fresh run only (a resumed run keeps its weights).
  c.init.patch_whitening = False
  c.init.whitening_examples = 5000
  c.init.whitening_eps = 5e-4
  c.init.whitening_negatives = True
  c.init.freeze_whitening = False         # True: the whitening layer never trains (zero updates)

  # ---- weight EMA (imgcls_jax/steps.py): an exponential moving average of the weights ----
  c.ema = ml_collections.ConfigDict()
  c.ema.decay = 0.0                       # 0 = off; e.g. 0.999: ema = d * ema + (1 - d) * weights
                                          # after every step (BN statistics too); checkpointed
  c.ema.warmup = True                     # d_t = min(decay, (1 + t) / (10 + t)): early steps count
  c.ema.inference = True                  # with EMA on: evaluations (in training and --mode=
                                          # evaluate), predict, export and serve use the EMA weights

  # ---- loop, logging, checkpoints (imgcls_jax/train.py) ----
  c.log_every_steps = 50                  # train metrics to metrics.jsonl / TensorBoard
  c.eval_every_epochs = 10.0              # evaluation period in epochs ...
  c.eval_every_steps = -1                 # ... or in steps (> 0 overrides); always at the end
  c.checkpoint_every_epochs = 10.0        # checkpoint period in epochs ...
  c.checkpoint_every_steps = -1           # ... or in steps (> 0 overrides); always at the end
  c.keep_checkpoints = 3                  # newest checkpoints kept
  c.progress_bar = True                   # tqdm bar with img/s and ETA (process 0, a terminal)
  # Train steps per jitted call (imgcls_jax/dispatch.py): k > 1 places k batches at once and runs
  # k steps with lax.scan: the same steps and per-step metrics, less Python / dispatch work per
  # step (small models). Groups never cross an evaluation or checkpoint (choose k dividing their
  # periods); train metrics may be logged up to k - 1 steps later than with 1.
  c.steps_per_dispatch = 1                # > 1 is for accelerators: ~10x slower on XLA:CPU (a
                                          # conv in a loop body; measured, see dispatch.py)
  c.eval_subset = 0                       # > 0: evaluations before the final one use only the
                                          # first N eval examples (rounded up to whole eval
                                          # batches); the final evaluation is always complete
  # JAX's persistent compilation cache: '' (off), 'default' ($IMGCLS_JAX_CACHE_DIR/jax_cache,
  # else ~/.cache/imgcls_jax/jax_cache) or a directory. A rerun then loads its compiled programs
  # instead of compiling them (seconds of start-up on a CPU); results are the same.
  c.compilation_cache_dir = ''
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
  c.distributed.heartbeat_timeout = 100   # seconds without a process's heartbeat before the
                                          # others treat it as lost (a hung host, a stuck GPU)

  # ---- evaluation report (--mode=evaluate, imgcls_jax/evaluate.py; also cross-validation) ----
  c.evaluate = ml_collections.ConfigDict()
  c.evaluate.checkpoint = 'best'          # 'best' (by config.checkpoint.best_metric; runs saved
                                          # without metrics: highest eval top-1 in metrics.jsonl;
                                          # else the latest), 'latest', or a step number
  c.evaluate.split = ''                   # tfds split to evaluate; '' = data.eval_split
  c.evaluate.tta = ''                     # test-time augmentation: '' (none), 'flip' (average
                                          # the probabilities of the image and its mirror image)
                                          # or 'flip_translate' (airbench, single-label: the image
                                          # and its mirror 1/4 each, their 1-pixel shifts down-
                                          # right and up-left 1/8 each); applies to the
                                          # evaluations during training too
  c.evaluate.calibration_bins = 15        # equal-width confidence bins of the ECE / reliability plot
  c.evaluate.top_confused = 10            # most confused class pairs listed in the report
  # A split the model did not train on (e.g. test): label_issues.csv lists the
  # examples whose label looks wrong (cleanlab's confident learning on the model's probabilities;
  # imgcls_jax/label_issues.py; tagging runs: which tags look missing or extra), most likely first.
  c.evaluate.label_issues = True
  c.evaluate.errors = 24                  # errors.csv lists every wrongly predicted example, the
                                          # most confident first (likely label mistakes); errors.png
                                          # shows this many (<= 100) as the model saw them (0 =
                                          # neither; multi-label: every wrong tag
                                          # decision, missed or extra)
  c.evaluate.output_dir = ''              # report files; '' = workdir (a fold: <fold>/evaluate)
  c.evaluate.confidence_level = 0.95      # the report's intervals (imgcls_jax/intervals.py): top-1
                                          # exact (Clopper-Pearson); top-1, macro F1 and balanced
  c.evaluate.bootstrap_resamples = 1000   # accuracy by bootstrapping the examples (0: exact only)
  # Multi-label: the split on which per-class decision thresholds are chosen (best F1 per tag)
  # at the end of training; saved with the checkpoint and used by evaluate, predict, export and
  # serve. '' = 0.5 for every tag. For a run already trained: --mode=calibrate with this key.
  c.evaluate.threshold_split = ''
  # Single-label: the held-out split on which one temperature T is fitted at the end of training
  # (temperature scaling: the NLL-minimising T of softmax(logits / T); imgcls_jax/temperature.py);
  # saved with the checkpoint, and every probability the run gives afterwards (the final
  # evaluation, evaluate, predict, serve, export) is softmax(logits / T). It must share no
  # example with the training or eval split: hold part of training out, e.g.
  # data.train_split='train[:90%]' and temperature_split='train[90%:]'. '' = none. For a run
  # already trained: --mode=calibrate --config.evaluate.temperature_split=SPLIT (calibrate.py).
  c.evaluate.temperature_split = ''
  # Single-label: abstain rather than guess. With a target accuracy (e.g. 0.99), the lowest
  # threshold on the (tempered) top-1 probability at which the answered examples of
  # temperature_split are at least that accurate is fitted with the temperature and saved with
  # it; predict, serve and export then mark answers below it "abstained" (imgcls_jax/selective.py).
  # Every single-label report lists the accuracy-coverage trade-off either way. 0 = none.
  c.evaluate.abstain_accuracy = 0.0
  # Single-label, with temperature_split: the share of that held-out split to keep as known, e.g.
  # 0.99; the log-sum-exp of the logits (minus the energy score) that keeps it is fitted with the
  # temperature and saved with it; predict, serve and export then mark an image below it
  # "unknown" (of none of the classes; imgcls_jax/ood.py). 0 = no such gate.
  c.evaluate.unknown_keep = 0.0
  # --mode=evaluate, single-label: image files / folders / both (comma-separated) of NONE of the
  # classes; the report then says how well the top-1 probability tells them from the split
  # (ROC-AUC) and how many would be answered at 95% coverage and at the abstention threshold,
  # and how well each per-image score does (imgcls_jax/ood.py: top-1 probability, energy,
  # largest logit; ROC-AUC and FPR95).
  c.evaluate.ood_inputs = ''

  # ---- --mode=compare (imgcls_jax/compare.py): the run in --workdir (A) against another (B) ----
  # Both predict config.evaluate.split (checkpoint, TTA, intervals: config.evaluate.*); the report
  # gives B - A with paired bootstrap intervals and McNemar's exact test.
  c.compare = ml_collections.ConfigDict()
  c.compare.workdir = ''                  # run B's directory (required)

  # ---- k-fold cross-validation (imgcls_jax/cross_validation.py) ----
  c.cross_validation = ml_collections.ConfigDict()
  # 0 = off. K >= 2: the train command trains K models on stratified folds of data.train_split
  # (folds fixed by `seed`), each in <workdir>/fold_<i> (resumable), evaluates each on its
  # held-out fold and reports every fold and the mean +- std (e.g. data.train_split='train+test').
  c.cross_validation.folds = 0
  # List the examples whose label looks wrong (tagging runs: which tags look missing or extra),
  # from the pooled out-of-fold probabilities (cleanlab's confident learning;
  # imgcls_jax/label_issues.py), in <workdir>/cv_label_issues.csv, the most likely first.
  c.cross_validation.label_issues = True

  # ---- hyperparameter sweeps (imgcls_jax/sweep/) ----
  # '' = off. A Python dict of config keys to lists of values, e.g.
  #   "{'optim.learning_rate': [0.2, 0.1, 0.05], 'label_smoothing': [0.0, 0.1]}"
  # The train command then trains every combination (x `seeds`) in its own <workdir>/<setting>
  # (a plain run, resumable; finished trials are not trained again), with cross_validation.folds
  # > 0 a k-fold run each, and ranks the settings by `metric` on data.eval_split (mean +- std over
  # seeds): sweep.md / sweep.json / sweep.csv / sweep.png. A diverged trial is recorded, not fatal.
  c.sweep = ml_collections.ConfigDict()
  c.sweep.grid = ''
  c.sweep.seeds = 1                       # seeds per setting: seed, seed + 1, ...
  # 0 = every combination. N > 0: N distinct settings drawn at random (fixed by `seed`), each list's
  # values equally likely; a key may then be a range instead of a list:
  # {'log_uniform': [1e-4, 1e-1]}, {'uniform': [0.0, 0.3]} or {'int_uniform': [1, 8]}.
  c.sweep.samples = 0
  # '' = every trial in this process. 'i/n': this process trains trials i, i + n, ... (e.g. a job
  # array's task i of n; launch/slurm_sweep.sbatch), the others' results are read when finished.
  c.sweep.shard = ''
  c.sweep.metric = ''                     # '' = accuracy (tagging runs: map); any eval metric
  c.sweep.mode = ''                       # 'max' / 'min'; '' = min for losses and ECEs, else max
  # Successive halving (imgcls_jax/sweep/halving.py): 0 = off. eta >= 2: every setting trains
  # a share of its run (the first rung: the smallest power of 1/eta not below `first_rung`; 0:
  # eta^-k with k = floor(log_eta(settings))), is evaluated there, and the best 1/eta of the
  # settings go on, eta times longer, the rest stop; the last rung is the whole run. A rung's
  # score is the trial's evaluation at that step; trials resume exactly (the schedule stays the
  # whole run's). One process (no shard), no cross_validation.folds.
  c.sweep.halving = 0
  c.sweep.first_rung = 0.0

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

  # ---- transfer learning (imgcls_jax/transfer.py, imgcls_jax/torch_import/) ----
  c.transfer = ml_collections.ConfigDict()
  # Weights to start from when the workdir has no checkpoint yet: a run directory of this project
  # (or its checkpoints/<step>), or a local .safetensors / .pt / .pth file of a torchvision- or
  # timm-layout ResNet, ViT, ConvNeXt, EfficientNet or MobileNetV3 (model.name must be the
  # matching size). '' = train from scratch.
  c.transfer.init_from = ''
  c.transfer.init_step = -1               # checkpoint step of init_from; -1 = its latest
  c.transfer.mode = 'finetune'            # 'finetune' (all parameters train) or 'linear_probe'
                                          # (only the head trains; the rest is frozen by optax masking)
  c.transfer.layer_decay = 1.0            # layer-wise lr decay: depth d trains at lr * decay**(L-d)
                                          # (stem 0, +1 per block / conv layer, head L); 1.0 = off
  c.transfer.head = ''                    # top-level attribute of the head; '' = fc / head / classifier
  c.transfer.keep_head = False            # True: load the head too (same classes); False: new head

  c.distill = ml_collections.ConfigDict()
  # Knowledge distillation (imgcls_jax/distill.py, teacher.py): a trained run directory whose
  # model sees every training batch (after augmentation, in inference mode); the loss becomes
  # (1 - weight) * loss(labels) + weight * temperature^2 * KL(teacher || student) of the
  # probabilities at that temperature. Same classes and channels as this run (each batch is resized
  # to the teacher's input size where it differs); any model family.
  # '' = off.
  c.distill.teacher = ''                  # a run directory; several, comma-separated: an ensemble
                                          # teaching the mean of its probabilities at temperature
  c.distill.weight = 0.5                  # in (0, 1]; 1 = the teacher's probabilities only
  c.distill.temperature = 4.0             # > 0; softens both distributions (1 = as they are)

  # ---- --mode=predict (imgcls_jax/predict.py): top-k classes of image files ----
  c.predict = ml_collections.ConfigDict()
  c.predict.inputs = ''                   # comma-separated files, folders (recursive), globs; a comma
                                          # inside an existing file's name stays in it
  c.predict.output = ''                   # file to write; '' = stdout
  c.predict.format = 'jsonl'              # 'jsonl' (one JSON object per image) or 'csv'
  c.predict.top_k = 5                     # classes reported per image
  c.predict.batch_size = 64               # images per forward pass
  c.predict.step = -1                     # checkpoint step in the workdir; -1 = latest
  # Heat-map overlay PNG per image (imgcls_jax/explain.py): '' (off), 'gradcam' (convolutional
  # models) or 'integrated_gradients' (any model); written to predict.explain_dir.
  c.predict.explain = ''
  c.predict.explain_dir = ''              # '' = 'explanations/' next to predict.output (or in the
                                          # current directory when printing to stdout)
  c.predict.ig_steps = 32                 # integrated gradients: points on the path from black

  # ---- --mode=export (imgcls_jax/export/): SavedModel (uint8 images in), TFLite, int8, ONNX ----
  c.export = ml_collections.ConfigDict()
  c.export.output_dir = ''                # '' = <workdir>/export
  c.export.tflite = True                  # also write model.tflite (converted from the SavedModel)
  c.export.tflite_batch = 1               # images per call the TFLite models are fixed to (1, as
                                          # on a phone: BatchNorm folded into the convolutions,
                                          # 4-34x faster per image than any-batch, NOTES session
                                          # 19); 0 = any batch
  c.export.dtype = 'float32'              # compute dtype of the exported model ('' = the run's)
  c.export.verify_examples = 256          # eval-split images the export is checked on against JAX
                                          # (without the dataset: images the run directory
                                          # stores, else seeded synthetic ones)
  c.export.tolerance = 1e-4               # max |probability difference| allowed, else export fails
  c.export.step = -1                      # checkpoint step in the workdir; -1 = latest
  c.export.onnx = False                   # also write model.onnx (from the float TFLite model via
                                          # tf2onnx; needs pip install 'imgcls_jax[export]'),
                                          # checked under onnxruntime against JAX (tolerance above)
  c.export.web = False                    # also write web/: a page that classifies images in
                                          # the browser (its own batch-1 ONNX model under
                                          # onnxruntime-web, verified like the rest; needs the
                                          # [export] extra; README "Export for the web")
  c.export.web_runtime = ''               # onnxruntime-web's dist folder (or one holding its
                                          # node_modules); '' = ./node_modules/onnxruntime-web
  c.export.quantize = ''                  # also write a quantised TFLite model: '' (none), 'int8'
                                          # (weights + activations, calibrated on training images)
                                          # or 'float16' (weights): model_<quantize>.tflite
  c.export.calibration_examples = 256     # int8: training images the activation ranges come from
  c.export.quantize_examples = -1         # eval images the quantised model is compared with the
                                          # float one on (agreement, accuracy drop); -1 = all
  c.export.max_accuracy_drop = 0.01       # quantised top-1 accuracy may fall this much (0.01 = one
                                          # point) below the float model's, else the export fails

  # ---- --mode=serve (imgcls_jax/serve/): HTTP service, web page at / (FastAPI, uvicorn) ----
  c.serve = ml_collections.ConfigDict()
  c.serve.host = '127.0.0.1'              # loopback by default; '0.0.0.0' exposes it to the network
  c.serve.port = 8080                     # 0 = any free port (printed at start)
  c.serve.max_batch_size = 32             # concurrent requests batched into one forward pass
  c.serve.batch_timeout_ms = 5.0          # how long a batch waits to fill after its first request
  c.serve.max_upload_bytes = 10 * 2**20   # larger bodies get 413
  c.serve.max_pixels = 40_000_000         # larger decoded images (width x height) get 413, read
                                          # from the header (0 = no limit, also past PIL's)
  c.serve.max_queue = 1024                # images waiting for the model; beyond it 503 (retry), and a
                                          # request of more images than this is 413
  c.serve.top_k = 5                       # default classes per answer (?top_k=N overrides)
  c.serve.step = -1                       # checkpoint step in the workdir; -1 = latest
  c.serve.model_name = 'imgcls'           # <name> in the TF-Serving / KServe v2 URLs
                                          # (/v1/models/<name>:predict, /v2/models/<name>/infer)
  c.serve.keep_alive_s = 5                # idle seconds before a kept-alive connection is closed
  c.serve.decode_threads = 0              # images decoded at once, 0 = one per CPU core, at most 8
                                          # (each holds up to max_pixels x 4 bytes); more uploads
                                          # wait for a thread, up to max_queue, then 503
  c.serve.cors_origins = ''               # web pages that may call the API from another origin:
                                          # 'https://a.example,https://b.example', or '*' (any)

  # ---- the user's images (imgcls_jax/data/folder_layout.py, folder_index.py, image_folder.py)
  # With data.name = 'image_folder', one of:
  #   data.folder = ROOT holding <split>/<class>/* (splits named by data.train_split / eval_split),
  #     or <class>/* without split folders (then data.holdout_fraction > 0 picks the eval split);
  #   data.manifest = a CSV of path,label (or path,label,split) rows, paths relative to the CSV.
  # Any file of images.IMAGE_EXTENSIONS (jpg, png, gif, bmp, webp, tif(f), pnm; any case), decoded
  # with EXIF orientation applied; unreadable files are skipped and listed. Split 'all' is every
  # image. Mixed sizes need a size-fixing op, e.g.
  # train_preprocess='random_resized_crop(size=224)|flip_lr', eval_preprocess='center_crop(size=224)'.
  c.data.folder = config_dict.placeholder(str)
  c.data.manifest = config_dict.placeholder(str)
  c.data.holdout_fraction = 0.0           # without split folders / split column: this fraction of
                                          # every class (stratified) is the eval split, never trained
  c.data.holdout_seed = 0                 # which images are held out (fixed per seed)
  c.data.validation_fraction = 0.0        # any layout: this fraction of every class of the train
                                          # split (stratified, holdout_seed) becomes split
                                          # 'validation', never trained: fit a temperature or
                                          # thresholds there (evaluate.temperature_split='validation')
  c.data.index_cache = ''                 # where the file index is cached ('' = ~/.cache/imgcls_jax;
                                          # 'off' = rebuild at every start)

  # ---- mixup / cutmix on the device (imgcls_jax/mixup.py); both alphas 0 = off ----
  c.mixup = ml_collections.ConfigDict()
  c.mixup.mixup_alpha = 0.0               # Beta(a, a) mixing weight of whole images (e.g. 0.2-0.8)
  c.mixup.cutmix_alpha = 0.0              # Beta(a, a) kept area of cutmix boxes (e.g. 1.0)
  c.mixup.prob = 1.0                      # probability that a batch / example is mixed at all
  c.mixup.switch_prob = 0.5               # with both alphas > 0: probability of cutmix vs mixup
  c.mixup.mode = 'batch'                  # 'batch': one weight per batch; 'example': one per example

  # ---- classical features (imgcls_jax/features.py) and the baseline, --mode=classical
  # (imgcls_jax/classical.py): scikit-image features -> scikit-learn linear classifier ----
  c.classical = ml_collections.ConfigDict()
  c.classical.features = 'hog,lbp,histogram,edges'  # blocks, concatenated in this order
  c.classical.hog_orientations = 9        # HOG orientation bins
  c.classical.hog_cell = 4                # HOG cell size in pixels (e.g. 2 for 8 px digits)
  c.classical.hog_block = 2               # HOG block size in cells (L2-Hys normalised)
  c.classical.lbp_points = 8              # LBP neighbours P (uniform codes: P + 2 bins)
  c.classical.lbp_radius = 1.0            # LBP radius in pixels
  c.classical.lbp_grid = 2                # LBP histograms over a grid x grid tiling
  c.classical.histogram_bins = 16         # intensity / colour histogram bins per channel
  c.classical.edge_sigma = 1.0            # Canny Gaussian sigma
  c.classical.edge_grid = 4               # edge density over a grid x grid tiling (+ whole image)
  c.classical.classifier = 'logistic'     # 'logistic' (multinomial) or 'linear_svm' (LinearSVC)
  c.classical.C = 1.0                     # inverse regularisation strength of the classifier
  c.classical.max_iter = 1000             # solver iterations
  c.classical.workers = 0                 # feature-extraction threads; 0 = CPU count

  # ---- --mode=embed (imgcls_jax/embed.py): features + k-NN evaluation + 2-D projection ----
  c.embed = ml_collections.ConfigDict()
  c.embed.extractor = 'model'             # 'model' (penultimate layer of the run in --workdir) or
                                          # 'classical' (config.classical features of config.data;
                                          # of the run's data on a trained run's --workdir)
  c.embed.split = ''                      # split to embed; '' = data.eval_split
  c.embed.inputs = ''                     # image files / folders / globs to embed instead (unlabelled)
  c.embed.reference_split = ''            # k-NN neighbours come from this split; '' =
                                          # data.train_split; 'none' = no k-NN evaluation
  c.embed.knn_k = 10                      # neighbours (distance-weighted vote; tags: majority)
  c.embed.knn_metric = 'cosine'           # sklearn metric: 'cosine', 'euclidean', ...
  c.embed.tsne_max = 2000                 # t-SNE panel on at most this many points (a random
                                          # subset of larger sets); 0 = PCA only
  c.embed.batch_size = 256                # images per forward pass
  c.embed.output_dir = ''                 # '' = <workdir>/embed_<split> (or embed_inputs;
                                          # embed_<split>_classical for the classical extractor)
  return c


def tfds_digits(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """``c`` reading the digits through tfds and tf.data instead of as arrays (the same images and
  the same augmentation, a one-pixel random shift, on the host): for what only tf.data does, such
  as the ``train+test`` split of k-fold cross-validation."""
  c.data.name = 'sklearn_digits'
  c.data.train_preprocess = 'pad_crop(pad=1)'
  c.data.device_preprocess = ''
  return c
