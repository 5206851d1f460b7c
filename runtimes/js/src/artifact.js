/** Open an artifact directory and verify it against its manifest.json (size and sha256 of every file). */

import { createHash } from 'node:crypto';
import { createReadStream, readFileSync, statSync } from 'node:fs';
import path from 'node:path';

import ort from 'onnxruntime-node';

import {
  GENAI_CONFIG, GraphLayout, MANIFEST, MANIFEST_SIGNATURE, MODEL_FILE, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE,
} from './contract.js';
import { ArtifactError, QwenEdgeError } from './errors.js';
import { modelInfo, parseJson, parseManifest } from './manifest.js';
import { createSession, sessionOptions } from './session.js';
import { readSignature, verifySignature } from './signing.js';

export { FORMAT, FORMAT_VERSION } from './contract.js';
const VERIFY_MODES = ['full', 'size', 'none'];

/** Hex sha256 of a file, streamed. */
export function sha256File(file) {
  return new Promise((resolve, reject) => {
    const hash = createHash('sha256');
    createReadStream(file)
      .on('data', (chunk) => hash.update(chunk))
      .on('end', () => resolve(hash.digest('hex')))
      .on('error', reject);
  });
}

function isFile(file) {
  try {
    return statSync(file).isFile();
  } catch {
    return false;
  }
}

function readText(file) {
  try {
    return readFileSync(file, 'utf8');
  } catch (e) {
    throw new ArtifactError(`${file} is unreadable (${e.message}); rebuild the artifact or re-copy it`);
  }
}

/**
 * A verified artifact directory: manifest facts (`model`), device `profile`, the graph `layout`
 * (contract.GraphLayout: cache layout, position_ids, I/O names, read from genai_config.json) and file paths.
 * The browser's counterpart is web.js's WebArtifact (same fields and methods).
 */
export class Artifact {
  constructor(root, manifest) {
    this.root = root;
    this.manifest = manifest;
    this.model = modelInfo(manifest.model ?? {}, path.join(root, MANIFEST));
    this.profile = { ...(manifest.profile ?? {}) };
    const config = path.join(root, GENAI_CONFIG);
    this.layout = GraphLayout.of(manifest, isFile(config) ? this.json(GENAI_CONFIG) : null, config);
  }

  /**
   * Read manifest.json in `dir` and check the listed files: verify "full" (size + sha256), "size", or "none".
   * With `trustedKeys` (public key paths, PEM text or KeyObjects) manifest.json must be signed by one of them
   * (signing.js). Throws ArtifactError (SignatureError) naming the bad file and what to do.
   */
  static async open(dir, { verify = 'full', trustedKeys = [] } = {}) {
    if (!VERIFY_MODES.includes(verify)) {
      throw new QwenEdgeError(`verify must be one of ${VERIFY_MODES.join(', ')}, not ${JSON.stringify(verify)}`);
    }
    const root = path.resolve(dir);
    let isDir = false;
    try {
      isDir = statSync(root).isDirectory();
    } catch {
      // reported below
    }
    if (!isDir) {
      throw new ArtifactError(`${root} is not an artifact directory; pass the folder \`qwen-edge build\` wrote`);
    }
    const manifestPath = path.join(root, MANIFEST);
    if (!isFile(manifestPath)) {
      throw new ArtifactError(`${manifestPath} is missing; rebuild the artifact or re-copy the whole folder`);
    }
    const text = readText(manifestPath);
    let signedBy = null;
    if (trustedKeys.length) {
      const doc = readSignature(path.join(root, MANIFEST_SIGNATURE));
      signedBy = verifySignature(Buffer.from(text, 'utf8'), doc, MANIFEST, trustedKeys, manifestPath);
    }
    const manifest = parseManifest(text, manifestPath);
    await checkFiles(root, manifest.files ?? {}, verify);
    const artifact = new Artifact(root, manifest);
    artifact.signedBy = signedBy; // key id of the trusted key whose signature was checked
    return artifact;
  }

  /** `{name: {size, sha256}}` as listed in the manifest. */
  get files() {
    return this.manifest.files ?? {};
  }

  /** Absolute path of a file in the artifact. */
  path(name) {
    return path.join(this.root, name);
  }

  /** A JSON file of the artifact, parsed. */
  json(name) {
    return parseJson(readText(this.path(name)), this.path(name));
  }

  /** An onnxruntime-node InferenceSession of the model graph, configured by the device profile. */
  openSession() {
    return createSession(ort.InferenceSession, this.modelPath, sessionOptions(this.profile), this.modelPath);
  }

  get modelPath() {
    return this.path(MODEL_FILE);
  }

  get tokenizerPath() {
    return this.path(TOKENIZER_FILE);
  }

  get tokenizerConfigPath() {
    return this.path(TOKENIZER_CONFIG_FILE);
  }
}

/** Check the files the manifest lists per `verify`: size, then sha256. */
async function checkFiles(root, files, verify) {
  if (verify === 'none') return;
  for (const [name, entry] of Object.entries(files)) {
    const target = path.join(root, name);
    if (!isFile(target)) {
      throw new ArtifactError(`${target} is missing; rebuild the artifact or re-copy the whole folder`);
    }
    const size = statSync(target).size;
    if (size !== entry.size) {
      throw new ArtifactError(
        `${target} has ${size} bytes, the manifest says ${entry.size} (truncated or altered); ` +
          'rebuild the artifact or re-copy it',
      );
    }
  }
  if (verify !== 'full') return;
  for (const [name, entry] of Object.entries(files)) {
    const target = path.join(root, name);
    if ((await sha256File(target)) !== entry.sha256) {
      throw new ArtifactError(
        `${target} does not match its sha256 in the manifest (altered or corrupted); ` +
          'rebuild the artifact or re-copy it',
      );
    }
  }
}
