/**
 * Incremental detokenizer for streaming: text pieces as tokens arrive, never half a character.
 *
 * Byte-level BPE splits a multi-byte UTF-8 character over several tokens; decoding such a partial
 * sequence ends in U+FFFD. Tokens are held back while the pending text ends in U+FFFD, and each
 * piece is the decoded text of (last emitted token + pending tokens) minus that of the last emitted
 * token, so work per token stays constant and word boundaries decode as in the full text. `flush`
 * gives what is still held when generation ends: bytes that never complete a character decode to
 * U+FFFD, as in a full decode.
 */

export class Detokenizer {
  /** `tokenizer` is a @huggingface/tokenizers Tokenizer. */
  constructor(tokenizer, { skipSpecialTokens = true } = {}) {
    this.tokenizer = tokenizer;
    this.options = { skip_special_tokens: skipSpecialTokens };
    this.context = [];
    this.pending = [];
  }

  #decode(ids) {
    return ids.length ? this.tokenizer.decode(ids, this.options) : '';
  }

  /** Add one token id; return the text it completes ('' while a character is incomplete). */
  push(id) {
    this.pending.push(id);
    const text = this.#decode([...this.context, ...this.pending]);
    return text.endsWith('\uFFFD') ? '' : this.#take(text);
  }

  /** The text of the tokens still held back ('' if none). */
  flush() {
    return this.pending.length ? this.#take(this.#decode([...this.context, ...this.pending])) : '';
  }

  /** `text` (the decode of context + pending) minus the context's: the pending tokens' piece. */
  #take(text) {
    const prefix = this.#decode(this.context);
    this.context = this.pending.slice(-1);
    this.pending = [];
    return text.startsWith(prefix) ? text.slice(prefix.length) : text;
  }
}
