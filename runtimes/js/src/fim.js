/** Fill-in-the-middle with Qwen2.5-Coder's FIM tokens, as qwen_edge/fim.py builds it:
 * `<|fim_prefix|>` prefix `<|fim_suffix|>` suffix `<|fim_middle|>`; the model writes the middle. */

import { QwenEdgeError } from './errors.js';

export const PREFIX = '<|fim_prefix|>';
export const SUFFIX = '<|fim_suffix|>';
export const MIDDLE = '<|fim_middle|>';
// control tokens that end an infill besides the model's eos ids
export const ENDS = ['<|fim_pad|>', '<|file_sep|>', '<|repo_name|>', PREFIX, SUFFIX, MIDDLE, '<|endoftext|>'];

const id = (tokenizer, token) => tokenizer.token_to_id(token) ?? null;

/** The vocabulary's prefix, suffix and middle token ids, or an error saying the model has none. */
export function fimIds(tokenizer) {
  const ids = [PREFIX, SUFFIX, MIDDLE].map((t) => id(tokenizer, t));
  if (ids.includes(null)) {
    throw new QwenEdgeError(
      `this model's vocabulary has no ${PREFIX}/${SUFFIX}/${MIDDLE} tokens, so it cannot fill in the middle; ` +
        'use a Qwen2.5-Coder artifact, or drop the suffix for a plain completion',
    );
  }
  return ids;
}

/** The token ids of the infill prompt. */
export function fimPrompt(tokenizer, prefix, suffix) {
  const [pre, suf, mid] = fimIds(tokenizer);
  const encode = (text) => (text ? tokenizer.encode(text, { add_special_tokens: false }).ids : []);
  return [pre, ...encode(prefix), suf, ...encode(suffix), mid];
}

/** The tokens that end an infill: the model's eos ids and the FIM control tokens it has. */
export function fimStopIds(tokenizer, eos) {
  return new Set([...eos, ...ENDS.map((t) => id(tokenizer, t)).filter((i) => i !== null)]);
}
