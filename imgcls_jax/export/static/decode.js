// A chosen file to the model's input: decoded (a still PNG by png.js, others by the browser),
// turned upright, converted and resized as --mode=predict does it (pixels), with the notes of
// where the browser's decoding may differ from PIL's (caveats).
import {DAMAGED, Undecodable, ascii} from './bytes.js';
import {jpegOrientation, transpose, webpOrientation} from './orientation.js';
import {BILINEAR, BOX, luma, resample} from './pillow.js';
import {decodePng} from './png.js';

// Why the browser could not decode ``file``, and what to do: predict and serve (PIL) also read
// TIFF (BigTIFF too) and PNM, which browsers (but Safari's TIFF) do not decode.
async function undecodable(file) {
  const head = ascii(new Uint8Array(await file.slice(0, 4).arrayBuffer()));
  const format = /^(II[*+]\0|MM\0[*+])/.test(head) ? 'TIFF' :
      /^P[1-6]\s/.test(head) ? 'PNM (PBM, PGM, PPM)' : '';
  return new Undecodable(format ?
      `This browser cannot decode ${format} images: convert the file to PNG or JPEG, or ` +
      'classify it with --mode=predict or --mode=serve, which read them.' :
      DAMAGED);
}

// The image as the browser decodes it (a JPEG, or a PNG the page leaves to it, turned by its EXIF
// tag; a WebP not), with the page's turn after (an animated PNG's XMP orientation is not read):
// {rgba, height, width, turn, damaged}.
async function browserDecode(file, bytes) {
  const head = ascii(bytes.subarray(0, 16));
  const {source, turn, damaged} =
      head.slice(0, 4) === 'RIFF' && head.slice(8) === 'WEBPVP8X' ? webpOrientation(file, bytes) :
      bytes[0] === 0xff && bytes[1] === 0xd8 ? jpegOrientation(file, bytes) :
      {source: file, turn: 1, damaged: false};
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
  const rgba = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
  return {rgba, height: canvas.height, width: canvas.width, turn, damaged};
}

// The image as the model's uint8 input [H, W, C], made as --mode=predict makes it: decoded (a PNG
// by the page, as PIL decodes it; others by the browser), upright as PIL's exif_transpose turns
// it, colours as stored (no colour management, as PIL reads them), converted to grey or RGB,
// then resized with PIL's filters; with the notes of ``caveats`` (where it may differ from
// predict's).
export async function pixels(file, [h, w, c]) {
  const bytes = new Uint8Array(await file.arrayBuffer());
  const png = await decodePng(bytes);
  const decoded = png ? {...png, turn: png.orientation} : await browserDecode(file, bytes);
  const notes = png ? [] : caveats(bytes, decoded.rgba);
  if (decoded.damaged) {
    notes.push('Its EXIF block is damaged and is ignored, as --mode=predict ignores it: if the ' +
               'image is on its side, turn the file upright.');
  }
  const [rgba, ih, iw] = transpose(decoded.rgba, decoded.height, decoded.width, decoded.turn);
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

// Where the browser cannot give the pixels PIL reads (the page decodes still PNGs itself): a canvas
// keeps colours premultiplied by alpha, so a transparent pixel's stored colour is lost (PIL drops
// alpha and keeps that colour), and the browser reduces a 16-bit image to 8 bits its own way.
function caveats(bytes, rgba) {
  const notes = [];
  for (let i = 3; i < rgba.length; i += 4) {
    if (rgba[i] !== 255) {
      notes.push('It has transparent pixels, whose stored colour the browser does not give: the ' +
                 'answer can differ from --mode=predict\'s.');
      break;
    }
  }
  const png = [137, 80, 78, 71, 13, 10, 26, 10].every((b, i) => bytes[i] === b);
  if (png && bytes[24] === 16) {
    notes.push('It is a 16-bit PNG, which the browser reduces to 8 bits its own way: the answer ' +
               'can differ slightly from --mode=predict\'s.');
  }
  return notes;
}
