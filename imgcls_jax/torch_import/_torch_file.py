"""A torch-saved state dict read with ``torch.load(weights_only=True)``, and why a file is not one.

``torch.load`` answers every bad file with a long text about ``weights_only`` (with terminal
escape codes). When it fails, the file is looked at without unpickling anything: the zip archive
of ``torch.save`` (or the legacy stream of pickles) is opened and its pickle opcodes are scanned
(``pickletools.genops``) for the classes it names, which tells a pickled model object, other
pickled Python objects, a TorchScript archive, a damaged file and a file of another format apart.
A pickled object is never loaded here: unpickling it runs code from the file.
"""
from __future__ import annotations

import errno
import pickle
import pickletools
import re
import warnings
import zipfile
import zlib
from typing import Any, Mapping

from imgcls_jax.errors import UserError, first_line

_WRAPPER_KEYS = ('state_dict', 'model', 'model_state', 'model_state_dict', 'module')
_SAVE = 'torch.save(model.state_dict(), path)'
_ZIP_MAGIC = b'PK\x03\x04'
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c   # the first pickle of a pre-1.6 (non-zip) torch.save file
# Classes a weights-only file names; any other class is a pickled Python object.
_TENSOR_GLOBALS = re.compile(
    r'torch\.(_utils\.|_tensor\.|storage\.|\w*Storage$|device$|Size$|'
    r'(b?float|u?int|bool|complex|half|double|long)\w*$)|'
    r'collections\.OrderedDict$|_codecs\.encode$')
# Attribute names every pickled torch.nn.Module carries (its __dict__).
_MODULE_FIELDS = {'_parameters', '_buffers', '_modules'}
_STRING_OPS = {'STRING', 'BINSTRING', 'SHORT_BINSTRING', 'UNICODE', 'SHORT_BINUNICODE',
               'BINUNICODE', 'BINUNICODE8'}


def read(path: str) -> Mapping[str, Any]:
  """``{name: numpy array}`` of the tensors in a torch-saved state dict (UserError otherwise)."""
  try:
    import torch
  except ImportError:
    raise UserError(f'Reading {path} needs PyTorch; install it (pip install "imgcls_jax[torch]") '
                    'or convert the file to .safetensors.') from None
  try:
    with warnings.catch_warnings():  # torch's notes on the format; a failure is explained below
      warnings.simplefilter('ignore', UserWarning)
      obj = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # torch raises many types for corrupt files and pickled objects
    raise UserError(why_unloadable(path, e)) from None
  for key in _WRAPPER_KEYS:  # training scripts often wrap the state dict
    if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
      obj = obj[key]
  if not isinstance(obj, Mapping):
    raise UserError(f'{path} holds a {type(obj).__name__}, not a state dict; save it with '
                    f'{_SAVE}.')
  out = {}
  for k, v in obj.items():
    if hasattr(v, 'detach'):
      v = v.detach().cpu()
      out[k] = (v.float() if v.is_floating_point() else v).numpy()
  return out


class _Damaged(Exception):
  """The file has a PyTorch format's structure but is cut short or corrupt."""


class _NotTorch(Exception):
  """The file has no PyTorch format's structure."""


def why_unloadable(path: str, error: BaseException) -> str:
  """The one-sentence message for a file ``torch.load(weights_only=True)`` failed on with
  ``error``; the file is read, never unpickled."""
  try:
    kind, classes = _inspect(path)
  except _NotTorch as e:
    return (f'{path} is not a PyTorch state dict file ({e}); give a file saved with {_SAVE}, or '
            'a .safetensors file.')
  except _Damaged as e:
    return (f'{path} is a damaged PyTorch file ({e}); copy it again, or save it again with '
            f'{_SAVE}.')
  except (IsADirectoryError, PermissionError, FileNotFoundError) as e:
    return f'Cannot read {path} ({first_line(e)}); check that the file is readable.'
  except OSError as e:   # EIO, ELOOP, ...: the disk or the path; EINVAL: a seek past a bad size
    if e.errno == errno.EINVAL:
      return (f'{path} is a damaged PyTorch file (an offset inside it is invalid); copy it again, '
              f'or save it again with {_SAVE}.')
    return f'Cannot read {path} ({first_line(e)}); check that the file is readable.'
  except Exception:  # noqa: BLE001 (zip / pickle oddities: encrypted, unknown compression, ...)
    return (f'Cannot load {path} as a PyTorch state dict ({_quote(error)}); save the weights '
            f'with {_SAVE}.')
  if kind == 'torchscript':
    return (f'{path} is a TorchScript archive (torch.jit.save), not a state dict; save the '
            f'weights with {_SAVE}.')
  if kind == 'module':
    named = f' ({classes[0]})' if classes else ''
    return (f'{path} holds a pickled model object{named}, not a state dict; save it with {_SAVE} '
            '(pickled objects are not loaded: that could run arbitrary code).')
  if classes:
    more = f' and {len(classes) - 2} more' if len(classes) > 2 else ''
    return (f"{path} holds pickled Python objects besides tensors ({', '.join(classes[:2])}{more}),"
            ' which are not loaded because that could run arbitrary code; save only the weights '
            f'with {_SAVE}.')
  return (f'Cannot load {path} as a PyTorch state dict ({_quote(error)}); save the weights with '
          f'{_SAVE}.')


def _inspect(path: str) -> tuple[str, list[str]]:
  """(``'torchscript'``, ``'module'`` or ``'data'``, the non-tensor classes the pickle names);
  _NotTorch / _Damaged for a file that is not a readable torch.save file."""
  with open(path, 'rb') as f:
    head = f.read(4)
  if not head:
    raise _NotTorch('the file is empty')
  if head == _ZIP_MAGIC:
    return _inspect_zip(path)
  if head[:1] == b'\x80' and head[1:2] in (b'\x02', b'\x03', b'\x04', b'\x05'):
    return _inspect_legacy(path)
  raise _NotTorch('damaged, or another format')


def _inspect_zip(path: str) -> tuple[str, list[str]]:
  """A torch.save zip archive: ``<name>/data.pkl`` holds the pickle, ``<name>/data/<i>`` the
  tensors' bytes; a TorchScript archive adds ``constants.pkl`` and ``code/``."""
  try:
    with zipfile.ZipFile(path) as archive:
      names = archive.namelist()
      pickles = [n for n in names if re.fullmatch(r'([^/]+/)?data\.pkl', n)]
      if not pickles:
        raise _NotTorch('a zip archive without the data.pkl of torch.save')
      if any(re.fullmatch(r'([^/]+/)?constants\.pkl', n) for n in names):
        return 'torchscript', []
      kind, classes = _scan(archive.read(pickles[0]))
      bad = archive.testzip() if kind == 'data' and not classes else None
  except (zipfile.BadZipFile, zlib.error, EOFError, ValueError):
    raise _Damaged('its zip archive is truncated or corrupt') from None
  if bad is not None:
    raise _Damaged(f'a checksum error in {bad}')
  return kind, classes


def _inspect_legacy(path: str) -> tuple[str, list[str]]:
  """A pre-1.6 torch.save file: pickles of the magic number, the protocol version, system
  information, then the object."""
  with open(path, 'rb') as f:
    try:
      magic = [arg for op, arg, _ in pickletools.genops(f) if op.name in ('LONG1', 'LONG4')]
    except ValueError:
      magic = []
    if magic != [_LEGACY_MAGIC]:
      raise _NotTorch('damaged, or another format')
    try:
      for _ in range(2):   # the protocol version and the system information
        for _ in pickletools.genops(f):
          pass
      return _scan(f)
    except ValueError:
      raise _Damaged('its pickle data is cut short or corrupt') from None


def _scan(data: Any) -> tuple[str, list[str]]:
  """(``'module'`` or ``'data'``, the non-tensor classes) named by one pickle (bytes or a file),
  read opcode by opcode; nothing is unpickled."""
  classes: list[str] = []
  strings: set[str] = set()
  memo: dict[Any, Any] = {}
  recent: list[Any] = []   # the values the last ops pushed (strings; None for anything else)
  for op, arg, _ in pickletools.genops(data):
    name = op.name
    if name in _STRING_OPS:
      value = arg.decode('latin-1') if isinstance(arg, bytes) else arg
      strings.add(value)
      recent.append(value)
    elif name in ('PUT', 'BINPUT', 'LONG_BINPUT'):
      memo[arg] = recent[-1] if recent else None
    elif name == 'MEMOIZE':
      memo[len(memo)] = recent[-1] if recent else None
    elif name in ('GET', 'BINGET', 'LONG_BINGET'):
      recent.append(memo.get(arg))
    elif name in ('FRAME', 'PROTO'):
      pass
    else:
      if name in ('GLOBAL', 'INST'):
        module, _, attr = arg.partition(' ')
        classes.append(f'{module}.{attr}')
      elif name == 'STACK_GLOBAL':
        module, attr = ([None, None] + recent)[-2:]
        classes.append(f'{module}.{attr}')
      recent.append(None)
    del recent[:-2]
  foreign = list(dict.fromkeys(c for c in classes if not _TENSOR_GLOBALS.match(c)))
  return ('module' if _MODULE_FIELDS <= strings else 'data'), foreign


def _quote(error: BaseException) -> str:
  """``first_line`` of ``error``, or for torch's weights-only failure its reason line, without
  terminal escape codes."""
  text = re.sub(r'\x1b\[[0-9;]*m', '', str(error))
  reason = re.search(r'WeightsUnpickler error:\s*(\S[^\n]*)', text)
  if reason and isinstance(error, pickle.UnpicklingError):
    error = pickle.UnpicklingError(reason.group(1))
  return re.sub(r'\x1b\[[0-9;]*m', '', first_line(error, limit=200))
