/**
 * The chat page's speed in headless Chromium (onnxruntime-web WASM) against the same loop on onnxruntime-node
 * (the anchor), interleaved in one run on one machine: load time, time to first token and decode tok/s of
 * greedy generation on the first evaluation chat prompt, with the greedy tokens of both compared.
 *
 *   node benchmarks/web.mjs [ARTIFACT=/work/art/demo] [--new 8] [--reps 2] [--ep wasm|webgpu] [--threads N]
 *
 * Needs `npm ci` in runtimes/js, Debian's chromium and the repo's .venv (it runs `qwen-edge serve --web`).
 * Writes benchmarks/results/<date>-web.json and prints one Markdown table.
 */

import { spawn } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';

import { Artifact, ChatTemplate, Generator, samplingParams } from '../runtimes/js/src/index.js';
import { launchChromium, openPage } from '../runtimes/js/test/browser.js';
import { python } from '../runtimes/js/test/helpers.js';

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    new: { type: 'string', default: '8' },
    reps: { type: 'string', default: '2' },
    ep: { type: 'string', default: 'wasm' },
    threads: { type: 'string' },
    chromium: { type: 'string', multiple: true, default: [] },
  },
});
const artifactDir = path.resolve(positionals[0] ?? '/work/art/demo');
const maxNew = Number(values.new);
const reps = Number(values.reps);
const prompt = JSON.parse(readFileSync(path.join(REPO, 'edge/data/eval/chat_prompts.json'), 'utf8'))[0];

/** TTFT (s), decode tok/s and the tokens of one greedy generation from an empty cache; EOS does not stop it. */
async function measure(generator, ids) {
  generator.reset();
  const g = generator.generate(ids, samplingParams(), { maxNewTokens: maxNew, stopTokenIds: [] });
  await g.read();
  const s = g.stats;
  return { ttftS: s.ttftS, decodeTokS: (g.tokenIds.length - 1) / s.decodeS, tokenIds: [...g.tokenIds] };
}

const server = spawn(python(), ['-m', 'qwen_edge', 'serve', artifactDir, '--web', '--port', '0', '--quiet'], {
  cwd: REPO, stdio: ['ignore', 'ignore', 'pipe'],
});
const url = await new Promise((resolve, reject) => {
  let err = '';
  server.stderr.on('data', (d) => {
    err += d;
    const m = err.match(/at (http:\/\/\S+\/web\/)/);
    if (m) resolve(m[1]);
  });
  server.on('exit', () => reject(new Error(`qwen-edge serve --web exited: ${err}`)));
});
const browser = await launchChromium(values.chromium);
try {
  const query = new URLSearchParams({ ep: values.ep, ...(values.threads ? { threads: values.threads } : {}) });
  const t0 = performance.now();
  const { page, state, status } = await openPage(browser, `${url}?${query}`, { timeout: 30 * 60e3 });
  if (state !== 'ready') throw new Error(`the page failed: ${status}`);
  const web = { loadS: (performance.now() - t0) / 1000, status, runs: [] };
  page.setDefaultTimeout(0);

  const t1 = performance.now();
  const artifact = await Artifact.open(artifactDir, { verify: 'size' });
  const generator = await Generator.create(artifact);
  const node = { loadS: (performance.now() - t1) / 1000, runs: [] };
  const ids = generator.encode(ChatTemplate.fromArtifact(artifact).render(prompt.messages));

  for (let rep = 0; rep < reps; rep++) { // interleaved: browser, then Node, each rep
    web.runs.push(await page.evaluate(async (ids, maxNew) => {
      const { generator } = window.qwenEdge;
      generator.reset();
      const g = generator.generate(ids, undefined, { maxNewTokens: maxNew, stopTokenIds: [] });
      await g.read();
      return { ttftS: g.stats.ttftS, decodeTokS: (g.tokenIds.length - 1) / g.stats.decodeS, tokenIds: [...g.tokenIds] };
    }, ids, maxNew));
    node.runs.push(await measure(generator, ids));
  }
  const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
  const summary = (r) => ({ ttftS: median(r.runs.map((x) => x.ttftS)), decodeTokS: median(r.runs.map((x) => x.decodeTokS)) });
  const result = {
    date: new Date().toISOString(),
    artifact: artifactDir,
    prompt: { id: prompt.id, tokens: ids.length },
    maxNew,
    reps,
    ep: values.ep,
    chromium: await browser.version(),
    web: { ...web, ...summary(web) },
    node: { ...node, ...summary(node) },
    sameTokens: web.runs.every((r) => JSON.stringify(r.tokenIds) === JSON.stringify(node.runs[0].tokenIds)),
  };
  const stamp = result.date.replace(/[-:]/g, '').slice(0, 13);
  const out = path.join(REPO, 'benchmarks', 'results', `${stamp}-web.json`);
  writeFileSync(out, `${JSON.stringify(result, null, 2)}\n`);
  const row = (name, r) => `| ${name} | ${r.loadS.toFixed(1)} | ${r.ttftS.toFixed(2)} | ${r.decodeTokS.toFixed(2)} |`;
  console.log(`${prompt.id} (${ids.length} prompt tokens), ${maxNew} new tokens, median of ${reps}; ${result.web.status}`);
  console.log('| runtime | load s | TTFT s | decode tok/s |\n|---|---|---|---|');
  console.log(row(`Chromium ${result.chromium}, onnxruntime-web ${values.ep}`, result.web));
  console.log(row('Node, onnxruntime-node cpu (anchor)', result.node));
  console.log(`same greedy tokens: ${result.sameTokens}; ratio web/node decode ${(result.web.decodeTokS / result.node.decodeTokS).toFixed(4)}; wrote ${out}`);
} finally {
  await browser.close();
  server.kill();
}
