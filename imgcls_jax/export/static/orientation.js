// An image's orientation as PIL reads it (Image.getexif, exif_transpose): the EXIF and XMP
// readers, a JPEG's and a WebP's metadata, and transpose, which turns the pixels upright.
import {ascii, latin1, startsWith} from './bytes.js';

const TIFF_HEADS = ['II*\0', 'MM\0*', 'II\0*', 'MM*\0'];   // PIL's (but BigTIFF's, which fail)

// Tag 0x0112 of IFD0 of an EXIF block (a TIFF header, either byte order, after the 'Exif\0\0'
// that PIL strips, once or twice), as PIL's Exif.load reads it: undefined without it (an empty
// block, an IFD or entries past the end: PIL warns and keeps the tags read), 0 (PIL: no transpose)
// for a value that is not one SHORT or LONG. Throws where PIL cannot parse the block (no TIFF
// header): predict then ignores the block, with a warning.
function exifOrientation(b) {
  let at = 0;
  while (at < 12 && startsWith(b.subarray(at), 'Exif\0\0')) at += 6;
  if (at === b.length) return undefined;
  const head = ascii(b.subarray(at, at + 4));
  if (!TIFF_HEADS.includes(head) || b.length - at < 8) throw new Error('not TIFF');
  const view = new DataView(b.buffer, b.byteOffset + at, b.length - at);
  const little = head.startsWith('II');
  const ifd = view.getUint32(4, little);
  if (ifd + 2 > view.byteLength) return undefined;
  for (let i = 0, n = view.getUint16(ifd, little); i < n; i++) {
    const e = ifd + 2 + 12 * i;
    if (e + 12 > view.byteLength) return undefined;
    if (view.getUint16(e, little) !== 0x0112 || view.getUint32(e + 4, little) === 0) continue;
    const type = view.getUint16(e + 2, little);
    if (view.getUint32(e + 4, little) !== 1) return 0;
    return type === 3 ? view.getUint16(e + 8, little) :
        type === 4 ? view.getUint32(e + 8, little) : 0;
  }
  return undefined;
}

// PIL's orientation of an image (Image.getexif, which exif_transpose reads) from its EXIF block
// and XMP text: the block's tag, else XMP's tiff:Orientation, else 1. A block PIL cannot parse
// counts as none (images.decode ignores it, with a warning). {orientation, fromExif, damaged}.
export function pilOrientation(exif, xmp) {
  let tag, damaged = false;
  try {
    tag = exif ? exifOrientation(exif) : undefined;
  } catch (e) {
    damaged = true;
  }
  if (tag !== undefined) return {orientation: tag, fromExif: true, damaged};
  const m = /tiff:Orientation(="|>)([0-9])/.exec(xmp || '');
  return {orientation: m ? +m[2] : 1, fromExif: false, damaged};
}

// A WebP's orientation as PIL's exif_transpose reads it: its EXIF chunk's tag, else XMP's
// tiff:Orientation, each chunk only where the VP8X header flags it (libwebp's rule). Chromium
// ignores a WebP's orientation (it turns JPEGs and PNGs itself), so the page turns it, and hides
// the EXIF chunk (renamed, flag cleared) from the browser lest one that reads it turn it twice.
// {source: what the browser decodes, turn: the page's turn after it, damaged}.
export function webpOrientation(file, bytes) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.length);
  const flags = bytes[20];
  let exif, xmp, hidden = false;
  for (let at = 12, size; at + 8 <= bytes.length; at += 8 + size + (size & 1)) {
    size = view.getUint32(at + 4, true);
    const id = ascii(bytes.subarray(at, at + 4));
    const body = bytes.subarray(at + 8, at + 8 + size);
    if (id === 'EXIF') {
      if (flags & 0x08) exif = body;
      bytes.set([120, 120, 120, 120], at);   // 'xxxx': an unknown chunk, which decoders skip
      hidden = true;
    } else if (id === 'XMP ' && flags & 0x04) {
      xmp = latin1(body);
    }
  }
  bytes[20] &= ~0x08;
  const {orientation, damaged} = pilOrientation(exif, xmp);
  return {source: hidden ? new Blob([bytes]) : file, turn: orientation, damaged};
}

// A JPEG's EXIF block (its APP1 'Exif' segments, joined as PIL joins them) and XMP text (APP1
// 'http://ns.adobe.com/xap/1.0/', the last one), from the segments before the image data.
function jpegMetadata(bytes) {
  let exif, xmp;
  for (let at = 2; at + 4 <= bytes.length && bytes[at] === 0xff;) {
    const marker = bytes[at + 1];
    if (marker === 0xff) {   // fill byte
      at++;
      continue;
    }
    if (marker === 0xda || marker === 0xd9) break;   // start of scan, end of image
    if (marker === 0x01 || (marker >= 0xd0 && marker <= 0xd8)) {   // markers without a length
      at += 2;
      continue;
    }
    const length = (bytes[at + 2] << 8) | bytes[at + 3];
    const body = bytes.subarray(at + 4, at + 2 + length);
    if (marker === 0xe1 && startsWith(body, 'Exif\0\0')) {
      exif = exif ? new Uint8Array([...exif, ...body.subarray(6)]) : body;
    } else if (marker === 0xe1 && startsWith(body, 'http://ns.adobe.com/xap/1.0/\0')) {
      xmp = latin1(body.subarray(body.indexOf(0) + 1));
    }
    at += 2 + length;
  }
  return {exif, xmp};
}

// A JPEG's orientation: the browser turns it by its EXIF tag; where PIL takes XMP's instead (no
// tag, or a block PIL cannot parse), the page turns it by that. {source, turn, damaged}.
export function jpegOrientation(file, bytes) {
  const {exif, xmp} = jpegMetadata(bytes);
  const {orientation, fromExif, damaged} = pilOrientation(exif, xmp);
  return {source: file, turn: fromExif ? 1 : orientation, damaged};
}

// PIL's exif_transpose for orientation o (2-8; any other: none) of RGBA pixels [h][w]: a
// transpose for 5-8, then mirrored across, down, or both; pixels moved, not resampled.
export function transpose(rgba, h, w, o) {
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
