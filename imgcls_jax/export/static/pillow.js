// PIL's (Pillow's) arithmetic, so the page makes --mode=predict's bytes: its grey (luma) and
// its resampling (the filters' coefficients, resample).

// PIL's conversion to grey (ITU-R 601-2 luma in fixed point, rounded): predict's bytes.
export const luma = (r, g, b) => (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16;

// PIL's resampling of 8-bit images (Pillow's Resample.c), as images.decode resizes: a box filter
// when shrinking, bilinear when enlarging; the horizontal pass first, each pass rounded to 8 bits,
// weights in fixed point of 22 bits. The same arithmetic gives the same bytes.
const PRECISION_BITS = 22;
export const BOX = {support: 0.5, filter: (x) => (x > -0.5 && x <= 0.5 ? 1 : 0)};
export const BILINEAR = {support: 1, filter: (x) => (Math.abs(x) < 1 ? 1 - Math.abs(x) : 0)};

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
export function resample(src, h, w, c, outH, outW, kind) {
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
