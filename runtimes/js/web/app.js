/**
 * The chat page: opens the artifact or unpacked web bundle at ?model= (default "../", where a web bundle keeps
 * it), verified and cached by WebArtifact, and chats with the same Generator and ChatSession as Node, on
 * onnxruntime-web (WASM with SIMD, threads when the page is cross-origin isolated; WebGPU where the browser has
 * an adapter, or with ?ep=webgpu / ?ep=wasm). window.qwenEdge exposes the loaded runtime to tests and benchmarks.
 */

import * as ort from 'onnxruntime-web';

import { ChatSession } from './src/chat.js';
import { QwenEdgeError } from './src/errors.js';
import { Generator } from './src/generator.js';
import { samplingParams } from './src/sampling.js';
import { WebArtifact } from './src/web.js';

const params = new URLSearchParams(location.search);
const $ = (id) => document.getElementById(id);

function status(text, error = false) {
  $('status').textContent = text;
  $('status').classList.toggle('error', error);
}

/**
 * The execution providers and the fallback: ?ep=wasm | webgpu | auto (WebGPU when the browser has an adapter,
 * WASM when WebGPU cannot run the model).
 */
async function executionProviders() {
  const want = params.get('ep') ?? 'auto';
  if (!['auto', 'wasm', 'webgpu'].includes(want)) throw new QwenEdgeError(`?ep=${want} is not one of auto, wasm, webgpu`);
  if (want === 'wasm') return { eps: ['wasm'], fallback: null };
  const adapter = navigator.gpu ? await navigator.gpu.requestAdapter().catch(() => null) : null;
  if (!adapter && want === 'webgpu') {
    throw new QwenEdgeError('this browser offers no WebGPU adapter; open the page with ?ep=wasm');
  }
  if (!adapter) return { eps: ['wasm'], fallback: null };
  return { eps: ['webgpu', 'wasm'], fallback: want === 'auto' ? ['wasm'] : null };
}

function bubble(role, text = '') {
  const div = document.createElement('div');
  div.className = `msg ${role}`;
  div.textContent = text;
  $('log').append(div);
  return div;
}

/** Register sw.js and keep a copy of every page file this visit loaded, so the page opens offline too. */
async function keepPageOffline() {
  if (!('serviceWorker' in navigator)) return;
  await navigator.serviceWorker.register('./sw.js');
  await navigator.serviceWorker.ready;
  const base = new URL('./', import.meta.url).href;
  const page = new URL('./', location.href).href; // index.html, whatever the query
  const loaded = performance.getEntriesByType('resource').map((e) => e.name).filter((u) => u.startsWith(base));
  const cache = await caches.open('qwen-edge-page');
  for (const url of new Set([page, ...loaded])) {
    if (!(await cache.match(url, { ignoreSearch: true }))) await cache.add(url);
  }
}

async function main() {
  ort.env.wasm.wasmPaths = new URL('./vendor/onnxruntime-web/', import.meta.url).href;
  const cores = navigator.hardwareConcurrency || 1;
  ort.env.wasm.numThreads = crossOriginIsolated ? Number(params.get('threads') ?? Math.min(cores, 4)) : 1;
  const { eps: wanted, fallback } = await executionProviders();
  const model = params.get('model') ?? '../';
  $('model').textContent = new URL(model, location.href).href;
  status('checking files…');
  const t0 = performance.now();
  const artifact = await WebArtifact.open(model, {
    ort,
    executionProviders: wanted,
    fallbackExecutionProviders: fallback,
    onProgress: ({ name, loaded, total }) => {
      $('progress').value = loaded / total;
      status(`${name}: ${(loaded / 1e6).toFixed(1)} / ${(total / 1e6).toFixed(1)} MB checked`);
    },
  });
  status('starting onnxruntime…');
  const generator = await Generator.create(artifact);
  const eps = artifact.executionProviders; // the ones the session runs on
  const loadS = (performance.now() - t0) / 1000;
  const chat = new ChatSession(generator);
  const threads = ort.env.wasm.numThreads;
  const backend = `${eps[0]}${eps[0] === 'wasm' ? `, ${threads} thread${threads === 1 ? '' : 's'}` : ''}`;
  const why = artifact.fallbackReason ? ` (WebGPU cannot run this model: ${artifact.fallbackReason})` : '';
  status(`ready: ${artifact.manifest.recipe?.name ?? 'model'} on ${backend}${why}, files from ${artifact.source} (${loadS.toFixed(1)} s)`);
  $('progress').hidden = true;

  /** One user turn: stream the reply into the page; returns its text, token ids and stats. */
  async function send(text, { temperature = 0, maxNewTokens = 256 } = {}) {
    bubble('user', text);
    const out = bubble('assistant');
    for await (const piece of chat.send(text, samplingParams({ temperature }), { maxNewTokens })) {
      out.textContent += piece;
      $('log').scrollTop = $('log').scrollHeight;
    }
    const g = chat.last;
    const s = g.stats;
    const rate = g.tokenIds.length > 1 && s.decodeS > 0 ? ((g.tokenIds.length - 1) / s.decodeS).toFixed(1) : '–';
    const info = bubble('stats', `${g.tokenIds.length} tokens, first after ${(s.ttftS * 1000).toFixed(0)} ms ` +
      `(${s.prefillTokens} prompt tokens run, ${s.reusedTokens} reused), ${rate} tok/s`);
    info.className = 'stats';
    return { text: g.text, tokenIds: [...g.tokenIds], finishReason: g.finishReason, stats: { ...s } };
  }

  const input = $('input');
  const controls = [input, $('send'), $('reset')];
  const busy = (on) => controls.forEach((c) => (c.disabled = on));
  $('form').addEventListener('submit', async (event) => {
    event.preventDefault();
    const text = input.value.trim();
    if (!text) return;
    input.value = '';
    busy(true);
    try {
      await send(text, { temperature: Number($('temperature').value), maxNewTokens: Number($('max-tokens').value) });
    } catch (e) {
      status(e.message, true);
    } finally {
      busy(false);
      input.focus();
    }
  });
  input.addEventListener('keydown', (event) => {
    if (event.key === 'Enter' && !event.shiftKey) {
      event.preventDefault();
      $('form').requestSubmit();
    }
  });
  $('reset').addEventListener('click', () => {
    chat.reset();
    $('log').replaceChildren();
  });
  busy(false);
  await keepPageOffline();
  window.qwenEdge = { artifact, generator, chat, send, executionProviders: eps, threads, loadS };
  document.body.dataset.state = 'ready';
}

main().catch((e) => {
  status(e instanceof QwenEdgeError ? e.message : `failed: ${e?.message ?? e}`, true);
  document.body.dataset.state = 'error';
  console.error(e);
});
