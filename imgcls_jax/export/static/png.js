// PNG decoding as PIL decodes it (the page decodes still PNGs itself): inflate, CRCs, the
// chunks and their text (EXIF, XMP), the filters and interlacing, and decodePng.
import {DAMAGED, Undecodable, ascii, latin1} from './bytes.js';
import {pilOrientation} from './orientation.js';

// zlib data (DecompressionStream's 'deflate') inflated as far as it goes, and no further than
// ``need`` bytes (PIL stops there too: a bad checksum or junk after them is not seen).
async function inflate(data, need = Infinity) {
  const reader = new Blob([data]).stream().pipeThrough(new DecompressionStream('deflate'))
      .getReader();
  const parts = [];
  let got = 0;
  try {
    while (got < need) {
      const {done, value} = await reader.read();
      if (done) break;
      parts.push(value);
      got += value.length;
    }
  } catch (e) {
    // damaged or cut short: what came before is kept
  }
  reader.cancel().catch(() => {});
  const out = new Uint8Array(got);
  parts.reduce((at, p) => (out.set(p, at), at + p.length), 0);
  return out;
}

const CRC_TABLE = Array.from({length: 256}, (_, n) => {
  for (let k = 0; k < 8; k++) n = n & 1 ? 0xedb88320 ^ (n >>> 1) : n >>> 1;
  return n >>> 0;
});
const crc32 = (bytes) => ~bytes.reduce((c, b) => CRC_TABLE[(c ^ b) & 0xff] ^ (c >>> 8), ~0) >>> 0;

// PIL's modes of PNG (colour type, bit depth): samples per pixel; other pairs PIL refuses.
const PNG_SAMPLES = {'0,1': 1, '0,2': 1, '0,4': 1, '0,8': 1, '0,16': 1, '2,8': 3, '2,16': 3,
                     '3,1': 1, '3,2': 1, '3,4': 1, '3,8': 1, '4,8': 2, '4,16': 2, '6,8': 4,
                     '6,16': 4};
const ADAM7 = [[0, 0, 8, 8], [4, 0, 8, 8], [0, 4, 4, 8], [2, 0, 4, 4], [0, 2, 2, 4], [1, 0, 2, 2],
               [0, 1, 1, 2]];   // interlaced passes: [x0, y0, dx, dy]

const nul = (b, from = 0) => b.indexOf(0, from);

// A PNG's chunks as PIL reads them (CRCs checked before the image data; text chunks into ``info``
// under their keywords, a tEXt 'exif' as bytes, an eXIf chunk as 'exif'; an iTXt XMP also as
// 'xmp'). Throws Undecodable where PIL refuses the file.
async function pngChunks(bytes) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.length);
  const idat = [], info = {};
  let header, palette, animated = false;
  for (let at = 8; at + 8 <= bytes.length;) {
    const size = view.getUint32(at), id = ascii(bytes.subarray(at + 4, at + 8));
    const body = bytes.subarray(at + 8, at + 8 + size);
    if (id !== 'IDAT' && !idat.length && (at + 12 + size > bytes.length ||
        crc32(bytes.subarray(at + 4, at + 8 + size)) !== view.getUint32(at + 8 + size))) {
      throw new Undecodable(DAMAGED);   // (PIL checks no CRC from the image data on)
    }
    at += 12 + size;
    const text = id === 'tEXt' || id === 'zTXt' || id === 'iTXt';   // keyword, NUL, the rest
    const k = text ? latin1(body.subarray(0, nul(body) < 0 ? body.length : nul(body))) : '';
    const v = text ? body.subarray(nul(body) < 0 ? body.length : nul(body) + 1) : body;
    if (id === 'IDAT') {
      idat.push(body);
    } else if (body.length < size) {   // cut short after the image data
      break;
    } else if (id === 'IHDR') {
      const d = new DataView(body.buffer, body.byteOffset, body.length);
      header = {width: d.getUint32(0), height: d.getUint32(4), depth: body[8], type: body[9],
                interlaced: body[12] !== 0};
    } else if (id === 'PLTE') {
      palette = body;
    } else if (id === 'acTL') {
      animated = true;
    } else if (id === 'eXIf') {
      info.exif = new Uint8Array([...new TextEncoder().encode('Exif\0\0'), ...body]);
    } else if (id === 'tEXt' && k) {
      info[k] = k === 'exif' ? v : latin1(v);
    } else if (id === 'zTXt') {
      if (v.length && v[0] !== 0) throw new Undecodable(DAMAGED);   // PIL: unknown compression
      if (k) info[k] = latin1(await inflate(v.subarray(1)));
    } else if (id === 'iTXt' && nul(body) >= 0 && v.length >= 2) {
      const lang = nul(v, 2), key = lang < 0 ? -1 : nul(v, lang + 1);
      if (key < 0 || (v[0] !== 0 && v[1] !== 0)) continue;
      const value = v[0] !== 0 ? await inflate(v.subarray(key + 1)) : v.subarray(key + 1);
      if (k === 'XML:com.adobe.xmp') info.xmp = latin1(value);
      try {
        const utf8 = new TextDecoder('utf-8', {fatal: true});
        utf8.decode(v.subarray(2, lang));
        utf8.decode(v.subarray(lang + 1, key));
        info[k] = utf8.decode(value);
      } catch (e) {
        // PIL keeps no text that is not UTF-8
      }
    } else if (id === 'IEND') {
      break;
    }
  }
  if (!header || !idat.length) throw new Undecodable(DAMAGED);
  return {header, palette, idat, info, animated};
}

const UNPARSABLE = new Uint8Array([0]);   // an EXIF block that no parse accepts

// PIL's EXIF block of a PNG: 'exif' (an eXIf chunk, or a tEXt so named), else the hex of a 'Raw
// profile type exif' text (ImageMagick's); undefined without one.
function pngExif(info) {
  if (info.exif !== undefined) return typeof info.exif === 'string' ? UNPARSABLE : info.exif;
  const raw = info['Raw profile type exif'];
  if (raw === undefined) return undefined;
  const hex = raw.split('\n').slice(3).join('');   // bytes.fromhex: whitespace between bytes
  if (!/^([ \t\n\r\f\v]*[0-9a-fA-F]{2})*[ \t\n\r\f\v]*$/.test(hex)) return UNPARSABLE;
  return new Uint8Array((hex.match(/[0-9a-fA-F]{2}/g) || []).map((h) => parseInt(h, 16)));
}

// A PNG decoded as PIL decodes it, which a browser cannot do: the colour stored under transparent
// pixels kept (a canvas keeps colours premultiplied by alpha), 16-bit grey to 8 bits as v // 257
// (images.decode) and other 16-bit samples by their high byte (PIL's 'RGB;16B' and the like),
// grey of 1, 2 or 4 bits scaled to 0-255, colour from the palette (indices past it black), no
// colour management, turned upright as PIL turns it (its EXIF, or XMP, orientation). RGBA as a
// canvas gives it {rgba, height, width, orientation, damaged}; null where the browser decodes it
// (no DecompressionStream, an animated PNG); throws Undecodable where PIL refuses it.
export async function decodePng(bytes) {
  if (typeof DecompressionStream === 'undefined' || bytes.length < 8 ||
      ![137, 80, 78, 71, 13, 10, 26, 10].every((b, i) => bytes[i] === b)) {
    return null;
  }
  const {header, palette, idat, info, animated} = await pngChunks(bytes);
  if (animated) return null;
  const {width: w, height: h, depth, type, interlaced} = header;
  const samples = PNG_SAMPLES[`${type},${depth}`];
  if (!samples || !w || !h) throw new Undecodable(DAMAGED);
  const bpp = Math.max(1, (samples * depth) >> 3);   // bytes per pixel, for the filters
  const passes = (interlaced ? ADAM7 : [[0, 0, 1, 1]]).map(([x0, y0, dx, dy]) => (
    {x0, y0, dx, dy, w: Math.ceil((w - x0) / dx), h: Math.ceil((h - y0) / dy)}))
      .filter((p) => p.w > 0 && p.h > 0);
  const need = passes.reduce((n, p) => n + p.h * (1 + Math.ceil(p.w * samples * depth / 8)), 0);
  const data = await inflate(new Blob(idat), need);
  if (data.length < need) throw new Undecodable(DAMAGED);   // PIL: the image file is truncated
  const rgba = new Uint8ClampedArray(w * h * 4);
  const max = (1 << depth) - 1;
  let at = 0;
  for (const p of passes) {
    const stride = Math.ceil(p.w * samples * depth / 8);
    let prior = new Uint8Array(stride);
    for (let y = 0; y < p.h; y++) {
      const filter = data[at];
      const row = data.slice(at + 1, at + 1 + stride);
      at += 1 + stride;
      if (filter > 4) throw new Undecodable(DAMAGED);
      for (let i = 0; i < stride && filter; i++) {
        const a = i >= bpp ? row[i - bpp] : 0, b = prior[i], c = i >= bpp ? prior[i - bpp] : 0;
        if (filter === 1) {
          row[i] += a;
        } else if (filter === 2) {
          row[i] += b;
        } else if (filter === 3) {
          row[i] += (a + b) >> 1;
        } else if (filter === 4) {
          const pa = Math.abs(b - c), pb = Math.abs(a - c), pc = Math.abs(a + b - 2 * c);
          row[i] += pa <= pb && pa <= pc ? a : pb <= pc ? b : c;
        }
      }
      prior = row;
      const sample = depth === 16 ? (x, s) => row[2 * (x * samples + s)] :   // the high byte
          depth === 8 ? (x, s) => row[x * samples + s] :
          (x) => (row[(x * depth) >> 3] >> (8 - depth - ((x * depth) & 7))) & max;
      for (let x = 0; x < p.w; x++) {
        const o = 4 * ((p.y0 + y * p.dy) * w + p.x0 + x * p.dx);
        let r, g, bl, al = 255;
        if (type === 3) {
          const i = 3 * sample(x, 0);
          [r, g, bl] = i + 3 <= (palette || []).length ? palette.subarray(i, i + 3) : [0, 0, 0];
        } else if (type === 0) {   // PIL's 'I;16' (images.decode: v // 257), '1', 'L;2', 'L;4'
          r = g = bl = depth === 16 ? ((row[2 * x] << 8) | row[2 * x + 1]) / 257 | 0 :
              sample(x, 0) * 255 / max;
        } else if (type === 4) {
          r = g = bl = sample(x, 0);
          al = sample(x, 1);
        } else {
          [r, g, bl] = [sample(x, 0), sample(x, 1), sample(x, 2)];
          if (type === 6) al = sample(x, 3);
        }
        rgba[o] = r; rgba[o + 1] = g; rgba[o + 2] = bl; rgba[o + 3] = al;
      }
    }
  }
  const xmp = info['XML:com.adobe.xmp'] || info.xmp;
  const {orientation, damaged} = pilOrientation(pngExif(info), xmp);
  return {rgba, height: h, width: w, orientation, damaged};
}
