/** The artifact's tokenizer (tokenizer.json + tokenizer_config.json) with @huggingface/tokenizers, offline. */

import { Tokenizer } from '@huggingface/tokenizers';

import { TOKENIZER_CONFIG_FILE, TOKENIZER_FILE } from './contract.js';
import { ArtifactError } from './errors.js';

/** Load the tokenizer of an opened Artifact (or WebArtifact). */
export function loadTokenizer(artifact) {
  const json = artifact.json(TOKENIZER_FILE);
  const config = artifact.json(TOKENIZER_CONFIG_FILE);
  try {
    return new Tokenizer(json, config);
  } catch (e) {
    throw new ArtifactError(`${artifact.tokenizerPath} is not a valid tokenizer (${e.message}); rebuild the artifact`);
  }
}
