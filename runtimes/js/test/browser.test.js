/**
 * The chat page in headless Chromium (Debian's package, driven by puppeteer-core): a `web` bundle of a tiny
 * artifact, packaged and unpacked by the Python toolkit, chats with the Python loop's greedy tokens over two
 * turns (the KV cache carried across them), refuses a file whose sha256 differs from bundle.json, opens again
 * from Cache Storage (page and model) once the server is gone, and `qwen-edge serve --web` serves an
 * artifact folder to it. On WebGPU through Chromium's software adapter (SwiftShader), tiny int4 Qwen2 (qkv bias)
 * and Qwen3 artifacts give the Python loop's greedy tokens: a check of onnxruntime-web's WebGPU kernels on our
 * graphs (MatMulNBits with 3 or 4 inputs), not of speed.
 */

import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import { cpSync, existsSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';

import { CHROMIUM, launchChromium, openPage, serveStatic } from './browser.js';
import { buildTinyArtifacts, python, pythonGreedy, REPO, tempDir } from './helpers.js';

const SKIP = !existsSync(CHROMIUM) && `no Chromium at ${CHROMIUM} (scripts/test.sh installs Debian's chromium)`;
const TURNS = ['What is the capital of France?', 'And of Italy? 🙂'];
const MAX_NEW = 16;

function qwenEdge(args) {
  return new Promise((resolve, reject) => {
    const child = spawn(python(), ['-m', 'qwen_edge', ...args], { cwd: REPO, stdio: ['ignore', 'pipe', 'pipe'] });
    let err = '';
    child.stderr.on('data', (d) => (err += d));
    child.on('exit', (code) => (code === 0 ? resolve() : reject(new Error(`qwen-edge ${args[0]} failed: ${err}`))));
  });
}

let tiny;
/** The tiny artifacts, built once for every suite of this file. */
const tinyArtifacts = () => (tiny ??= buildTinyArtifacts());

/** `qwen-edge serve --web DIR` on a free port; resolves to {url (the page), close}. */
function serveWeb(dir) {
  const child = spawn(python(), ['-m', 'qwen_edge', 'serve', dir, '--web', '--port', '0', '--quiet'], {
    cwd: REPO, stdio: ['ignore', 'ignore', 'pipe'],
  });
  return new Promise((resolve, reject) => {
    let err = '';
    child.stderr.on('data', (d) => {
      err += d;
      const m = err.match(/at (http:\/\/\S+\/web\/)/);
      if (m) resolve({ url: m[1], close: () => child.kill() });
    });
    child.on('exit', () => reject(new Error(`qwen-edge serve --web exited: ${err}`)));
  });
}

/** Type a message into the page and wait for its reply; returns the reply's text and token ids. */
async function chatTurn(page, text) {
  const before = await page.$$eval('.stats', (s) => s.length);
  await page.type('#input', text);
  await page.keyboard.press('Enter');
  await page.waitForFunction((n) => document.querySelectorAll('.stats').length > n, { timeout: 60000 }, before);
  return page.evaluate(() => {
    const replies = document.querySelectorAll('.assistant');
    const g = window.qwenEdge.chat.last;
    return { text: replies[replies.length - 1].textContent, tokenIds: [...g.tokenIds], stats: { ...g.stats } };
  });
}

describe('chat page in headless Chromium', { skip: SKIP }, () => {
  let artifacts;
  let bundleDir;
  let browser;
  before(async () => {
    artifacts = tinyArtifacts();
    const zip = path.join(tempDir(), 'tiny-web.zip');
    bundleDir = path.join(tempDir(), 'bundle');
    await qwenEdge(['package', artifacts['qwen3-int4'], '--target', 'web', '--out', zip, '--license-id', 'Apache-2.0']);
    await qwenEdge(['unpack', zip, bundleDir]);
    browser = await launchChromium();
  });
  after(async () => {
    await browser?.close();
  });

  test('a web bundle chats with the Python loop\'s greedy tokens, reusing the cache across turns', async () => {
    const server = await serveStatic(bundleDir);
    try {
      const { page, state, status, errors } = await openPage(browser, `${server.url}web/`);
      assert.equal(state, 'ready', `${status} ${errors.join('; ')}`);
      assert.match(status, /on wasm, 2 threads|on wasm, \d+ threads/, 'threads need cross-origin isolation');
      assert.equal(await page.evaluate(() => crossOriginIsolated), true);
      await page.$eval('#max-tokens', (e, n) => (e.value = String(n)), MAX_NEW);
      const first = await chatTurn(page, TURNS[0]);
      const second = await chatTurn(page, TURNS[1]);
      const [py1] = pythonGreedy(artifacts['qwen3-int4'], [{ messages: [{ role: 'user', content: TURNS[0] }], max_new_tokens: MAX_NEW }]);
      const history = [
        { role: 'user', content: TURNS[0] }, { role: 'assistant', content: py1.text }, { role: 'user', content: TURNS[1] },
      ];
      const [py2] = pythonGreedy(artifacts['qwen3-int4'], [{ messages: history, max_new_tokens: MAX_NEW }]);
      assert.deepEqual(first.tokenIds, py1.token_ids, 'turn 1 tokens');
      assert.equal(first.text, py1.text, 'turn 1 streamed text');
      assert.deepEqual(second.tokenIds, py2.token_ids, 'turn 2 tokens');
      assert.equal(second.text, py2.text, 'turn 2 streamed text');
      // the random tiny model's reply does not re-tokenize to its own ids, so at least turn 1's prompt is reused
      assert.ok(second.stats.reusedTokens >= py1.prompt_ids.length, 'turn 2 reuses the cached conversation');
      await page.close();
    } finally {
      await server.close();
    }
  });

  test('opens offline: the page and the model from Cache Storage once the server is gone', async () => {
    const server = await serveStatic(bundleDir);
    const first = await openPage(browser, `${server.url}web/`);
    assert.equal(first.state, 'ready', first.status);
    assert.match(first.status, /files from network/);
    await server.close();
    await first.page.reload();
    await first.page.waitForFunction(() => document.body.dataset.state !== 'loading', { timeout: 60000 });
    const status = await first.page.$eval('#status', (e) => e.textContent);
    assert.match(status, /^ready: .* files from cache/);
    const reply = await first.page.evaluate(() => window.qwenEdge.send('Hi', { maxNewTokens: 4 }));
    assert.equal(reply.tokenIds.length, 4);
    await first.page.close();
  });

  test('a file whose sha256 differs from bundle.json is refused in one line', async () => {
    const altered = path.join(tempDir(), 'altered');
    cpSync(bundleDir, altered, { recursive: true });
    const file = path.join(altered, 'tokenizer_config.json');
    const text = readFileSync(file, 'utf8');
    writeFileSync(file, text.replace('"', "'")); // same size, other bytes
    const server = await serveStatic(altered);
    try {
      const { page, state, status } = await openPage(browser, `${server.url}web/`);
      assert.equal(state, 'error');
      assert.match(status, /tokenizer_config\.json does not match its sha256 in bundle\.json .*; re-download the bundle$/);
      await page.close();
    } finally {
      await server.close();
    }
  });

  test('qwen-edge serve --web serves an artifact folder to the page (raw greedy prompt)', async () => {
    const dir = artifacts['qwen2-fp32'];
    const server = await serveWeb(dir);
    try {
      const { page, state, status } = await openPage(browser, server.url);
      assert.equal(state, 'ready', status);
      const js = await rawGreedy(page, CODE, MAX_NEW);
      const [py] = pythonGreedy(dir, [{ text: CODE, max_new_tokens: MAX_NEW }]);
      assert.deepEqual(js.tokenIds, py.token_ids);
      assert.equal(js.text, py.text);
      await page.close();
    } finally {
      server.close();
    }
  });
});

const CODE = 'def fibonacci(n: int) -> int:';

/** Greedy generation after the raw text `text` (no chat template) in the loaded page. */
function rawGreedy(page, text, maxNew) {
  return page.evaluate(async (t, n) => {
    const { generator } = window.qwenEdge;
    generator.reset();
    const g = generator.generate(generator.encode(t), undefined, { maxNewTokens: n });
    return { text: await g.read(), tokenIds: [...g.tokenIds] };
  }, text, maxNew);
}

// Chromium's software WebGPU adapter: the page then finds an adapter as on a machine with a GPU.
const SWIFTSHADER = ['--enable-unsafe-webgpu', '--use-webgpu-adapter=swiftshader'];

// Tiny int4 Qwen2s (with the qkv bias Qwen3 lacks), built like the conformance artifacts: tied, and untied,
// whose embedding table of its own keeps float16 scales on disk (SwiftShader has no shader-f16, so any float16
// arithmetic left on WebGPU would show here); and one whose lm_head keeps its first rows int8, as the demo's
// does, which onnxruntime-web's WebGPU MatMulNBits (2- and 4-bit only) cannot run.
const BUILD_QWEN2_INT4 = `
import json, sys
sys.path.insert(0, "tests/conformance")
from make_conformance import ARTIFACTS, build_artifacts
spec = {**ARTIFACTS["qwen3-int4"], "family": "qwen2"}
int8_rows = {**spec["precision"], "lm_head_int8_rows": 64}
specs = {
    "qwen2-int4": spec,
    "qwen2-int4-untied": {**spec, "tied": False},
    "qwen2-int8-rows": {**spec, "precision": int8_rows},
}
print(json.dumps({k: str(v) for k, v in build_artifacts(sys.argv[1], specs).items()}))
`;

/** The logits row of every position of `text`, run one cached step at a time in the loaded page. */
function stepLogits(page, text) {
  return page.evaluate(async (t) => {
    const { generator } = window.qwenEdge;
    generator.reset();
    const rows = [];
    for (const id of generator.encode(t)) rows.push([...(await generator.append([id]))]);
    return rows;
  }, text);
}

describe('WebGPU in headless Chromium (SwiftShader)', { skip: SKIP }, () => {
  let artifacts;
  let browser;
  before(async () => {
    const out = execFileSync(python(), ['-c', BUILD_QWEN2_INT4, tempDir()], { cwd: REPO, encoding: 'utf8' });
    artifacts = { ...tinyArtifacts(), ...JSON.parse(out.trim().split('\n').pop()) };
    browser = await launchChromium(SWIFTSHADER);
  });
  after(async () => {
    await browser?.close();
  });

  for (const name of ['qwen2-int4', 'qwen2-int4-untied', 'qwen3-int4']) {
    test(`${name} on WebGPU: the Python loop's greedy tokens, WASM's logits`, async () => {
      const server = await serveWeb(artifacts[name]);
      try {
        const { page, state, status, errors } = await openPage(browser, `${server.url}?ep=webgpu`);
        assert.equal(state, 'ready', `${status} ${errors.join('; ')}`);
        assert.match(status, / on webgpu,/);
        const adapter = await page.evaluate(async () => (await navigator.gpu.requestAdapter()).info.architecture);
        assert.equal(adapter, 'swiftshader');
        // the kernels WebGPU ran (onnxruntime-web's profiling; a node left to WASM does not appear)
        await page.evaluate(async () => {
          const ort = await import('onnxruntime-web');
          window.webgpuKernels = new Set();
          ort.env.webgpu.profiling = { mode: 'default', ondata: (d) => window.webgpuKernels.add(d.kernelType) };
        });
        const js = await rawGreedy(page, CODE, MAX_NEW);
        const kernels = await page.evaluate(() => [...window.webgpuKernels]);
        assert.ok(['MatMulNBits', 'GroupQueryAttention'].every((k) => kernels.includes(k)), kernels.join(' '));
        // The tiny random models soon repeat one token, so every cached step's logits are checked too: against
        // WASM in the same browser (the Python loop's int8 activations at accuracy level 4 differ by ~2%).
        const rows = await stepLogits(page, CODE);
        await page.close();
        const wasm = await openPage(browser, `${server.url}?ep=wasm`);
        assert.equal(wasm.state, 'ready', wasm.status);
        const want = await stepLogits(wasm.page, CODE);
        await wasm.page.close();
        const scale = Math.max(1, ...want.flat().map(Math.abs));
        const diff = Math.max(...rows.flatMap((row, i) => row.map((v, j) => Math.abs(v - want[i][j]))));
        assert.ok(diff < 1e-4 * scale, `WebGPU and WASM logits differ by ${diff} (scale ${scale})`);
        const [py] = pythonGreedy(artifacts[name], [{ text: CODE, max_new_tokens: MAX_NEW }]);
        assert.deepEqual(js.tokenIds, py.token_ids);
        assert.equal(js.text, py.text);
      } finally {
        server.close();
      }
    });
  }

  test('a model WebGPU cannot run: auto falls back to WASM, ?ep=webgpu is a one-line error', async () => {
    const server = await serveWeb(artifacts['qwen2-int8-rows']);
    try {
      const auto = await openPage(browser, server.url);
      assert.equal(auto.state, 'ready', auto.status);
      assert.match(auto.status, / on wasm, .*\(WebGPU cannot run this model: .*MatMulNBits.*\)/);
      const js = await rawGreedy(auto.page, CODE, MAX_NEW);
      await auto.page.close();
      const [py] = pythonGreedy(artifacts['qwen2-int8-rows'], [{ text: CODE, max_new_tokens: MAX_NEW }]);
      assert.deepEqual(js.tokenIds, py.token_ids);
      const forced = await openPage(browser, `${server.url}?ep=webgpu`);
      await forced.page.close();
      assert.equal(forced.state, 'error');
      assert.match(forced.status, /^webgpu cannot run .*model\.onnx: .*MatMulNBits.*; use the wasm execution provider$/);
      assert.ok(!forced.status.includes('\n'));
    } finally {
      server.close();
    }
  });
});

const REAL = process.env.QWEN_EDGE_REAL_ARTIFACT;

test('real artifact in Chromium (WASM): greedy tokens equal the Python loop', {
  skip: SKIP || (!REAL && 'set QWEN_EDGE_REAL_ARTIFACT'), timeout: 30 * 60e3,
}, async () => {
  const prompt = JSON.parse(readFileSync(path.join(REPO, 'edge', 'data', 'eval', 'chat_prompts.json'), 'utf8'))[0];
  const maxNew = 8; // onnxruntime-web's WASM MatMulNBits decodes the 0.5B demo at ~0.07 tok/s here
  const server = await serveWeb(REAL);
  const browser = await launchChromium();
  try {
    const { page, state, status } = await openPage(browser, `${server.url}?ep=wasm`, { timeout: 20 * 60e3 });
    assert.equal(state, 'ready', status);
    page.setDefaultTimeout(0);
    const [py] = pythonGreedy(REAL, [{ messages: prompt.messages, max_new_tokens: maxNew }]);
    const js = await page.evaluate((text, n) => window.qwenEdge.send(text, { maxNewTokens: n }), prompt.messages[0].content, maxNew);
    assert.deepEqual(js.tokenIds, py.token_ids);
    assert.equal(js.text, py.text);
  } finally {
    await browser.close();
    server.close();
  }
});
