import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { before, test } from 'node:test';

import { Artifact, SignatureError, keyId, loadPublicKey, verifySignature } from '../src/index.js';
import { BUNDLE_SIGNATURE, MANIFEST_SIGNATURE } from '../src/contract.js';
import { python, REPO, tempDir } from './helpers.js';

// Keys, a small artifact folder and a signed bundle.json made by the Python side (qwen_edge.signing).
const MAKE = String.raw`
import hashlib, json, sys
from pathlib import Path
from qwen_edge.artifact import FORMAT, FORMAT_VERSION
from qwen_edge.signing import generate_key, key_id, load_private_key, sign, sign_artifact
root = Path(sys.argv[1])
ids = {n: generate_key(root / n)[2] for n in ("good", "other")}
art = root / "art"
art.mkdir()
files = {"model.onnx": b"graph", "model.onnx.data": b"weights" * 10, "tokenizer.json": b"{}",
         "tokenizer_config.json": b"{}"}
for name, data in files.items():
    (art / name).write_bytes(data)
model = {"family": "qwen2", "num_layers": 2, "num_kv_heads": 2, "head_dim": 8, "vocab_size": 16,
         "context_length": 256, "eos_token_ids": [1]}
manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": model,
            "files": {n: {"size": len(d), "sha256": hashlib.sha256(d).hexdigest()} for n, d in files.items()}}
(art / "manifest.json").write_text(json.dumps(manifest, ensure_ascii=False) + "\n")
sign_artifact(art, load_private_key(root / "good"))
meta = '{"format": "qwen-edge-bundle", "note": "caf\u00e9"}\n'.encode()
(root / "bundle.json").write_bytes(meta)
(root / "bundle.sig").write_bytes(sign(load_private_key(root / "good"), "bundle.json", meta))
print(json.dumps(ids))
`;

let dir;
let ids;
before(() => {
  dir = tempDir('qwen-edge-js-sign-');
  const out = execFileSync(python(), ['-c', MAKE, dir], { cwd: REPO, encoding: 'utf8' });
  ids = JSON.parse(out.trim().split('\n').pop());
});

const pub = (name) => path.join(dir, `${name}.pub`);

test('key ids agree with the Python side', () => {
  assert.equal(keyId(loadPublicKey(pub('good'))), ids.good);
  assert.equal(keyId(loadPublicKey(readFileSync(pub('other'), 'utf8'))), ids.other);
});

test('a signed artifact opens with its key and fails with any other', async () => {
  const art = await Artifact.open(path.join(dir, 'art'), { trustedKeys: [pub('good')] });
  assert.equal(art.signedBy, ids.good);
  await assert.rejects(
    Artifact.open(path.join(dir, 'art'), { trustedKeys: [pub('other')] }),
    (e) => e instanceof SignatureError && e.message.includes('not by a trusted key') && !e.message.includes('\n'),
  );
  assert.equal((await Artifact.open(path.join(dir, 'art'))).signedBy, null);
});

test('a signed bundle.json verifies with its key, and altered bytes or another key fail', () => {
  const meta = readFileSync(path.join(dir, 'bundle.json'));
  const sig = readFileSync(path.join(dir, BUNDLE_SIGNATURE));
  assert.equal(verifySignature(meta, sig, 'bundle.json', [pub('good')], 'b.zip'), ids.good);
  assert.throws(() => verifySignature(meta, sig, 'bundle.json', [pub('other')], 'b.zip'), /not by a trusted key/);
  const altered = Buffer.from(meta);
  altered[altered.length - 2] ^= 1;
  assert.throws(() => verifySignature(altered, sig, 'bundle.json', [pub('good')], 'b.zip'), /altered after signing/);
  assert.throws(() => verifySignature(meta, sig, 'manifest.json', [pub('good')], 'b.zip'), /signature is of "bundle.json"/);
  assert.throws(() => verifySignature(meta, null, 'bundle.json', [pub('good')], 'b.zip'), /is not signed/);
  assert.throws(() => verifySignature(meta, Buffer.from('{}'), 'bundle.json', [pub('good')], 'b.zip'), /malformed/);
});

test('a rewritten manifest or a bad key is a one-line SignatureError', async () => {
  const art = tempDir('qwen-edge-js-sign-art-');
  execFileSync('cp', ['-r', `${path.join(dir, 'art')}/.`, art]);
  const manifest = JSON.parse(readFileSync(path.join(art, 'manifest.json'), 'utf8'));
  manifest.model.context_length = 512;
  writeFileSync(path.join(art, 'manifest.json'), JSON.stringify(manifest));
  await assert.rejects(Artifact.open(art, { trustedKeys: [pub('good')] }), /altered after signing/);
  writeFileSync(path.join(art, MANIFEST_SIGNATURE), 'junk');
  await assert.rejects(Artifact.open(art, { trustedKeys: [pub('good')] }), /signature file is malformed/);
  assert.throws(() => loadPublicKey(path.join(dir, 'good')), SignatureError); // the private key
  assert.throws(() => loadPublicKey(path.join(dir, 'missing.pub')), /cannot be read/);
});
