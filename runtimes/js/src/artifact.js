/** Open an artifact directory and verify it against its manifest.json (size and sha256 of every file). */

import { createHash } from 'node:crypto';
import { createReadStream, readFileSync, statSync } from 'node:fs';
import path from 'node:path';

import {
  FORMAT, FORMAT_VERSION, GraphLayout, MANIFEST, MODEL_FILE, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, graphFiles,
} from './contract.js';
import { ArtifactError, QwenEdgeError } from './errors.js';

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

function modelInfo(block, where) {
  const int = (key, optional = false) => {
    const value = block[key];
    if (value === undefined || value === null) {
      if (optional) return null;
      throw new ArtifactError(`${where}: the \`model\` block lacks ${key}; rebuild the artifact`);
    }
    if (!Number.isInteger(value)) {
      throw new ArtifactError(`${where}: model.${key} is not an integer; rebuild the artifact`);
    }
    return value;
  };
  const eos = block.eos_token_ids ?? [];
  if (!Array.isArray(eos) || !eos.every(Number.isInteger)) {
    throw new ArtifactError(`${where}: model.eos_token_ids is not a list of integers; rebuild the artifact`);
  }
  return {
    family: String(block.family ?? ''),
    numLayers: int('num_layers'),
    numKvHeads: int('num_kv_heads'),
    headDim: int('head_dim'),
    vocabSize: int('vocab_size'),
    contextLength: int('context_length'),
    eosTokenIds: eos,
    bosTokenId: int('bos_token_id', true),
    padTokenId: int('pad_token_id', true),
  };
}

/**
 * A verified artifact directory: manifest facts (`model`), device `profile`, the graph `layout`
 * (contract.GraphLayout: cache layout, position_ids, I/O names, read from genai_config.json) and file paths.
 */
export class Artifact {
  constructor(root, manifest) {
    this.root = root;
    this.manifest = manifest;
    this.model = modelInfo(manifest.model ?? {}, path.join(root, MANIFEST));
    this.profile = { ...(manifest.profile ?? {}) };
    this.layout = GraphLayout.of(root, manifest);
  }

  /**
   * Read manifest.json in `dir` and check the listed files: verify "full" (size + sha256), "size", or "none".
   * Throws ArtifactError naming the bad file and what to do.
   */
  static async open(dir, { verify = 'full' } = {}) {
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
    let manifest;
    try {
      manifest = JSON.parse(readFileSync(manifestPath, 'utf8'));
    } catch (e) {
      throw new ArtifactError(`${manifestPath} is unreadable (${e.message}); rebuild the artifact or re-copy it`);
    }
    if (manifest === null || typeof manifest !== 'object' || Array.isArray(manifest)) {
      throw new ArtifactError(`${manifestPath} is not a JSON object; rebuild the artifact or re-copy it`);
    }
    if (manifest.format !== FORMAT || manifest.format_version !== FORMAT_VERSION) {
      throw new ArtifactError(
        `${manifestPath}: format ${JSON.stringify(manifest.format)} ` +
          `version ${JSON.stringify(manifest.format_version)} ` +
          `is not "${FORMAT}" version ${FORMAT_VERSION}; rebuild the artifact with this qwen-edge version`,
      );
    }
    await checkFiles(root, manifest, verify);
    return new Artifact(root, manifest);
  }

  /** `{name: {size, sha256}}` as listed in the manifest. */
  get files() {
    return this.manifest.files ?? {};
  }

  /** Absolute path of a file in the artifact. */
  path(name) {
    return path.join(this.root, name);
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

/** Check the files the manifest lists: the graphs and tokenizer are listed; per `verify`, size and sha256. */
async function checkFiles(root, manifest, verify) {
  const where = path.join(root, MANIFEST);
  const files = manifest.files ?? {};
  if (files === null || typeof files !== 'object' || Array.isArray(files)) {
    throw new ArtifactError(`${where}: \`files\` is not a mapping; rebuild the artifact`);
  }
  for (const name of [...graphFiles(manifest), TOKENIZER_FILE, TOKENIZER_CONFIG_FILE]) {
    if (!(name in files)) throw new ArtifactError(`${where} does not list ${name}; rebuild the artifact`);
  }
  for (const [name, entry] of Object.entries(files)) {
    if (!(entry && Number.isInteger(entry.size) && typeof entry.sha256 === 'string')) {
      throw new ArtifactError(`${where}: the entry of ${name} lacks size/sha256; rebuild the artifact`);
    }
    if (path.isAbsolute(name) || name.split(/[\\/]/).includes('..')) {
      throw new ArtifactError(`${where} lists ${JSON.stringify(name)} outside the artifact; rebuild the artifact`);
    }
  }
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
