// The export's web page: classifies the chosen images in the browser with onnxruntime-web
// (WebAssembly, one thread) running model.onnx; the decision rules come from model.json.
import * as ort from './ort/ort.bundle.js';

const $ = (id) => document.getElementById(id);
ort.env.wasm.numThreads = 1;   // no SharedArrayBuffer, so no cross-origin isolation headers

// PIL's conversion to grey (ITU-R 601-2 luma in fixed point, rounded): predict's bytes.
const luma = (r, g, b) => (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16;

// The image as the model's uint8 input [H, W, C]: upright (EXIF), resized by the browser when it
// is not already the input size, colours as stored (no colour management, as PIL reads them).
async function pixels(file, [h, w, c]) {
  const bitmap = await createImageBitmap(file, {colorSpaceConversion: 'none',
                                                premultiplyAlpha: 'none'});
  const canvas = document.createElement('canvas');
  canvas.width = w;
  canvas.height = h;
  const ctx = canvas.getContext('2d', {willReadFrequently: true});
  ctx.imageSmoothingQuality = 'high';
  ctx.drawImage(bitmap, 0, 0, w, h);
  bitmap.close();
  const rgba = ctx.getImageData(0, 0, w, h).data;
  const out = new Uint8Array(h * w * c);
  for (let i = 0; i < h * w; i++) {
    const r = rgba[4 * i], g = rgba[4 * i + 1], b = rgba[4 * i + 2];
    if (c === 1) {
      out[i] = luma(r, g, b);
    } else {
      out[3 * i] = r; out[3 * i + 1] = g; out[3 * i + 2] = b;
    }
  }
  return out;
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
    cell('answer').textContent = result.answer;
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
  let queue = Promise.resolve();
  const classify = (files) => {
    for (const file of files) {
      queue = queue.then(async () => {
        let result;
        try {
          const data = await pixels(file, meta.input_shape);
          const out = await session.run({images: new ort.Tensor('uint8', data, [1, h, w, c])});
          result = {file: file.name, probabilities: Array.from(out.probabilities.data),
                    logits: Array.from(out.logits.data)};
          Object.assign(result, decide(meta, result.probabilities, result.logits));
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
