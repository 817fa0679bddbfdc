"""The exported formats: SavedModel, TFLite (float, int8, float16) and ONNX; writers and runners.

Every runner takes the uint8 ``[batch, H, W, C]`` images the exported signature takes and returns
``{'probabilities', 'logits'}`` as numpy, so the exporter checks each format the same way.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import sys
import tempfile
import warnings
from typing import Any, Callable, Iterable, Iterator

import jax
import numpy as np

from imgcls_jax import inference
from imgcls_jax.errors import UserError, first_line
from imgcls_jax.models import layers

OUTPUTS = ('probabilities', 'logits')


def _tf() -> Any:
  from imgcls_jax.data.tf_import import tf
  try:
    tf.config.set_visible_devices([], 'GPU')  # TF must not take accelerator memory from JAX
  except RuntimeError:
    pass
  return tf


def save_saved_model(clf: inference.Classifier, directory: str, batch: int = 0) -> None:
  """Writes ``clf`` as a SavedModel with a uint8 ``serving_default`` signature taking any batch
  (``batch=0``) or exactly ``batch`` images (the source of the fixed-batch TFLite models: with
  static shapes the converter folds each BatchNorm into its convolution and drops the shape
  arithmetic a symbolic batch needs)."""
  tf = _tf()
  from jax.experimental import jax2tf

  leaves, treedef = jax.tree.flatten(clf.variables)
  h, w, c = clf.image_shape
  multilabel = clf.trained.info.multilabel

  def fn(weights, images):
    out = clf.apply(jax.tree.unflatten(treedef, weights), images)
    return out if multilabel else {'logits': out['logits']}

  polymorphic = None if batch else [None, f'(b, {h}, {w}, {c})']
  converted = jax2tf.convert(fn, polymorphic_shapes=polymorphic, with_gradient=False)
  module = tf.Module()
  module.weights = [tf.Variable(np.asarray(x), trainable=False) for x in leaves]

  @tf.function(input_signature=[tf.TensorSpec([batch or None, h, w, c], tf.uint8, name='images')],
               autograph=False)
  def serve(images):
    out = converted(module.weights, images)
    if multilabel:  # eval_steps.tanh_sigmoid: TANH, which int8 quantises well
      return {'probabilities': out['probabilities'], 'logits': out['logits']}
    # The softmax of eval_steps.probabilities, as TF's op (the same to float rounding): the TFLite
    # converter maps it to its SOFTMAX kernel, whose int8 output is scaled to [0, 1], where the
    # StableHLO softmax is lowered to REDUCE_MAX / EXP / SUM / DIV and int8 quantisation of those
    # made probabilities that summed to 0.98-2.04 (Fashion-MNIST quick config).
    return {'probabilities': tf.nn.softmax(out['logits'], axis=-1), 'logits': out['logits']}

  module.serve = serve
  with layers.export_forms():  # JAX traces here: one conv / max-pool op per layer (TFLite kernels)
    tf.saved_model.save(module, directory, signatures={'serving_default': serve})


def save_tflite(saved_model_dir: str, path: str, *, quantize: str = '', batch: int = 0,
                calibration_NxHxWxC: np.ndarray | None = None) -> dict[str, Any]:
  """Converts the SavedModel to a TFLite flatbuffer at ``path``; returns how it was quantised.
  ``batch``: the SavedModel's fixed batch size (``save_saved_model``), 0 if any; calibration
  images go in groups of it.

  ``quantize``: '' (float32), 'float16' (float16 weights) or 'int8' (post-training full-integer
  quantisation of weights and activations, calibrated on ``calibration_NxHxWxC``; the signature
  keeps uint8 images in and float32 probabilities out).
  """
  tf = _tf()
  converter = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir)
  info: dict[str, Any] = {'quantize': quantize or 'none'}
  if quantize == 'float16':
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_types = [tf.float16]
  elif quantize == 'int8':
    if calibration_NxHxWxC is None or not len(calibration_NxHxWxC):
      raise UserError('int8 quantisation needs calibration images; none were given.')
    group = max(1, batch)
    images = calibration_NxHxWxC[:max(group, len(calibration_NxHxWxC) // group * group)]
    if len(images) < group:
      raise UserError(f'int8 quantisation of a TFLite model of batch {batch} needs at least '
                      f'{batch} calibration images, not {len(images)}; set '
                      'config.export.calibration_examples (or config.export.tflite_batch).')

    def representative() -> Iterable[list[np.ndarray]]:
      for i in range(0, len(images), group):
        yield [images[i:i + group]]

    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    info['calibration_examples'] = int(len(images))
  elif quantize:
    raise UserError(f"config.export.quantize must be '', 'int8' or 'float16', not {quantize!r}.")
  try:
    with _stderr_held():
      model = converter.convert()
  except Exception as e:  # the converter raises ConverterError and friends
    if quantize == 'int8':  # an op without an int8 kernel: let it stay float
      logging.warning('Full-integer conversion failed (%s); keeping float kernels where int8 '
                      'ones are missing.', _converter_message(e))
      converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8,
                                             tf.lite.OpsSet.TFLITE_BUILTINS]
      info['float_fallback'] = True
      try:
        with _stderr_held():
          model = converter.convert()
      except Exception as e2:
        raise _conversion_error(e2) from None
    else:
      raise _conversion_error(e) from None
  with open(path, 'wb') as f:
    f.write(model)
  return info


@contextlib.contextmanager
def _stderr_held() -> Iterator[None]:
  """Holds back what is written to file descriptor 2 while the TFLite converter runs: when it
  fails, its C++ code prints each error with its MLIR location (a ``loc(callsite(...`` line of
  thousands of characters) there; the exporter's one-line error says what failed instead. What a
  successful conversion wrote is passed on to stderr, and after a failure every line but those.
  (The redirect is of the process's fd 2: other threads' stderr is held back meanwhile too.)"""
  with contextlib.suppress(Exception):
    sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as held:
    ok = False
    try:
      os.dup2(held.fileno(), 2)
      yield
      ok = True
    finally:
      with contextlib.suppress(Exception):
        sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      held.seek(0)
      text = held.read().decode('utf-8', 'replace')
      if not ok:   # the MLIR locations go; anything else said meanwhile stays
        text = ''.join(line for line in text.splitlines(True) if 'loc(' not in line)
      with contextlib.suppress(Exception):
        sys.stderr.write(text)


def _converter_message(e: BaseException) -> str:
  """``Type: what failed`` of a converter error: the text after the last ``error: `` of its
  first line that has one, less an MLIR ``loc(...): `` prefix, else its first line."""
  for line in str(e).splitlines():
    text = line.rsplit('error: ', 1)[1].strip() if 'error: ' in line else ''
    if text.startswith('loc('):  # the location: up to its closing parenthesis
      depth, end = 0, len(text)
      for i, c in enumerate(text):
        depth += {'(': 1, ')': -1}.get(c, 0)
        if c == ')' and not depth:
          end = i
          break
      text = text[end + 1:].lstrip(': ')
    if text:
      return f'{type(e).__name__}: ' + (text[:300].rsplit(' ', 1)[0] + ' ...' if len(text) > 300
                                         else text)
  return first_line(e, limit=300)


def _conversion_error(e: BaseException) -> UserError:
  return UserError(f'TFLite conversion failed ({_converter_message(e)}); export with '
                   '--config.export.tflite=False --config.export.quantize= --config.export.onnx='
                   'False for the SavedModel only (or, where config.export.dtype is not '
                   'float32, with --config.export.dtype=float32).')


def tflite_runtime() -> str:
  """The TFLite runtime the runners use: the standalone LiteRT package when installed."""
  try:
    import ai_edge_litert.interpreter  # noqa: F401
    return f"ai_edge_litert {importlib.metadata.version('ai-edge-litert')}"
  except ImportError:
    return f'tf.lite {_tf().__version__}'


def _tflite_interpreter(path: str) -> Any:
  try:
    from ai_edge_litert.interpreter import Interpreter
  except ImportError:
    Interpreter = _tf().lite.Interpreter
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')  # tf.lite.Interpreter's deprecation notice
    return Interpreter(model_path=path)


def _batched(fn: Callable[[np.ndarray], dict[str, np.ndarray]], images: np.ndarray,
             batch: int) -> dict[str, np.ndarray]:
  outs = [fn(images[i:i + batch]) for i in range(0, len(images), batch)]
  return {k: np.concatenate([np.asarray(o[k]) for o in outs]) for k in OUTPUTS}


def run_saved_model(directory: str, images: np.ndarray, batch: int = 64) -> dict[str, np.ndarray]:
  """Outputs of the SavedModel's ``serving_default`` signature (loaded from disk)."""
  tf = _tf()
  fn = tf.saved_model.load(directory).signatures['serving_default']
  return _batched(lambda x: {k: v.numpy() for k, v in fn(images=tf.constant(x)).items()},
                  images, batch)


def fixed_batch(runner: Any) -> int:
  """The batch size a TFLite ``serving_default`` signature runner is fixed to, 0 if any."""
  return max(0, int(runner.get_input_details()['images']['shape_signature'][0]))


def tflite_batch(path: str) -> int:
  """The batch size the TFLite model is fixed to (``config.export.tflite_batch``), 0 if any."""
  return fixed_batch(_tflite_interpreter(path).get_signature_runner('serving_default'))


def tflite_runner(path: str) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
  """The TFLite model's ``serving_default`` signature as a function of any number of images: a
  fixed-batch model is run on consecutive groups of its batch size (the last one padded)."""
  runner = _tflite_interpreter(path).get_signature_runner('serving_default')
  fixed = fixed_batch(runner)
  if not fixed:
    return lambda images: runner(images=images)

  def run(images: np.ndarray) -> dict[str, np.ndarray]:
    n = len(images)
    padded = np.concatenate([images, np.zeros(((-n) % fixed,) + images.shape[1:], images.dtype)])
    outs = [runner(images=padded[i:i + fixed]) for i in range(0, len(padded), fixed)]
    return {k: np.concatenate([o[k] for o in outs])[:n] for k in OUTPUTS}
  return run


_PROBE = """
import sys, numpy as np
try:
  from ai_edge_litert.interpreter import Interpreter
except ImportError:
  import tensorflow as tf
  Interpreter = tf.lite.Interpreter
runner = Interpreter(model_path=sys.argv[1]).get_signature_runner('serving_default')
shape = tuple(int(d) for d in sys.argv[2].split(','))
fixed = int(runner.get_input_details()['images']['shape_signature'][0])
for n in ((fixed,) if fixed > 0 else (1, 7)):
  runner(images=np.zeros((n,) + shape, np.uint8))
"""


def probe_tflite(path: str, image_shape: tuple[int, int, int], timeout_s: float = 600) -> str:
  """Runs the TFLite model once (batches of 1 and 7, or its fixed batch) in a child process:
  '' when it ran, else why not. Some models crash the runtime itself (an abort, no Python
  error): e.g. ResNet-18 at 224 px quantised to int8, under LiteRT 2.3, with or without XNNPACK."""
  import subprocess
  import sys
  try:
    proc = subprocess.run([sys.executable, '-c', _PROBE, path, ','.join(map(str, image_shape))],
                          capture_output=True, text=True, timeout=timeout_s)
  except subprocess.TimeoutExpired:
    return f'no answer within {timeout_s:g} s'
  if proc.returncode == 0:
    return ''
  lines = [ln for ln in proc.stderr.strip().splitlines() if not ln.startswith('INFO:')]
  last = (lines or [''])[-1][:200]
  return (f'the runtime was killed by signal {-proc.returncode}' if proc.returncode < 0 else
          f'exit status {proc.returncode}') + (f': {last}' if last else '')


def run_tflite(path: str, images: np.ndarray, batch: int = 32) -> dict[str, np.ndarray]:
  """Outputs of the TFLite model's ``serving_default`` signature."""
  return _batched(tflite_runner(path), images, batch)


def require_onnx(flag: str = 'onnx=False') -> None:
  """A UserError naming the install when tf2onnx, onnx or onnxruntime is missing."""
  try:
    import onnx  # noqa: F401
    import onnxruntime  # noqa: F401
    import tf2onnx  # noqa: F401
  except ImportError:
    raise UserError("ONNX export needs tf2onnx, onnx and onnxruntime: pip install "
                    f"'imgcls_jax[export]', or export with --config.export.{flag}.") from None


def save_onnx(tflite_path: str, path: str, opset: int = 17, flag: str = 'onnx=False') -> None:
  """Converts the float TFLite model to ONNX with tf2onnx (input ``images`` uint8, outputs
  ``probabilities`` and ``logits``).

  The route goes through TFLite because tf2onnx cannot convert the ``XlaCallModule`` op of a
  jax2tf SavedModel, while the TFLite converter lowers it to builtin ops that tf2onnx knows. Two
  of tf2onnx's steps are replaced (``_segment_prod_to_onnx``, ``_onnx_optimizers``): as they were,
  ViT, ConvNeXt and any model with a convolution on an input smaller than its kernel converted to
  Reshapes that onnxruntime refused.
  """
  require_onnx(flag)
  import onnx
  import tf2onnx
  # The signature's names for the TFLite tensors (e.g. 'StatefulPartitionedCall:1').
  runner = _tflite_interpreter(tflite_path).get_signature_runner('serving_default')
  rename = {d['name']: k for k, d in {**runner.get_input_details(),
                                      **runner.get_output_details()}.items()}
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    try:
      with _tf().device('/cpu:0'):  # as tf2onnx.convert.from_tflite, with two repairs
        model, _ = tf2onnx.convert._convert_common(
            None, tflite_path=tflite_path, name='model', continue_on_error=True, opset=opset,
            custom_op_handlers={'UnsortedSegmentProd': (_segment_prod_to_onnx, [])},
            optimizers=_onnx_optimizers())
    except Exception as e:
      raise UserError(f'ONNX conversion failed ({first_line(e, limit=300)}); export with '
                      f'--config.export.{flag}.') from None
  graph = model.graph
  for node in graph.node:
    node.input[:] = [rename.get(n, n) for n in node.input]
    node.output[:] = [rename.get(n, n) for n in node.output]
  for value in list(graph.input) + list(graph.output):
    value.name = rename.get(value.name, value.name)
  if {v.name for v in graph.input} != {'images'} or {v.name for v in graph.output} != set(OUTPUTS):
    raise UserError('The ONNX model lost its input or output names in conversion; export with '
                    f'--config.export.{flag}.')
  onnx.checker.check_model(model)
  onnx.save(model, path)


def _onnx_optimizers() -> dict[str, Any]:
  """tf2onnx's graph optimizers, its transpose optimizer without its last step: that step turns
  each Transpose that moves only dims of size 1 into a Reshape, reading shapes that its earlier
  steps left stale (a ConvNeXt stage at 1x1 got Reshapes to the wrong layout, which onnxruntime
  refused). Such a Transpose stays one (a copy of a tensor with size-1 dims)."""
  from tf2onnx import optimizer
  from tf2onnx.optimizer.transpose_optimizer import TransposeOptimizer

  class Transposes(TransposeOptimizer):
    def post_optimize_action(self) -> None:
      pass

  return {name: Transposes if factory is TransposeOptimizer else factory
          for name, factory in optimizer._get_optimizers().items()}


def _segment_prod_to_onnx(ctx: Any, node: Any, name: str, args: list[Any]) -> None:
  """tf2onnx's handler of UNSORTED_SEGMENT_PROD, which the TFLite converter emits to multiply
  dims of a shape vector (a matmul's shapes under a symbolic batch, segment ids -1 for the dims
  left out): with constant ids and a vector, each segment is the product of its entries, one
  Gather each. tf2onnx's own conversion (kept for anything else) multiplies the entries of
  negative ids into the last segment, giving Reshapes that onnxruntime refuses (ViT, ConvNeXt)."""
  del name, args
  from tf2onnx import utils
  from tf2onnx.onnx_opset.reduction import SegmentSum
  _, ids, num = node.inputs
  if not (ids.is_const() and num.is_const()) or ctx.get_rank(node.input[0]) != 1:
    SegmentSum.any_version(ctx.opset, ctx, node)
    return
  ids_N = np.asarray(ids.get_tensor_value(as_list=False)).reshape(-1)
  dtype = utils.map_onnx_to_numpy_type(ctx.get_dtype(node.input[0]))
  segments = []
  for j in range(int(np.asarray(num.get_tensor_value(as_list=False)).reshape(-1)[0])):
    entries = [ctx.make_node('Gather', [node.input[0], ctx.make_const(
        utils.make_name(f'{node.name}_index'), np.array([i], np.int64)).output[0]],
        attr={'axis': 0}).output[0] for i in np.flatnonzero(ids_N == j)]
    if not entries:
      entries = [ctx.make_const(utils.make_name(f'{node.name}_one'), np.ones(1, dtype)).output[0]]
    product = entries[0]
    for e in entries[1:]:
      product = ctx.make_node('Mul', [product, e]).output[0]
    segments.append(product)
  out = ctx.make_node('Concat', segments, attr={'axis': 0}).output[0]
  ctx.replace_all_inputs(node.output[0], out)
  ctx.remove_node(node.name)


def onnx_runner(path: str, threads: int = 0) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
  """The ONNX model under onnxruntime's CPU provider as a function (``threads`` 0: its default)."""
  import onnxruntime as ort
  opts = ort.SessionOptions()
  opts.log_severity_level = 4  # a failing run raises (and the exporter reports it); no log line
  if threads:
    opts.intra_op_num_threads = threads
  session = ort.InferenceSession(path, opts, providers=['CPUExecutionProvider'])
  names = [o.name for o in session.get_outputs()]
  return lambda images: dict(zip(names, session.run(names, {'images': images})))


def run_onnx(path: str, images: np.ndarray, batch: int = 64) -> dict[str, np.ndarray]:
  """Outputs of the ONNX model under onnxruntime."""
  return _batched(onnx_runner(path), images, batch)
