// What the page's decoders share: Undecodable and DAMAGED (the error of a file that is not
// decoded, and its usual line), and the byte helpers ascii, latin1 and startsWith.

// A file the browser does not decode; its message is the whole line shown in its row.
export class Undecodable extends Error {}
export const DAMAGED = 'This file could not be decoded: it is damaged or not an image.';

export const ascii = (bytes) => String.fromCharCode(...bytes);

export const latin1 = (bytes) => new TextDecoder('latin1').decode(bytes);
export const startsWith = (bytes, text) => ascii(bytes.subarray(0, text.length)) === text;
