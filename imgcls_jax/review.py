"""A web page to look through a label-issue list and apply the rows a person agrees with.

  python -m imgcls_jax.review --issues=<workdir>/cv_label_issues.csv --manifest=labels.csv \
      [--out=labels.relabelled.csv] [--port=8000] [--host=127.0.0.1]
  (an image folder of class directories: --folder=DIR instead of --manifest, as relabel.py)
  open http://127.0.0.1:8000/

The page shows every row of the list (``cv_label_issues.csv`` from k-fold cross-validation, or
``label_issues.csv`` from ``--mode=evaluate``; single-label or tagging; ``label_issues.py``), most
likely first: the image, its label and the suggested one (a tagging row: the tags to add and to
remove), and a box to check. "Apply the checked rows" writes the relabelled copy of the manifest,
exactly as ``python -m imgcls_jax.relabel --ranks=<the checked ranks>`` would (``relabel.py``:
stale rows left alone, the manifest itself never overwritten), and the page says what it did.
Each Apply writes the whole copy again from the manifest with the rows checked at that moment, so
unchecking a row and applying again undoes it; an Apply none of whose checked rows can be applied
(all left alone) writes nothing and says why (400), keeping the copy written before.

Endpoints (Starlette under uvicorn; loopback only by default, since the page writes a file):
  GET  /                   the page (plain HTML/JS, works offline)
  GET  /v1/issues          {"tagged", "manifest", "output", "rows": [the list's rows]}
  GET  /v1/image/<rank>    that row's image file (only a file the manifest lists, or one
                           under the folder)
  POST /v1/apply           {"ranks": [1, 3, ...]} -> {"output", "relabelled": [[rank, id, old,
                           new], ...], "left_alone": [[rank, id, why], ...]}
A bad request gets a 4xx with {"error": "<one sentence>"}. A request addressed to another host name
than the loopback ones (a DNS-rebound name), and a POST from another origin or not as JSON, are
refused (403 / 415), so another web page cannot apply rows.
"""
from __future__ import annotations

import argparse
import mimetypes
import os
import socket
import sys
import threading
import time
from typing import Any

from imgcls_jax import relabel
from imgcls_jax.errors import UserError

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'serve', 'static', 'review.html')


LOOPBACK = frozenset({'127.0.0.1', 'localhost', '::1'})


def create_app(issues: str, manifest: str, out: str = '', *, folder: str = '',
               hosts: frozenset[str] | None = LOOPBACK) -> Any:
  """The Starlette app of the page for the list ``issues`` and the CSV ``manifest`` (or the image
  ``folder`` of class directories: ``relabel.relabel``'s ``folder``). ``hosts``: the host names
  a request may address (its Host header; a page of another site or a DNS-rebound name is
  refused); None: any (a non-loopback bind). A POST must be JSON from the page's own origin."""
  from urllib.parse import urlsplit
  from starlette.applications import Starlette
  from starlette.responses import FileResponse, HTMLResponse, JSONResponse
  from starlette.routing import Route
  rows, tagged = relabel.read_issues(issues)
  src = relabel.open_source(rows, tagged, manifest, folder)   # or one line now
  output = os.path.abspath(out or src.default_out)
  listed_files = src.files()
  by_rank = {int(r['rank']): r for r in rows}

  def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({'error': message}, status_code=status)

  def refused(request: Any) -> JSONResponse | None:
    host = urlsplit('//' + request.headers.get('host', '')).hostname or ''
    if hosts is not None and host not in hosts:
      return error(403, f"Host '{host}' is not this page's address; open it as "
                        'http://127.0.0.1:<port>/.')
    origin = request.headers.get('origin')
    if request.method == 'POST' and origin and urlsplit(origin).netloc != request.headers.get(
        'host', ''):
      return error(403, f'A request from {origin} may not apply rows; use the page itself.')
    return None

  def guarded(handler: Any) -> Any:
    async def run(request: Any) -> Any:
      return refused(request) or await handler(request)
    return run

  async def page(request: Any) -> HTMLResponse:
    with open(PAGE, encoding='utf-8') as f:
      return HTMLResponse(f.read())

  async def listed(request: Any) -> JSONResponse:
    return JSONResponse({'tagged': tagged, 'manifest': src.path, 'output': output, 'rows': rows})

  async def image(request: Any) -> Any:
    rank = request.path_params['rank']
    if rank not in by_rank:
      return error(404, f'No row of rank {rank} in the list (ranks 1-{len(rows)}).')
    path = os.path.normpath(os.path.join(src.root, by_rank[rank]['id']))
    if path not in listed_files or not os.path.isfile(path):
      return error(404, f"The image of rank {rank} ({by_rank[rank]['id']}) is not a file of "
                        f'{src.path}.')
    return FileResponse(path, media_type=mimetypes.guess_type(path)[0] or
                        'application/octet-stream')

  async def apply(request: Any) -> JSONResponse:
    if request.headers.get('content-type', '').split(';')[0].strip() != 'application/json':
      return error(415, 'Send the ranks as JSON (Content-Type: application/json): '
                        '{"ranks": [1, 2, ...]}.')
    try:
      body = await request.json()
    except ValueError:
      return error(400, 'The body is not JSON; send {"ranks": [1, 2, ...]}.')
    ranks = body.get('ranks') if isinstance(body, dict) else None
    if (not isinstance(ranks, list) or not ranks
        or not all(isinstance(k, int) and not isinstance(k, bool) for k in ranks)):
      return error(400, 'Send {"ranks": [1, 2, ...]}: a non-empty list of the ranks to apply.')
    unknown = sorted(set(ranks) - set(by_rank))
    if unknown:
      return error(400, f'Rank {unknown[0]} is not in the list (ranks 1-{len(rows)}).')
    try:
      done = relabel.relabel(issues, manifest, ','.join(map(str, sorted(set(ranks)))), output,
                             folder=folder)
    except UserError as e:
      return error(400, str(e))
    return JSONResponse({'output': done['output'], 'relabelled': done['relabelled'],
                         'left_alone': done['skipped'], 'hint': done['hint']})

  return Starlette(routes=[Route('/', guarded(page)), Route('/v1/issues', guarded(listed)),
                           Route('/v1/image/{rank:int}', guarded(image)),
                           Route('/v1/apply', guarded(apply), methods=['POST'])])


class Background:
  """The page served on a background thread (tests, notebooks): ``url``, ``close()``."""

  def __init__(self, app: Any, host: str = '127.0.0.1', port: int = 0):
    import uvicorn
    self.socket = socket.create_server((host, port))
    self._server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False,
                                                 lifespan='off'))
    self._thread = threading.Thread(target=self._server.run, kwargs={'sockets': [self.socket]},
                                    daemon=True)
    self._thread.start()
    deadline = time.monotonic() + 30
    while not self._server.started and time.monotonic() < deadline:
      time.sleep(0.01)
    host, port = self.socket.getsockname()[:2]
    self.url = f'http://{host}:{port}'

  def close(self) -> None:
    self._server.should_exit = True
    self._thread.join(timeout=30)
    self.socket.close()


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--issues', required=True, help='cv_label_issues.csv or label_issues.csv')
  ap.add_argument('--manifest', default='', help='the CSV manifest the run read')
  ap.add_argument('--folder', default='', help='or the image folder of class directories')
  ap.add_argument('--out', default='', help='default: <manifest>.relabelled.csv beside it')
  ap.add_argument('--host', default='127.0.0.1')
  ap.add_argument('--port', type=int, default=8000)
  args = ap.parse_args(argv)
  loopback = args.host in LOOPBACK
  try:   # the inputs first: a file that cannot be read is no fault of the port
    app = create_app(args.issues, args.manifest, args.out, folder=args.folder,
                     hosts=LOOPBACK if loopback else None)
  except UserError as e:
    print(f'Error: {e}', file=sys.stderr)
    return 2
  except OSError as e:
    print(f'Error: cannot read {e.filename or "the list or the manifest"} ({e.strerror or e}); '
          'give a readable --issues list and --manifest (or --folder).', file=sys.stderr)
    return 2
  try:
    sock = socket.create_server((args.host, args.port))
  except OSError as e:
    print(f'Error: cannot listen on {args.host}:{args.port} ({e.strerror or e}); choose another '
          '--port (0 = any free port) or --host.', file=sys.stderr)
    return 2
  import uvicorn
  host, port = sock.getsockname()[:2]
  if not loopback:
    print(f'Warning: --host={args.host} lets other machines open the page, and it writes '
          f'{args.out or "the relabelled copy"}: serve it on a network you trust.', flush=True)
  print(f'Label review: http://{host}:{port}/ (Ctrl-C to stop)', flush=True)
  uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False,
                                lifespan='off')).run(sockets=[sock])
  return 0


if __name__ == '__main__':
  sys.exit(main())
