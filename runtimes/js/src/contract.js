/**
 * The artifact contract as the JavaScript runtime reads it: file names, graph input/output names and
 * cache layouts.
 *
 * This module is the one owner of these facts on the JavaScript side; it mirrors
 * runtimes/qwen_edge/contract.py (same names, UPPER_CASE constants and camelCase functions). The facts
 * of a given artifact come from the files the build writes: manifest.json (format, the `model` block,
 * a `static` block for an NPU artifact) and genai_config.json (`search.past_present_share_buffer`,
 * `model.decoder.inputs` / `outputs`: the graph's I/O names and past/present name patterns).
 */

import { ArtifactError } from './errors.js';

export const FORMAT = 'qwen-edge';
export const FORMAT_VERSION = 1;

// files
export const MANIFEST = 'manifest.json';
export const GENAI_CONFIG = 'genai_config.json';
export const MODEL_FILE = 'model.onnx';
export const MODEL_DATA_FILE = 'model.onnx.data';
export const TOKENIZER_FILE = 'tokenizer.json';
export const TOKENIZER_CONFIG_FILE = 'tokenizer_config.json';
export const LICENSE_FILE = 'LICENSE';
export const STATIC_GRAPHS = Object.freeze(['prefill', 'decode']); // an NPU artifact's two graphs, in run order
export const STATIC_GRAPH_FILES = Object.freeze(Object.fromEntries(STATIC_GRAPHS.map((n) => [n, `${n}.onnx`])));
export const ALIGNMENT = 4096; // external data offsets, aligned for memory mapping

// signatures: a detached Ed25519 signature beside the JSON whose file table covers every other file
export const MANIFEST_SIGNATURE = 'manifest.sig'; // beside manifest.json in an artifact
export const BUNDLE_SIGNATURE = 'bundle.sig'; // beside bundle.json in a bundle
export const SIGNATURE_FORMAT = 'qwen-edge-signature';
export const SIGNATURE_VERSION = 1;
export const SIGNATURE_ALGORITHM = 'ed25519';
// what is signed: this prefix, the signed file's name, a newline, then the file's exact bytes
export const SIGNATURE_CONTEXT = 'qwen-edge signature v1\n';

// cache layouts (manifest/genai_config: how the graph holds its KV cache)
export const SHARED = 'shared'; // one past/present buffer of max_length bound as both (GroupQueryAttention)
export const GROWING = 'growing'; // present = past + this step (plain-operator graphs of the olive/optimum backends)
export const STATIC = 'static'; // fixed-shape prefill/decode graphs; the host keeps the cache (NPUs)
export const LAYOUTS = Object.freeze([SHARED, GROWING, STATIC]);
export const STATIC_BLOCK = 'static'; // the manifest block that makes an artifact static (graphs, chunk, ...)

// decoder graph I/O (onnxruntime-genai's names)
export const INPUT_IDS = 'input_ids';
export const ATTENTION_MASK = 'attention_mask';
export const POSITION_IDS = 'position_ids';
export const LOGITS_TO_KEEP = 'num_logits_to_keep'; // optional scalar; 0 = logits at every position
export const LOGITS = 'logits';
export const PAST_KEY = 'past_key_values.%d.key';
export const PAST_VALUE = 'past_key_values.%d.value';
export const PRESENT_KEY = 'present.%d.key';
export const PRESENT_VALUE = 'present.%d.value';

// static graph I/O
export const ATTENTION_BIAS = 'attention_bias';
export const STATIC_PAST_KEY = 'past_key_%d'; // [1, kv_heads, head_dim, L]: keys transposed
export const STATIC_PAST_VALUE = 'past_value_%d'; // [1, kv_heads, L, head_dim]
export const STATIC_PRESENT_KEY = 'present_key_%d';
export const STATIC_PRESENT_VALUE = 'present_value_%d';
export const STATIC_KEY_LAYOUT = 'bhdl';
export const STATIC_VALUE_LAYOUT = 'bhld';
export const MASK_VALUE_METADATA = 'qwen_edge.mask_value'; // model metadata of a static graph

/** `pattern` ("past_key_values.%d.key") for layer `i`. */
export function layerName(pattern, i) {
  return pattern.replace('%d', String(i));
}

/** The past key/value input names, layer by layer (key, value). */
export function pastNames(numLayers, isStatic = false, patterns = null) {
  const [key, value] = patterns ?? (isStatic ? [STATIC_PAST_KEY, STATIC_PAST_VALUE] : [PAST_KEY, PAST_VALUE]);
  return Array.from({ length: numLayers }, (_, i) => [layerName(key, i), layerName(value, i)]).flat();
}

/** The present key/value output names, in the order of `pastNames`. */
export function presentNames(numLayers, isStatic = false, patterns = null) {
  const [key, value] = patterns ??
    (isStatic ? [STATIC_PRESENT_KEY, STATIC_PRESENT_VALUE] : [PRESENT_KEY, PRESENT_VALUE]);
  return Array.from({ length: numLayers }, (_, i) => [layerName(key, i), layerName(value, i)]).flat();
}

/** The decoder graph's I/O names when genai_config.json does not state them (qwen-edge's native graph). */
const DEFAULT_NAMES = Object.freeze({
  inputIds: INPUT_IDS,
  attentionMask: ATTENTION_MASK,
  positionIds: null,
  pastKey: PAST_KEY,
  pastValue: PAST_VALUE,
  logits: LOGITS,
  presentKey: PRESENT_KEY,
  presentValue: PRESENT_VALUE,
});

// genai_config.json decoder key -> [names field, where it lives, is a per-layer pattern]
const CONFIG_NAMES = [
  ['input_ids', 'inputIds', 'inputs', false],
  ['attention_mask', 'attentionMask', 'inputs', false],
  ['position_ids', 'positionIds', 'inputs', false],
  ['past_key_names', 'pastKey', 'inputs', true],
  ['past_value_names', 'pastValue', 'inputs', true],
  ['logits', 'logits', 'outputs', false],
  ['present_key_names', 'presentKey', 'outputs', true],
  ['present_value_names', 'presentValue', 'outputs', true],
];

function isPlainObject(value) {
  return value !== null && typeof value === 'object' && !Array.isArray(value);
}

/** Whether the manifest has a `static` block (truthy as the Python runtime reads it: an empty {} is not). */
export function isStaticManifest(manifest) {
  const block = manifest[STATIC_BLOCK];
  if (block === null || block === undefined || block === false || block === 0 || block === '') return false;
  if (Array.isArray(block)) return block.length > 0;
  return typeof block !== 'object' || Object.keys(block).length > 0;
}

/**
 * How an artifact's graph must be driven: its cache layout (`kvCache`: "shared", "growing" or
 * "static"), whether it takes position_ids, and the decoder graph's I/O names (`names`).
 */
export class GraphLayout {
  constructor(kvCache = SHARED, positionIds = false, names = DEFAULT_NAMES) {
    this.kvCache = kvCache;
    this.positionIds = positionIds;
    this.names = Object.freeze({ ...names });
    Object.freeze(this);
  }

  /**
   * The layout an artifact states: static when the manifest has a `static` block, else as its
   * genai_config.json (`config`, parsed; `file` names it in errors) says (`search.past_present_share_buffer`,
   * `position_ids` among the decoder's inputs, the I/O names); an artifact without one (`config` null) has
   * the native layout.
   */
  static of(manifest, config, file = GENAI_CONFIG) {
    if (isStaticManifest(manifest)) return new GraphLayout(STATIC, true);
    if (config === null || config === undefined) return new GraphLayout();
    const get = (obj, key, fallback) => (key in obj ? obj[key] : fallback); // absent, not null, takes the default
    const decoder = isPlainObject(config) && isPlainObject(config.model) ? config.model.decoder : undefined;
    const search = isPlainObject(config) ? get(config, 'search', {}) : null;
    if (!isPlainObject(decoder) || !isPlainObject(search)) {
      throw new ArtifactError(`${file} is malformed (no model.decoder or search block); rebuild the artifact`);
    }
    const shared = get(search, 'past_present_share_buffer', true);
    const blocks = { inputs: get(decoder, 'inputs', {}), outputs: get(decoder, 'outputs', {}) };
    if (typeof shared !== 'boolean' || !isPlainObject(blocks.inputs) || !isPlainObject(blocks.outputs)) {
      throw new ArtifactError(
        `${file}: past_present_share_buffer or decoder inputs/outputs is malformed; rebuild the artifact`,
      );
    }
    const names = { ...DEFAULT_NAMES };
    for (const [key, field, where, pattern] of CONFIG_NAMES) {
      const value = blocks[where][key];
      if (value === undefined) continue;
      if (typeof value !== 'string' || !value || (pattern && !value.includes('%d'))) {
        throw new ArtifactError(
          `${file}: model.decoder.${where}.${key} is ${JSON.stringify(value)}, not a graph ` +
            `${pattern ? 'name pattern with %d' : 'name'}; rebuild the artifact`,
        );
      }
      names[field] = value;
    }
    return new GraphLayout(shared ? SHARED : GROWING, POSITION_IDS in blocks.inputs, names);
  }

  /** [[past input, present output] ...] of every layer's key and value, in graph order. */
  kvNames(numLayers) {
    const { pastKey, pastValue, presentKey, presentValue } = this.names;
    const past = pastNames(numLayers, false, [pastKey, pastValue]);
    const present = presentNames(numLayers, false, [presentKey, presentValue]);
    return past.map((name, i) => [name, present[i]]);
  }
}

/** {graph name: file} of a static artifact (the manifest's `static` block may rename them). */
export function staticGraphFiles(manifest) {
  const block = isPlainObject(manifest[STATIC_BLOCK]) ? manifest[STATIC_BLOCK] : {};
  return Object.fromEntries(STATIC_GRAPHS.map((name) => [name, String(block[name] ?? STATIC_GRAPH_FILES[name])]));
}

/** The ONNX graph files an artifact must hold. */
export function graphFiles(manifest) {
  return isStaticManifest(manifest) ? Object.values(staticGraphFiles(manifest)) : [MODEL_FILE];
}
