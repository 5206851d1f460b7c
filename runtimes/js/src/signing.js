/**
 * Ed25519 signatures of artifacts (manifest.json) and bundles (bundle.json), checked with node:crypto.
 *
 * The same format as runtimes/qwen_edge/signing.py: a JSON signature document in a detached file
 * (contract.MANIFEST_SIGNATURE / BUNDLE_SIGNATURE) over the signed file's exact bytes, prefixed by
 * contract.SIGNATURE_CONTEXT and the file's name; public keys are the PEM files `qwen-edge keygen` writes.
 */

import { createHash, createPublicKey, verify } from 'node:crypto';
import { readFileSync, statSync } from 'node:fs';

import {
  SIGNATURE_ALGORITHM, SIGNATURE_CONTEXT, SIGNATURE_FORMAT, SIGNATURE_VERSION,
} from './contract.js';
import { QwenEdgeError } from './errors.js';

const MAX_KEY_BYTES = 64 << 10;
export const MAX_SIGNATURE_BYTES = 64 << 10;

/** A missing, malformed or wrong signature, or an unusable key. */
export class SignatureError extends QwenEdgeError {}

/** First 16 hex digits of the sha256 of the raw 32-byte public key (what signing.py's key_id gives). */
export function keyId(publicKey) {
  const raw = Buffer.from(publicKey.export({ format: 'jwk' }).x, 'base64url');
  return createHash('sha256').update(raw).digest('hex').slice(0, 16);
}

/** A public KeyObject from a PEM string/Buffer, a file path, or a KeyObject. */
export function loadPublicKey(key) {
  if (typeof key === 'object' && key?.type === 'public') return checkEd25519(key, 'the key');
  let pem = key;
  let where = 'the key';
  if (typeof key === 'string' && !key.includes('-----BEGIN')) {
    where = key;
    try {
      if (statSync(key).size > MAX_KEY_BYTES) throw new SignatureError(`${key} is not a public key file (too large)`);
      pem = readFileSync(key);
    } catch (e) {
      if (e instanceof SignatureError) throw e;
      throw new SignatureError(`public key ${key} cannot be read (${e.code ?? e.message}); check the path`);
    }
  }
  // createPublicKey would derive the public key from a private one: refuse it, a private key must not ship
  if (String(pem).includes('PRIVATE KEY')) {
    throw new SignatureError(`${where} is a private key; pass the .pub file, never the private key`);
  }
  let publicKey;
  try {
    publicKey = createPublicKey({ key: pem, format: 'pem' });
  } catch {
    throw new SignatureError(`${where} is not a PEM public key; pass the .pub file \`qwen-edge keygen\` wrote`);
  }
  return checkEd25519(publicKey, where);
}

function checkEd25519(key, where) {
  if (key.asymmetricKeyType !== 'ed25519') {
    throw new SignatureError(`${where} is not an Ed25519 public key; make one with \`qwen-edge keygen\``);
  }
  return key;
}

function message(signedName, data) {
  return Buffer.concat([Buffer.from(SIGNATURE_CONTEXT, 'utf8'), Buffer.from(`${signedName}\n`, 'utf8'), data]);
}

/**
 * Check that `signatureDoc` (bytes of a signature file, or null) signs `data` (the bytes of `signedName`) with
 * one of `trustedKeys` (paths, PEM text or KeyObjects); returns the key id. Throws SignatureError naming `where`.
 */
export function verifySignature(data, signatureDoc, signedName, trustedKeys, where) {
  const keys = trustedKeys.map(loadPublicKey);
  if (signatureDoc == null) {
    throw new SignatureError(`${where} is not signed and a trusted key is required; sign it with --sign KEY`);
  }
  let doc = null;
  let raw = Buffer.alloc(0);
  try {
    doc = JSON.parse(Buffer.from(signatureDoc).toString('utf8'));
    const ok = doc && typeof doc === 'object' && !Array.isArray(doc) && doc.format === SIGNATURE_FORMAT
      && doc.version === SIGNATURE_VERSION && doc.algorithm === SIGNATURE_ALGORITHM
      && typeof doc.signature === 'string' && /^[A-Za-z0-9+/]*={0,2}$/.test(doc.signature);
    if (ok) raw = Buffer.from(doc.signature, 'base64');
  } catch {
    // reported below
  }
  if (raw.length !== 64) {
    throw new SignatureError(`${where}: the signature file is malformed; sign it again with --sign KEY`);
  }
  if (doc.signed !== signedName) {
    throw new SignatureError(`${where}: the signature is of ${JSON.stringify(String(doc.signed).slice(0, 60))}, not ${signedName}; sign it again`);
  }
  const msg = message(signedName, Buffer.from(data));
  for (const key of keys) {
    if (verify(null, msg, key, raw)) return keyId(key);
  }
  throw new SignatureError(
    `${where} is signed by key ${JSON.stringify(String(doc.key_id).slice(0, 16))}, not by a trusted key `
      + `(${keys.map(keyId).join(', ')}), or was altered after signing; do not use it`,
  );
}

/** The bytes of a signature file, or null when there is none. */
export function readSignature(file) {
  let size;
  try {
    size = statSync(file).size;
  } catch (e) {
    if (e.code === 'ENOENT') return null;
    throw new SignatureError(`${file} cannot be read (${e.code ?? e.message})`);
  }
  if (size > MAX_SIGNATURE_BYTES) throw new SignatureError(`${file} is too large to be a signature; sign again`);
  return readFileSync(file);
}
