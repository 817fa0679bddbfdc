// The export's web page: classifies the chosen images in the browser with onnxruntime-web
// (WebAssembly, one thread) running model.onnx; the decision rules come from model.json.
import * as ort from './ort/ort.bundle.js';
import {Undecodable} from './bytes.js';
import {pixels} from './decode.js';

const $ = (id) => document.getElementById(id);
ort.env.wasm.numThreads = 1;   // no SharedArrayBuffer, so no cross-origin isolation headers

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
