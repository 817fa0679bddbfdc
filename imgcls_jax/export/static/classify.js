// The export's web page: classifies the chosen images in the browser with onnxruntime-web
// (WebAssembly, one thread) running model.onnx; the decision rules come from model.json.
import * as ort from './ort/ort.bundle.js';

const $ = (id) => document.getElementById(id);
ort.env.wasm.numThreads = 1;   // no SharedArrayBuffer, so no cross-origin isolation headers

// PIL's conversion to grey (ITU-R 601-2 luma in fixed point, rounded): predict's bytes.
const luma = (r, g, b) => (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16;

// PIL's resampling of 8-bit images (Pillow's Resample.c), as images.decode resizes: a box filter
// when shrinking, bilinear when enlarging; the horizontal pass first, each pass rounded to 8 bits,
// weights in fixed point of 22 bits. The same arithmetic gives the same bytes.
const PRECISION_BITS = 22;
const BOX = {support: 0.5, filter: (x) => (x > -0.5 && x <= 0.5 ? 1 : 0)};
const BILINEAR = {support: 1, filter: (x) => (Math.abs(x) < 1 ? 1 - Math.abs(x) : 0)};

function coefficients(inSize, outSize, {support, filter}) {
  const scale = inSize / outSize;
  const filterScale = Math.max(scale, 1);
  const reach = support * filterScale;
  const ss = 1 / filterScale;   // multiplied, not divided by: Pillow's rounding
  const taps = [];
  for (let xx = 0; xx < outSize; xx++) {
    const center = (xx + 0.5) * scale;
    const first = Math.max(Math.trunc(center - reach + 0.5), 0);
    const count = Math.min(Math.trunc(center + reach + 0.5), inSize) - first;
    const w = [];
    let sum = 0;
    for (let x = 0; x < count; x++) {
      w.push(filter((x + first - center + 0.5) * ss));
      sum += w[x];
    }
    const fixed = w.map((v) => {
      const k = (sum !== 0 ? v / sum : v) * (1 << PRECISION_BITS);
      return Math.trunc(k < 0 ? k - 0.5 : k + 0.5);
    });
    taps.push({first, fixed});
  }
  return taps;
}

const clip8 = (ss) => Math.min(255, Math.max(0, Math.floor(ss / (1 << PRECISION_BITS))));

// src: Uint8Array [h][w][c]; returns [outH][outW][c].
function resample(src, h, w, c, outH, outW, kind) {
  let data = src;
  if (outW !== w) {
    const taps = coefficients(w, outW, kind);
    const out = new Uint8Array(h * outW * c);
    for (let y = 0; y < h; y++) {
      for (let xx = 0; xx < outW; xx++) {
        const {first, fixed} = taps[xx];
        for (let ch = 0; ch < c; ch++) {
          let ss = 1 << (PRECISION_BITS - 1);
          const row = (y * w + first) * c + ch;
          for (let x = 0; x < fixed.length; x++) ss += data[row + x * c] * fixed[x];
          out[(y * outW + xx) * c + ch] = clip8(ss);
        }
      }
    }
    data = out;
    w = outW;
  }
  if (outH !== h) {
    const taps = coefficients(h, outH, kind);
    const out = new Uint8Array(outH * w * c);
    for (let yy = 0; yy < outH; yy++) {
      const {first, fixed} = taps[yy];
      for (let i = 0; i < w * c; i++) {
        let ss = 1 << (PRECISION_BITS - 1);
        for (let y = 0; y < fixed.length; y++) ss += data[(first + y) * w * c + i] * fixed[y];
        out[yy * w * c + i] = clip8(ss);
      }
    }
    data = out;
  }
  return data;
}

// A file the browser does not decode; its message is the whole line shown in its row.
class Undecodable extends Error {}

const ascii = (bytes) => String.fromCharCode(...bytes);

// Why the browser could not decode ``file``, and what to do: predict and serve (PIL) also read
// TIFF (BigTIFF too) and PNM, which browsers (but Safari's TIFF) do not decode.
async function undecodable(file) {
  const head = ascii(new Uint8Array(await file.slice(0, 4).arrayBuffer()));
  const format = /^(II[*+]\0|MM\0[*+])/.test(head) ? 'TIFF' :
      /^P[1-6]\s/.test(head) ? 'PNM (PBM, PGM, PPM)' : '';
  return new Undecodable(format ?
      `This browser cannot decode ${format} images: convert the file to PNG or JPEG, or ` +
      'classify it with --mode=predict or --mode=serve, which read them.' :
      'This file could not be decoded: it is damaged or not an image.');
}

// Tag 0x0112 of IFD0 of an EXIF block (a TIFF header, either byte order, after the 'Exif\0\0'
// that PIL strips, once or twice); undefined without it, 0 (PIL: no transpose) for a value that
// is not one SHORT or LONG. Throws where PIL cannot read the block (not TIFF, cut short).
function exifOrientation(b) {
  let at = 0;
  while (at < 12 && ascii(b.subarray(at, at + 6)) === 'Exif\0\0') at += 6;
  const order = ascii(b.subarray(at, at + 2));
  if (order !== 'II' && order !== 'MM') throw new Error('not TIFF');
  const view = new DataView(b.buffer, b.byteOffset + at, b.length - at);
  const little = order === 'II';
  const ifd = view.getUint32(4, little);
  for (let i = 0, n = view.getUint16(ifd, little); i < n; i++) {
    const e = ifd + 2 + 12 * i;
    if (view.getUint16(e, little) !== 0x0112) continue;
    const type = view.getUint16(e + 2, little);
    if (view.getUint32(e + 4, little) !== 1) return 0;
    return type === 3 ? view.getUint16(e + 8, little) :
        type === 4 ? view.getUint32(e + 8, little) : 0;
  }
  return undefined;
}

// A WebP's orientation as PIL's exif_transpose reads it: its EXIF chunk's tag, else XMP's
// tiff:Orientation, each chunk only where the VP8X header flags it (libwebp's rule). Chromium
// ignores a WebP's orientation (it turns JPEGs and PNGs itself), so the page turns it, and hides
// the EXIF chunk (renamed, flag cleared) from the browser lest one that reads it turn it twice.
// {source: what to decode, orientation: 1 for none, damaged: an EXIF block PIL refuses}.
async function webpOrientation(file) {
  const head = ascii(new Uint8Array(await file.slice(0, 16).arrayBuffer()));
  if (head.slice(0, 4) !== 'RIFF' || head.slice(8) !== 'WEBPVP8X') {
    return {source: file, orientation: 1};
  }
  const bytes = new Uint8Array(await file.arrayBuffer());
  const view = new DataView(bytes.buffer);
  const flags = bytes[20];
  let exif, xmp, hidden = false, damaged = false;
  for (let at = 12, size; at + 8 <= bytes.length; at += 8 + size + (size & 1)) {
    size = view.getUint32(at + 4, true);
    const id = ascii(bytes.subarray(at, at + 4));
    const body = bytes.subarray(at + 8, at + 8 + size);
    if (id === 'EXIF') {
      try {
        if (flags & 0x08) exif = exifOrientation(body);
      } catch (e) {
        damaged = true;
      }
      bytes.set([120, 120, 120, 120], at);   // 'xxxx': an unknown chunk, which decoders skip
      hidden = true;
    } else if (id === 'XMP ' && flags & 0x04) {
      const m = /tiff:Orientation(="|>)([0-9])/.exec(new TextDecoder('latin1').decode(body));
      if (m) xmp = +m[2];
    }
  }
  bytes[20] &= ~0x08;
  return {source: hidden ? new Blob([bytes]) : file, orientation: exif ?? xmp ?? 1, damaged};
}

// PIL's exif_transpose for orientation o (2-8; any other: none) of RGBA pixels [h][w]: a
// transpose for 5-8, then mirrored across, down, or both; pixels moved, not resampled.
function transpose(rgba, h, w, o) {
  if (!(o >= 2 && o <= 8)) return [rgba, h, w];
  const swap = o >= 5, flipX = [2, 3, 7, 8].includes(o), flipY = [3, 4, 6, 7].includes(o);
  const [oh, ow] = swap ? [w, h] : [h, w];
  const src = new Uint32Array(rgba.buffer, rgba.byteOffset, h * w);
  const out = new Uint8ClampedArray(rgba.length);
  const dst = new Uint32Array(out.buffer);
  for (let y = 0; y < oh; y++) {
    for (let x = 0; x < ow; x++) {
      const sx = swap ? y : x, sy = swap ? x : y;
      dst[y * ow + x] = src[(flipY ? h - 1 - sy : sy) * w + (flipX ? w - 1 - sx : sx)];
    }
  }
  return [out, oh, ow];
}

// The image as the model's uint8 input [H, W, C], made as --mode=predict makes it: decoded by the
// browser, upright (EXIF: the browser's for JPEG and PNG, the page's for WebP), colours as stored
// (no colour management, as PIL reads them), converted to grey or RGB, then resized with PIL's
// filters; with the notes of ``caveats`` (where it may differ from predict's).
async function pixels(file, [h, w, c]) {
  const {source, orientation, damaged} = await webpOrientation(file);
  let bitmap;
  try {
    bitmap = await createImageBitmap(source, {colorSpaceConversion: 'none',
                                              premultiplyAlpha: 'none'});
  } catch (e) {
    throw await undecodable(file);
  }
  const canvas = document.createElement('canvas');
  canvas.width = bitmap.width;
  canvas.height = bitmap.height;
  const ctx = canvas.getContext('2d', {willReadFrequently: true});
  ctx.drawImage(bitmap, 0, 0);   // its own size: no resampling by the browser
  bitmap.close();
  const stored = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
  const notes = await caveats(file, stored);
  if (damaged) {
    notes.push('Its EXIF block is damaged, so which way is up is not known: --mode=predict ' +
               'refuses the file.');
  }
  const [rgba, ih, iw] = transpose(stored, canvas.height, canvas.width, orientation);
  const image = new Uint8Array(ih * iw * c);
  for (let i = 0; i < ih * iw; i++) {
    const r = rgba[4 * i], g = rgba[4 * i + 1], b = rgba[4 * i + 2];
    if (c === 1) {
      image[i] = luma(r, g, b);
    } else {
      image[3 * i] = r; image[3 * i + 1] = g; image[3 * i + 2] = b;
    }
  }
  if (ih === h && iw === w) return {image, notes};
  return {image: resample(image, ih, iw, c, h, w, ih >= h && iw >= w ? BOX : BILINEAR), notes};
}

// Where the browser cannot give the pixels PIL reads: a canvas keeps colours premultiplied by
// alpha, so a transparent pixel's stored colour is lost (PIL drops alpha and keeps that colour),
// and the browser reduces a 16-bit PNG to 8 bits its own way (predict: v // 257).
async function caveats(file, rgba) {
  const notes = [];
  for (let i = 3; i < rgba.length; i += 4) {
    if (rgba[i] !== 255) {
      notes.push('It has transparent pixels, whose stored colour the browser does not give: the ' +
                 'answer can differ from --mode=predict\'s.');
      break;
    }
  }
  const head = new Uint8Array(await file.slice(0, 26).arrayBuffer());
  const png = [137, 80, 78, 71, 13, 10, 26, 10].every((b, i) => head[i] === b);
  if (png && head[24] === 16) {
    notes.push('It is a 16-bit PNG, which the browser reduces to 8 bits its own way: the answer ' +
               'can differ slightly from --mode=predict\'s.');
  }
  return notes;
}

const logSumExp = (xs) => {
  const m = Math.max(...xs);
  return m + Math.log(xs.reduce((s, x) => s + Math.exp(x - m), 0));
};

// One image's answer under the run's rules (the same as --mode=predict's).
function decide(meta, probs, logits) {
  const order = probs.map((p, i) => i).sort((a, b) => probs[b] - probs[a] || a - b);
  const top = order.slice(0, meta.top_k).map(
      (i) => ({class: meta.class_names[i], index: i, probability: probs[i]}));
  const f32 = Math.fround;
  if (meta.task === 'multilabel') {
    const tags = order.filter((i) => f32(probs[i]) >= f32(meta.thresholds[i]))
        .map((i) => meta.class_names[i]);
    return {top, tags, answer: tags.length ? tags.join(', ') : '(no tag)'};
  }
  const result = {top, answer: top[0].class};
  if (meta.min_confidence) {
    result.abstained = !(f32(top[0].probability) >= f32(meta.min_confidence));
    if (result.abstained) result.answer = `not sure (${top[0].class}?)`;
  }
  if (meta.unknown_below !== null && meta.unknown_below !== undefined) {
    result.logsumexp = logSumExp(logits);
    result.unknown = !(f32(result.logsumexp) >= f32(meta.unknown_below));
    if (result.unknown) result.answer = 'none of the classes';
  }
  return result;
}

function row(file, result) {
  const tr = document.createElement('tr');
  const cell = (cls) => {
    const td = document.createElement('td');
    if (cls) td.className = cls;
    tr.appendChild(td);
    return td;
  };
  const img = document.createElement('img');
  img.className = 'thumb';
  img.src = URL.createObjectURL(file);
  cell().appendChild(img);
  cell().textContent = file.name;
  if (result.error) {
    cell('error').textContent = result.error;
    cell();
  } else {
    const answer = cell('answer');
    answer.textContent = result.answer;
    for (const note of result.notes) {
      const p = document.createElement('div');
      p.className = 'note';
      p.textContent = note;
      answer.appendChild(p);
    }
    const list = cell();
    for (const t of result.top) {
      const div = document.createElement('div');
      const bar = document.createElement('span');
      bar.className = 'bar';
      bar.style.width = `${Math.round(100 * t.probability)}px`;
      div.append(bar, `${t.class} ${(100 * t.probability).toFixed(2)}%`);
      list.appendChild(div);
    }
  }
  $('results').tBodies[0].appendChild(tr);
  $('results').hidden = false;
}

async function main() {
  // Revalidated on every load: a model exported again into the same folder is never mixed with
  // the browser's cached copy of the last one (its heuristic freshness reused a stale model.json).
  const fresh = {cache: 'no-cache'};
  const meta = await (await fetch('model.json', fresh)).json();
  const model = new Uint8Array(await (await fetch('model.onnx', fresh)).arrayBuffer());
  const session = await ort.InferenceSession.create(model, {executionProviders: ['wasm']});
  const [h, w, c] = meta.input_shape;
  $('title').textContent = meta.title;
  $('about').textContent = `${meta.class_names.length} classes; input ${h}x${w}, ` +
      `${c === 1 ? 'grey' : 'colour'}; checkpoint step ${meta.checkpoint_step}.`;
  window.imgclsResults = [];   // every answer, in order, for scripts and tests
  window.imgclsPixels = async (file) => Array.from((await pixels(file, meta.input_shape)).image);
  let queue = Promise.resolve();
  const classify = (files) => {
    for (const file of files) {
      queue = queue.then(async () => {
        let result;
        try {
          const {image: data, notes} = await pixels(file, meta.input_shape);
          const out = await session.run({images: new ort.Tensor('uint8', data, [1, h, w, c])});
          result = {file: file.name, probabilities: Array.from(out.probabilities.data),
                    logits: Array.from(out.logits.data)};
          Object.assign(result, decide(meta, result.probabilities, result.logits), {notes});
        } catch (e) {
          result = {file: file.name, error: e instanceof Undecodable ? e.message :
                    `Cannot classify this file: ${e.message || e}`};
        }
        window.imgclsResults.push(result);
        row(file, result);
        $('status').textContent = `Classified ${window.imgclsResults.length} image(s).`;
        $('status').dataset.state = 'done';
      });
    }
  };
  $('file').addEventListener('change', (e) => classify(e.target.files));
  const drop = $('drop');
  drop.addEventListener('dragover', (e) => { e.preventDefault(); drop.classList.add('over'); });
  drop.addEventListener('dragleave', () => drop.classList.remove('over'));
  drop.addEventListener('drop', (e) => {
    e.preventDefault();
    drop.classList.remove('over');
    classify(e.dataTransfer.files);
  });
  $('status').textContent = 'Ready: choose or drop images.';
  $('status').dataset.state = 'ready';
}

main().catch((e) => {
  $('status').textContent = `The model did not load: ${e.message || e}. Serve this folder over ` +
      'HTTP (e.g. python -m http.server), not from file://.';
  $('status').dataset.state = 'error';
});
