/**
 * The browser's Artifact: an artifact folder or an unpacked web bundle at a URL, every file fetched, checked
 * against the sha256 its table lists (bundle.json for a bundle, else manifest.json) with WebCrypto, and kept in
 * Cache Storage so the next visit loads offline. Same fields and methods as artifact.js's Artifact, so the
 * Generator and ChatSession run on it unchanged; the session is onnxruntime-web's.
 */

import {
  GENAI_CONFIG, GraphLayout, MANIFEST, MODEL_DATA_FILE, MODEL_FILE, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE,
} from './contract.js';
import { ArtifactError } from './errors.js';
import { checkFileTable, modelInfo, parseJson, parseManifest } from './manifest.js';
import { createSession, sessionOptions } from './session.js';

export const BUNDLE_JSON = 'bundle.json';
export const BUNDLE_FORMAT = 'qwen-edge-bundle';
export const CACHE_NAME = 'qwen-edge';

const decoder = new TextDecoder();

async function sha256Hex(bytes) {
  const digest = new Uint8Array(await crypto.subtle.digest('SHA-256', bytes));
  return Array.from(digest, (b) => b.toString(16).padStart(2, '0')).join('');
}

/** Fetch `url` (a Response or null when unreachable: offline, or not found). */
async function tryFetch(url) {
  try {
    const response = await fetch(url, { cache: 'no-store' });
    return response.ok ? response : null;
  } catch {
    return null;
  }
}

/** The body of `response` as one Uint8Array of exactly `size` bytes; `onBytes(n)` reports progress. */
async function readBody(response, size, url, onBytes) {
  const out = new Uint8Array(size);
  const reader = response.body.getReader();
  let at = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    if (at + value.length > size) {
      await reader.cancel();
      throw new ArtifactError(`${url} is larger than the ${size} bytes its table lists; re-download the bundle`);
    }
    out.set(value, at);
    at += value.length;
    onBytes(value.length);
  }
  if (at !== size) {
    throw new ArtifactError(`${url} has ${at} bytes, its table says ${size} (truncated); re-download the bundle`);
  }
  return out;
}

/** An artifact (or unpacked bundle) opened from a URL in the browser. */
export class WebArtifact {
  constructor(root, manifest, bytes, source, { ort, executionProviders = ['wasm'], fallbackExecutionProviders = null }) {
    this.ort = ort; // the onnxruntime-web module
    this.executionProviders = executionProviders; // after openSession: the ones the session runs on
    this.fallbackExecutionProviders = fallbackExecutionProviders;
    this.fallbackReason = null; // why the session runs on the fallback, if it does
    this.root = root;
    this.manifest = manifest;
    this.bytes = bytes; // {name: Uint8Array} of every file the runtime reads
    this.source = source; // "network" or "cache": where the files came from
    this.model = modelInfo(manifest.model ?? {}, this.path(MANIFEST));
    this.profile = { ...(manifest.profile ?? {}) };
    const config = GENAI_CONFIG in bytes ? this.json(GENAI_CONFIG) : null;
    this.layout = GraphLayout.of(manifest, config, this.path(GENAI_CONFIG));
  }

  /**
   * Open the artifact at `url` (a folder URL): read its table (bundle.json, else manifest.json; from the
   * network, else the cache when offline), then fetch every listed file the runtime needs, from the cache when
   * it holds the same sha256, and check each one's size and sha256. `onProgress({name, loaded, total})` reports
   * bytes; `ort` (the onnxruntime-web module) and `executionProviders` (e.g. ["wasm"] or ["webgpu", "wasm"]) are
   * what openSession uses, and `fallbackExecutionProviders` (e.g. ["wasm"]) what it retries on when a session
   * cannot be made on those. Throws ArtifactError naming the bad file and what to do.
   */
  static async open(
    url,
    { ort, executionProviders, fallbackExecutionProviders, onProgress = () => {}, cacheName = CACHE_NAME } = {},
  ) {
    const root = new URL(url, location.href).href.replace(/\/?$/, '/');
    const cache = await caches.open(cacheName);
    const [table, tableName, manifestText] = await readTable(root, cache);
    const wanted = Object.keys(table).filter((name) => needed(name));
    const total = wanted.reduce((n, name) => n + table[name].size, 0);
    let loaded = 0;
    const bytes = {};
    let fromNetwork = false;
    for (const name of wanted) {
      const { size, sha256 } = table[name];
      const fileUrl = root + name;
      const key = `${fileUrl}?sha256=${sha256}`; // a new version of a file never hits an old cache entry
      const report = (n) => onProgress({ name, loaded: (loaded += n), total });
      let data = null;
      const cached = await cache.match(key);
      if (cached) {
        data = await readBody(cached, size, fileUrl, report);
        if ((await sha256Hex(data)) !== sha256) {
          await cache.delete(key); // damaged in the cache: fetch it again
          loaded -= size;
          data = null;
        }
      }
      if (data === null) {
        const response = await tryFetch(fileUrl);
        if (!response) {
          throw new ArtifactError(
            `${fileUrl} could not be fetched and is not cached; go online once or re-copy the bundle`,
          );
        }
        data = await readBody(response, size, fileUrl, report);
        if ((await sha256Hex(data)) !== sha256) {
          throw new ArtifactError(
            `${fileUrl} does not match its sha256 in ${tableName} (altered or corrupted); re-download the bundle`,
          );
        }
        await cache.put(key, new Response(data));
        fromNetwork = true;
      }
      bytes[name] = data;
    }
    await prune(cache, root, table);
    if (manifestText !== null) bytes[MANIFEST] = new TextEncoder().encode(manifestText);
    const manifest = parseManifest(decoder.decode(bytes[MANIFEST]), root + MANIFEST);
    const source = fromNetwork ? 'network' : 'cache';
    return new WebArtifact(root, manifest, bytes, source, { ort, executionProviders, fallbackExecutionProviders });
  }

  /** `{name: {size, sha256}}` as listed in the manifest. */
  get files() {
    return this.manifest.files ?? {};
  }

  /** URL of a file in the artifact. */
  path(name) {
    return this.root + name;
  }

  /** A JSON file of the artifact, parsed. */
  json(name) {
    if (!(name in this.bytes)) throw new ArtifactError(`${this.path(name)} is missing; rebuild the artifact`);
    return parseJson(decoder.decode(this.bytes[name]), this.path(name));
  }

  /**
   * An onnxruntime-web InferenceSession of the model graph (its external data passed in), configured by the
   * device profile, on the execution providers given to open(). The weights' bytes are released once
   * onnxruntime holds them.
   */
  async openSession() {
    const externalData = Object.keys(this.bytes)
      .filter(isModelData)
      .map((name) => ({ path: name, data: this.bytes[name] }));
    const create = (eps) =>
      createSession(
        this.ort.InferenceSession,
        this.bytes[MODEL_FILE],
        { ...sessionOptions(this.profile, eps), externalData },
        this.modelPath,
      );
    let session;
    try {
      session = await create(this.executionProviders);
    } catch (e) {
      // a provider that lacks a kernel for this graph (e.g. WebGPU's MatMulNBits takes 2- and 4-bit weights only)
      if (this.executionProviders[0] === 'wasm') throw e;
      if (!this.fallbackExecutionProviders) {
        throw new ArtifactError(
          `${this.executionProviders[0]} cannot run ${this.modelPath}: ${e.reason}; use the wasm execution provider`,
        );
      }
      this.fallbackReason = e.reason;
      this.executionProviders = this.fallbackExecutionProviders;
      session = await create(this.executionProviders);
    }
    for (const { path } of externalData) delete this.bytes[path];
    delete this.bytes[MODEL_FILE];
    return session;
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

const isModelData = (name) => name === MODEL_DATA_FILE || /^model\.onnx\.data\.\d+$/.test(name);
const needed = (name) =>
  [MANIFEST, MODEL_FILE, GENAI_CONFIG, TOKENIZER_FILE, TOKENIZER_CONFIG_FILE].includes(name) || isModelData(name);

/**
 * [files table, its file name, manifest.json's text when the table is the manifest's own]. The table comes
 * from the network when it answers (so a new bundle version is seen), else from the cache.
 */
async function readTable(root, cache) {
  for (const name of [BUNDLE_JSON, MANIFEST]) {
    const url = root + name;
    let response = await tryFetch(url);
    if (response) await cache.put(url, response.clone());
    else response = await cache.match(url);
    if (!response) continue;
    const text = await response.text();
    const meta = parseJson(text, url);
    if (name === BUNDLE_JSON) {
      if (meta?.format !== BUNDLE_FORMAT || typeof meta.files !== 'object' || meta.files === null) {
        throw new ArtifactError(`${url} is not a qwen-edge bundle table; package the artifact again`);
      }
      checkFileTable(meta.files, url);
      if (!(MANIFEST in meta.files)) {
        throw new ArtifactError(`${url} does not list ${MANIFEST}; package the artifact again`);
      }
      return [meta.files, BUNDLE_JSON, null];
    }
    const manifest = parseManifest(text, url);
    return [manifest.files ?? {}, MANIFEST, text];
  }
  throw new ArtifactError(
    `neither ${root}${BUNDLE_JSON} nor ${root}${MANIFEST} could be fetched or found in the cache; ` +
      'serve an unpacked web bundle or an artifact folder there (qwen-edge serve --web ARTIFACT)',
  );
}

/** Drop cached files of `root` that the current table no longer lists (older versions). */
async function prune(cache, root, table) {
  const keep = new Set(Object.entries(table).map(([name, { sha256 }]) => `${root}${name}?sha256=${sha256}`));
  for (const request of await cache.keys()) {
    if (request.url.startsWith(root) && request.url.includes('?sha256=') && !keep.has(request.url)) {
      await cache.delete(request);
    }
  }
}
