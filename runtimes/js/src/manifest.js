/** What manifest.json must hold, checked the same way wherever the artifact's files come from (disk or fetch). */

import { FORMAT, FORMAT_VERSION, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, graphFiles } from './contract.js';
import { ArtifactError } from './errors.js';

/** The `model` block as {family, numLayers, numKvHeads, headDim, vocabSize, contextLength, eosTokenIds, ...}. */
export function modelInfo(block, where) {
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

/** Parse manifest.json's text (`where` names it) and check its format and file table; returns the object. */
export function parseManifest(text, where) {
  let manifest;
  try {
    manifest = JSON.parse(text);
  } catch (e) {
    throw new ArtifactError(`${where} is unreadable (${e.message}); rebuild the artifact or re-copy it`);
  }
  if (manifest === null || typeof manifest !== 'object' || Array.isArray(manifest)) {
    throw new ArtifactError(`${where} is not a JSON object; rebuild the artifact or re-copy it`);
  }
  if (manifest.format !== FORMAT || manifest.format_version !== FORMAT_VERSION) {
    throw new ArtifactError(
      `${where}: format ${JSON.stringify(manifest.format)} ` +
        `version ${JSON.stringify(manifest.format_version)} ` +
        `is not "${FORMAT}" version ${FORMAT_VERSION}; rebuild the artifact with this qwen-edge version`,
    );
  }
  const files = manifest.files ?? {};
  if (files === null || typeof files !== 'object' || Array.isArray(files)) {
    throw new ArtifactError(`${where}: \`files\` is not a mapping; rebuild the artifact`);
  }
  for (const name of [...graphFiles(manifest), TOKENIZER_FILE, TOKENIZER_CONFIG_FILE]) {
    if (!(name in files)) throw new ArtifactError(`${where} does not list ${name}; rebuild the artifact`);
  }
  checkFileTable(files, where);
  return manifest;
}

/** Every entry of a `{name: {size, sha256}}` table has both, and a name inside the folder. */
export function checkFileTable(files, where) {
  for (const [name, entry] of Object.entries(files)) {
    if (!(entry && Number.isInteger(entry.size) && typeof entry.sha256 === 'string')) {
      throw new ArtifactError(`${where}: the entry of ${name} lacks size/sha256; rebuild the artifact`);
    }
    if (name.startsWith('/') || /^[A-Za-z]:/.test(name) || name.split(/[\\/]/).includes('..')) {
      throw new ArtifactError(`${where} lists ${JSON.stringify(name)} outside the artifact; rebuild the artifact`);
    }
  }
}

/** Parse a JSON file's text; an ArtifactError naming `where` when it is not JSON. */
export function parseJson(text, where) {
  try {
    return JSON.parse(text);
  } catch (e) {
    const why = String(e.message).split('\n')[0];
    throw new ArtifactError(`${where} is unreadable or malformed (${why}); rebuild the artifact`);
  }
}
