/**
 * Logits -> next token: greedy, temperature, top-k, top-p, min-p, repetition penalty, seeded PRNG.
 *
 * The same filters in the same order as the Python runtime (penalty, temperature, top-k, softmax,
 * min-p, top-p). Random draws come from a seeded xoroshiro128+ (pure-rand), so a seed reproduces a
 * run within this runtime; the draws differ from numpy's, so sampled (non-greedy) text differs
 * from the Python runtime's for the same seed. Greedy decoding is identical.
 */

import { uniformFloat64 } from 'pure-rand/distribution/uniformFloat64';
import { xoroshiro128plus } from 'pure-rand/generator/xoroshiro128plus';

import { QwenEdgeError } from './errors.js';

/** Validated sampling parameters; temperature 0 means greedy (argmax); 0/1.0 disable the filters. */
export function samplingParams({
  temperature = 0,
  topK = 0,
  topP = 1,
  minP = 0,
  repetitionPenalty = 1,
  seed = null,
} = {}) {
  if (!(temperature >= 0)) throw new QwenEdgeError(`temperature must be >= 0 (0 = greedy), not ${temperature}`);
  if (!(Number.isInteger(topK) && topK >= 0)) throw new QwenEdgeError(`top_k must be an integer >= 0 (0 = off), not ${topK}`);
  if (!(topP > 0 && topP <= 1)) throw new QwenEdgeError(`top_p must be in (0, 1] (1 = off), not ${topP}`);
  if (!(minP >= 0 && minP < 1)) throw new QwenEdgeError(`min_p must be in [0, 1) (0 = off), not ${minP}`);
  if (!(repetitionPenalty > 0)) throw new QwenEdgeError(`repetition_penalty must be > 0 (1 = off), not ${repetitionPenalty}`);
  if (seed !== null && !Number.isInteger(seed)) throw new QwenEdgeError(`seed must be an integer, not ${seed}`);
  return Object.freeze({ temperature, topK, topP, minP, repetitionPenalty, seed });
}

function argmax(row) {
  let best = 0;
  for (let i = 1; i < row.length; i++) if (row[i] > row[best]) best = i;
  return best;
}

/** Picks tokens from logit rows with fixed params and its own PRNG stream. */
export class Sampler {
  constructor(params = samplingParams()) {
    this.params = params;
    const seed = params.seed ?? Math.floor(Math.random() * 2 ** 31);
    this.rng = xoroshiro128plus(seed | 0);
  }

  get greedy() {
    return this.params.temperature === 0;
  }

  /**
   * Pick a token from a Float32Array logits row; `seen` holds the token ids of the sequence so far
   * (prompt and generated) for the repetition penalty. `row` is never modified.
   */
  pick(row, seen = null) {
    const p = this.params;
    if (p.repetitionPenalty !== 1 && seen && seen.length) {
      row = Float32Array.from(row);
      for (const id of new Set(seen)) {
        const v = row[id];
        row[id] = v > 0 ? v / p.repetitionPenalty : v * p.repetitionPenalty;
      }
    }
    if (this.greedy) return argmax(row);
    return this.#sample(row);
  }

  #sample(row) {
    const p = this.params;
    const t = Math.fround(p.temperature);
    const scaled = new Float32Array(row.length); // float32, as the Python runtime scales
    for (let i = 0; i < row.length; i++) scaled[i] = row[i] / t;
    // candidates: token ids (null = the whole vocabulary) and their probabilities
    let ids = p.topK > 0 && p.topK < scaled.length ? highest(scaled, null, p.topK) : null;
    let probs = softmax(scaled, ids);
    if (p.minP > 0) {
      let top = 0;
      for (const x of probs) if (x > top) top = x;
      [ids, probs] = keep(ids, probs, (x) => x >= p.minP * top);
    }
    if (p.topP < 1) [ids, probs] = topMass(ids, probs, p.topP);
    let total = 0;
    for (const x of probs) total += x;
    const target = uniformFloat64(this.rng) * total;
    let cum = 0;
    for (let i = 0; i < probs.length; i++) {
      cum += probs[i];
      if (target < cum) return ids ? ids[i] : i;
    }
    return ids ? ids[ids.length - 1] : probs.length - 1;
  }
}

/** Softmax (float64) of `vals` at `ids` (all positions when ids is null). */
function softmax(vals, ids) {
  const out = ids ? Float64Array.from(ids, (i) => vals[i]) : Float64Array.from(vals);
  let max = -Infinity;
  for (const v of out) if (v > max) max = v;
  let sum = 0;
  for (let i = 0; i < out.length; i++) sum += out[i] = Math.exp(out[i] - max);
  for (let i = 0; i < out.length; i++) out[i] /= sum;
  return out;
}

/** The candidates whose probability passes `test`, as [ids, probs]. */
function keep(ids, probs, test) {
  const at = [];
  for (let i = 0; i < probs.length; i++) if (test(probs[i])) at.push(i);
  return [Int32Array.from(at, (i) => (ids ? ids[i] : i)), Float64Array.from(at, (i) => probs[i])];
}

/** Positions of the `n` highest of `vals` (restricted to `ids` when given), highest first, as token ids. */
function highest(vals, ids, n) {
  const kth = kthLargest(Float64Array.from(vals), n);
  const at = [];
  for (let i = 0; i < vals.length; i++) if (vals[i] >= kth) at.push(i);
  at.sort((a, b) => vals[b] - vals[a] || a - b);
  return Int32Array.from(at.slice(0, n), (i) => (ids ? ids[i] : i));
}

/** The n-th largest value of `a` (reorders `a`): iterative quickselect, O(length) on average. */
function kthLargest(a, n) {
  const k = a.length - n;
  let lo = 0;
  let hi = a.length - 1;
  while (lo < hi) {
    const pivot = a[(lo + hi) >> 1];
    let i = lo;
    let j = hi;
    while (i <= j) {
      while (a[i] < pivot) i++;
      while (a[j] > pivot) j--;
      if (i <= j) {
        [a[i], a[j]] = [a[j], a[i]];
        i++;
        j--;
      }
    }
    if (k <= j) hi = j;
    else if (k >= i) lo = i;
    else break;
  }
  return a[k];
}

/** The fewest highest-probability candidates whose mass reaches `mass`, highest first, as [ids, probs].
 * Only a few candidates are sorted: 64 first, four times more until they hold the mass. */
function topMass(ids, probs, mass) {
  for (let k = Math.min(64, probs.length); ; k = Math.min(probs.length, k * 4)) {
    const at = highest(probs, null, k);
    let cum = 0;
    let n = 0;
    while (n < at.length && cum < mass) cum += probs[at[n++]];
    if (cum >= mass || k === probs.length) {
      const top = at.slice(0, Math.max(n, 1));
      return [Int32Array.from(top, (i) => (ids ? ids[i] : i)), Float64Array.from(top, (i) => probs[i])];
    }
  }
}
