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

// The image as the model's uint8 input [H, W, C], made as --mode=predict makes it: decoded by the
// browser, upright (EXIF), colours as stored (no colour management, as PIL reads them), converted
// to grey or RGB, then resized with PIL's filters; with the notes of ``caveats`` (where it may
// differ from predict's).
async function pixels(file, [h, w, c]) {
  const bitmap = await createImageBitmap(file, {colorSpaceConversion: 'none',
                                                premultiplyAlpha: 'none'});
  const [ih, iw] = [bitmap.height, bitmap.width];
  const canvas = document.createElement('canvas');
  canvas.width = iw;
  canvas.height = ih;
  const ctx = canvas.getContext('2d', {willReadFrequently: true});
  ctx.drawImage(bitmap, 0, 0);   // its own size: no resampling by the browser
  bitmap.close();
  const rgba = ctx.getImageData(0, 0, iw, ih).data;
  const notes = await caveats(file, rgba);
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
  const meta = await (await fetch('model.json')).json();
  const session = await ort.InferenceSession.create('model.onnx',
                                                    {executionProviders: ['wasm']});
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
          result = {file: file.name, error: `Cannot classify this file: ${e.message || e}`};
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
