/** The artifact's tokenizer (tokenizer.json + tokenizer_config.json) with @huggingface/tokenizers, offline. */

import { readFileSync } from 'node:fs';

import { Tokenizer } from '@huggingface/tokenizers';

import { ArtifactError } from './errors.js';

function readJson(file) {
  try {
    return JSON.parse(readFileSync(file, 'utf8'));
  } catch (e) {
    throw new ArtifactError(`${file} is unreadable (${e.message}); rebuild the artifact or re-copy it`);
  }
}

/** Load the tokenizer of an opened Artifact. */
export function loadTokenizer(artifact) {
  const json = readJson(artifact.tokenizerPath);
  const config = readJson(artifact.tokenizerConfigPath);
  try {
    return new Tokenizer(json, config);
  } catch (e) {
    throw new ArtifactError(`${artifact.tokenizerPath} is not a valid tokenizer (${e.message}); rebuild the artifact`);
  }
}
