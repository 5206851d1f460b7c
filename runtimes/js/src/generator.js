/**
 * The KV-cached generation loop, on onnxruntime-node and onnxruntime-web alike (its tensors are onnxruntime-common's,
 * which both re-export; the page maps the bare name to onnxruntime-web).
 *
 * Graph layouts (contract.js; the artifact's genai_config.json and manifest.json say which):
 *
 * - growing (plain-operator graphs of the olive/optimum backends): `present.{i}.*` is past + this
 *   step; each step's presents are fed back as the next past, rolling back slices the past, and
 *   `position_ids` is fed when the graph takes it.
 * - shared (qwen-edge's native GroupQueryAttention graph): run the same growing way here. onnxruntime-node
 *   cannot bind one buffer as both past input and present output without copying it back into
 *   JavaScript after every run (pre-allocated outputs are written in place but returned as fresh
 *   copies), so the shared `[1, kv_heads, max_length, head_dim]` buffer of the Python loop would cost
 *   a copy of the whole max-length cache per token. Fed the growing past (`[1, kv_heads, tokens so
 *   far, head_dim]`, attention_mask of past + new), GroupQueryAttention without a shared buffer
 *   appends the new keys/values itself. Cost per token: one copy of the cache so far (inside
 *   onnxruntime and out to JavaScript), growing with the sequence instead of fixed at max_length.
 *   Measured on the Qwen2.5-Coder-0.5B int4 demo artifact at ~50 tokens of context (same tokens either
 *   way): 64 ms of CPU per token this way, 79 ms with a shared 512-token buffer, 188 ms with the full 4096.
 * - static (NPU artifacts: fixed-shape prefill/decode graphs compiled for the QNN NPU): refused with
 *   an ArtifactError saying to use the Python runtime with the QNN execution provider.
 *
 * Logits: onnxruntime-node only feeds the graph's declared inputs, so the overridable initializer
 * `num_logits_to_keep` cannot be set and a prefill chunk returns logits for every position
 * (`chunk x vocab` floats, e.g. 311 MB for 512 tokens of a 151,936-token vocabulary). The chunk size
 * is the Python loop's (profile `prefill_chunk`, default 512) so that both compute identically.
 *
 * Context policy, stop rules and finish reasons are those of the Python runtime.
 */

import { Tensor } from 'onnxruntime-common';

import { GENAI_CONFIG, POSITION_IDS, STATIC } from './contract.js';
import { Detokenizer } from './detokenize.js';
import { ArtifactError, ContextOverflowError, QwenEdgeError } from './errors.js';
import { Sampler, samplingParams } from './sampling.js';
import { loadTokenizer } from './tokenizer.js';

const DEFAULT_PREFILL_CHUNK = 512;

/** Holds back streamed text that could be the start of a stop string; reports a completed one. */
export class StopFilter {
  constructor(stops) {
    this.stops = stops.filter((s) => s);
    this.held = '';
    this.hit = false; // a stop string was found: nothing after it is text
  }

  /** Return [text safe to emit, whether a stop string was found]. */
  push(piece) {
    if (this.hit) return ['', true];
    if (!this.stops.length) return [piece, false];
    const buf = this.held + piece;
    const hits = this.stops.map((s) => buf.indexOf(s)).filter((i) => i >= 0);
    if (hits.length) {
      this.held = '';
      this.hit = true;
      return [buf.slice(0, Math.min(...hits)), true];
    }
    let hold = 0;
    for (const s of this.stops) {
      for (let k = Math.min(s.length, buf.length); k > hold; k--) {
        if (buf.endsWith(s.slice(0, k))) {
          hold = k;
          break;
        }
      }
    }
    this.held = buf.slice(buf.length - hold);
    return [buf.slice(0, buf.length - hold), false];
  }

  /** The held-back text once generation ended without completing a stop string. */
  flush() {
    const held = this.held;
    this.held = '';
    return held;
  }
}

/** An in-progress generation: `for await` its text pieces; afterwards read finishReason, stats, text. */
export class Generation {
  constructor() {
    this.tokenIds = [];
    this.text = '';
    this.finishReason = null; // "stop", "length" or "max_tokens"
    this.notice = null;
    this.stats = {
      promptTokens: 0, reusedTokens: 0, prefillTokens: 0, newTokens: 0, prefillS: 0, ttftS: 0, decodeS: 0,
    };
    this.pieces = null;
  }

  [Symbol.asyncIterator]() {
    return this.pieces;
  }

  /** Run to the end and return the whole text. */
  async read() {
    for await (const _ of this); // eslint-disable-line no-unused-vars
    return this.text;
  }
}

const now = () => performance.now() / 1000;
const int64 = (values) => new Tensor('int64', BigInt64Array.from(values, BigInt), [1, values.length]);
const range = (start, end) => Array.from({ length: end - start }, (_, i) => start + i);

/** Refuse an NPU (static) artifact in one line that says what to do instead. */
function refuseStatic(artifact) {
  if (artifact.layout.kvCache !== STATIC) return;
  throw new ArtifactError(
    `${artifact.root} is an NPU artifact (fixed-shape prefill/decode graphs compiled for the QNN NPU), which the ` +
      'JavaScript runtime cannot run: run it with the Python runtime (qwen-edge run) and the device\'s QNN ' +
      'execution provider, or build a CPU recipe for JavaScript',
  );
}

/**
 * Runs an artifact's model with a persistent KV cache. `generate(ids)` takes the whole sequence:
 * the longest prefix already in the cache is kept and only the rest is fed, in chunks of
 * `prefillChunk` tokens. One generation runs at a time.
 */
export class Generator {
  /** Open the session and tokenizer of an opened Artifact (Node) or WebArtifact (browser). */
  static async create(artifact, { maxLength = null, prefillChunk = null } = {}) {
    refuseStatic(artifact);
    const tokenizer = loadTokenizer(artifact);
    const session = await artifact.openSession();
    return new Generator(artifact, session, tokenizer, { maxLength, prefillChunk });
  }

  constructor(artifact, session, tokenizer, { maxLength, prefillChunk }) {
    refuseStatic(artifact);
    const info = artifact.model;
    this.artifact = artifact;
    this.session = session;
    this.tokenizer = tokenizer;
    this.maxLength = checkMaxLength(maxLength, info.contextLength);
    this.prefillChunk = Number(prefillChunk ?? artifact.profile.prefill_chunk ?? DEFAULT_PREFILL_CHUNK);
    if (!(Number.isInteger(this.prefillChunk) && this.prefillChunk >= 1)) {
      throw new QwenEdgeError(`prefill_chunk must be an integer >= 1, not ${this.prefillChunk}`);
    }
    this.eosTokenIds = [...info.eosTokenIds];
    this.layout = artifact.layout;
    const names = this.layout.names;
    this.names = { ...names, positionIds: this.layout.positionIds ? names.positionIds ?? POSITION_IDS : null };
    this.kvNames = this.layout.kvNames(info.numLayers); // [past input, present output]
    const { inputIds, attentionMask, positionIds, logits } = this.names;
    const needed = [inputIds, attentionMask, ...(positionIds ? [positionIds] : []), ...this.kvNames.map(([p]) => p)];
    const missing = needed.filter((n) => !session.inputNames.includes(n));
    missing.push(...[logits, ...this.kvNames.map(([, q]) => q)].filter((n) => !session.outputNames.includes(n)));
    if (missing.length) {
      throw new ArtifactError(
        `${artifact.modelPath} lacks the graph inputs/outputs ${missing.slice(0, 4).join(', ')} that the manifest's ` +
          `${info.numLayers} layers and ${GENAI_CONFIG} imply; rebuild the artifact`,
      );
    }
    if (!positionIds && session.inputNames.includes(POSITION_IDS)) {
      throw new ArtifactError(
        `${artifact.modelPath} takes position_ids but ${GENAI_CONFIG} does not list them; rebuild the artifact`,
      );
    }
    const kvType = session.inputMetadata?.find?.((m) => m.name === this.kvNames[0][0])?.type ?? 'float32';
    if (kvType !== 'float32') {
      throw new ArtifactError(
        `KV cache type ${kvType} is not supported by the JavaScript runtime; rebuild the artifact with float32 KV`,
      );
    }
    this.vocabSize = info.vocabSize;
    this.kvShape = [info.numKvHeads, info.headDim];
    this.tokens = [];
    this.reset();
  }

  /** Number of tokens in the cache. */
  get position() {
    return this.tokens.length;
  }

  /** Forget the cache. */
  reset() {
    this.tokens = [];
    this.past = this.#emptyPast(0);
  }

  #emptyPast(len) {
    const [heads, dim] = this.kvShape;
    const empty = () => new Tensor('float32', new Float32Array(heads * len * dim), [1, heads, len, dim]);
    return Object.fromEntries(this.kvNames.map(([p]) => [p, empty()]));
  }

  /** Roll the cache back to its first `n` tokens (slices the past: `[1, heads, n, dim]` of each tensor). */
  truncate(n) {
    const pos = this.position;
    if (!(Number.isInteger(n) && n >= 0 && n <= pos)) {
      throw new QwenEdgeError(`cannot truncate the cache to ${n} tokens; it holds ${pos}`);
    }
    if (n === pos) return;
    const [heads, dim] = this.kvShape;
    const past = this.#emptyPast(n);
    for (const [name, tensor] of Object.entries(this.past)) {
      const src = tensor.data;
      const dst = past[name].data;
      for (let h = 0; h < heads; h++) dst.set(src.subarray(h * pos * dim, (h * pos + n) * dim), h * n * dim);
    }
    this.past = past;
    this.tokens.length = n;
  }

  /** Feed `ids` after the cache (in prefill chunks); return the logits row of the last position. */
  async append(ids) {
    if (this.position + ids.length > this.maxLength) {
      throw new ContextOverflowError(
        `${this.position} cached + ${ids.length} new tokens exceed the context of ${this.maxLength}; ` +
          'reset the cache or use a longer --max-length',
      );
    }
    let logits;
    for (let start = 0; start < ids.length; start += this.prefillChunk) {
      logits = await this.#step(ids.slice(start, start + this.prefillChunk));
    }
    return logits;
  }

  /** One run: this step's presents (past + `ids`) become the next past. */
  async #step(ids) {
    const pos = this.position;
    const total = pos + ids.length;
    const { inputIds, attentionMask, positionIds, logits } = this.names;
    const feeds = { [inputIds]: int64(ids), [attentionMask]: int64(new Array(total).fill(1)), ...this.past };
    if (positionIds) feeds[positionIds] = int64(range(pos, total));
    const out = await this.session.run(feeds);
    this.past = Object.fromEntries(this.kvNames.map(([p, q]) => [p, out[q]]));
    this.tokens.push(...ids);
    const data = out[logits].data;
    return data.subarray(data.length - this.vocabSize);
  }

  /** Length of the longest common prefix of `ids` and the cached tokens. */
  commonPrefix(ids) {
    const m = Math.min(ids.length, this.position);
    let i = 0;
    while (i < m && this.tokens[i] === ids[i]) i++;
    return i;
  }

  /** Token ids of `text` with the artifact's tokenizer (no special tokens added). */
  encode(text) {
    return this.tokenizer.encode(text, { add_special_tokens: false }).ids;
  }

  /**
   * Generate after the whole sequence `promptIds` (its cached prefix is reused); `for await` the
   * result for text pieces. Stops at a stop token (default: the model's eos ids; not emitted), at a
   * stop string (not emitted; text that may begin one is held back), after `maxNewTokens`, or at the
   * end of the context. `onToken(id)` may return token ids to force after a sampled token (e.g.
   * closing a thinking block); they count as generated.
   */
  generate(
    promptIds,
    params = samplingParams(),
    { maxNewTokens = 256, stopStrings = [], stopTokenIds = null, onToken = null } = {},
  ) {
    const ids = Array.from(promptIds, Number);
    if (!ids.length) throw new QwenEdgeError('the prompt is empty; give at least one token');
    if (!(Number.isInteger(maxNewTokens) && maxNewTokens >= 1)) {
      throw new QwenEdgeError(`max_new_tokens must be >= 1, not ${maxNewTokens}`);
    }
    if (ids.length >= this.maxLength) {
      const ctx = this.artifact.model.contextLength;
      const more = this.maxLength < ctx ? `, raise --max-length (up to ${ctx})` : '';
      throw new ContextOverflowError(
        `the prompt has ${ids.length} tokens; with ${maxNewTokens} new tokens it needs ${ids.length + maxNewTokens} ` +
          `but the context holds ${this.maxLength}; shorten the prompt${more}, ` +
          'or use an artifact built with a longer context',
      );
    }
    const stops = new Set(stopTokenIds ?? this.eosTokenIds);
    const gen = new Generation();
    const stopText = new StopFilter([...stopStrings]);
    gen.pieces = this.#run(gen, ids, new Sampler(params), maxNewTokens, stopText, stops, onToken);
    return gen;
  }

  async *#run(gen, ids, sampler, maxNew, stopText, stops, onToken) {
    const stats = gen.stats;
    const t0 = now();
    // the last prompt token is always fed for its logits
    const reuse = Math.min(this.commonPrefix(ids), ids.length - 1);
    this.truncate(reuse);
    Object.assign(stats, { promptTokens: ids.length, reusedTokens: reuse, prefillTokens: ids.length - reuse });
    let logits = await this.append(ids.slice(reuse));
    stats.prefillS = now() - t0;
    const penalize = sampler.params.repetitionPenalty !== 1;
    const detok = new Detokenizer(this.tokenizer);
    let tFirst = null;
    let tLast = null;
    for (;;) {
      const token = sampler.pick(logits, penalize ? this.tokens : null);
      tLast = now();
      if (tFirst === null) {
        tFirst = tLast;
        stats.ttftS = tFirst - t0;
      }
      if (stops.has(token)) {
        gen.finishReason = 'stop';
        break;
      }
      const fresh = [token, ...((onToken && onToken(token)) || [])];
      gen.tokenIds.push(...fresh);
      stats.newTokens += 1;
      const [text, hit] = stopText.push(fresh.map((t) => detok.push(t)).join(''));
      if (text) {
        gen.text += text;
        yield text;
      }
      if (hit) {
        gen.finishReason = 'stop';
        break;
      }
      if (gen.tokenIds.length >= maxNew) {
        gen.finishReason = 'max_tokens';
        break;
      }
      if (this.position + fresh.length > this.maxLength) {
        gen.finishReason = 'length';
        gen.notice =
          `stopped at the end of the context (${this.maxLength} tokens) after ${gen.tokenIds.length} new tokens; ` +
          'use a shorter prompt, fewer new tokens, a larger --max-length, or an artifact with a longer context';
        break;
      }
      logits = await this.#step(fresh);
    }
    stats.decodeS = tLast - tFirst;
    // bytes that never completed a character
    const tail = stopText.push(detok.flush())[0] + stopText.flush();
    if (tail) {
      gen.text += tail;
      yield tail;
    }
  }
}

function checkMaxLength(maxLength, contextLength) {
  if (maxLength === null || maxLength === undefined) return contextLength;
  if (!(Number.isInteger(maxLength) && maxLength >= 2 && maxLength <= contextLength)) {
    throw new QwenEdgeError(
      `max_length ${maxLength} must be between 2 and the artifact's context length ${contextLength}`,
    );
  }
  return maxLength;
}
