import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import {
  closeSync, copyFileSync, cpSync, openSync, readdirSync, readFileSync, readSync, rmSync, statSync, truncateSync,
  writeFileSync, writeSync,
} from 'node:fs';
import path from 'node:path';
import { before, describe, test } from 'node:test';

import ort from 'onnxruntime-node';

import {
  Artifact, ArtifactError, ChatSession, ChatTemplate, ContextOverflowError, Detokenizer, Generator, Sampler, StopFilter, CLOSE_THINKING, ThinkingBudget, samplingParams, stripThinking,
} from '../src/index.js';
import { GROWING, GraphLayout, SHARED, STATIC } from '../src/contract.js';
import { buildTinyArtifacts, pythonGreedy, REPO, tempDir } from './helpers.js';
import { sha256File } from '../src/artifact.js';

let artifacts;
before(() => {
  artifacts = buildTinyArtifacts();
});

const CASES = [
  { text: 'def fibonacci(n: int) -> int:', max_new_tokens: 24 },
  { messages: [{ role: 'user', content: 'What is the capital of France?' }], max_new_tokens: 24 },
  { messages: [{ role: 'system', content: 'Be brief.' }, { role: 'user', content: '你好，世界！今天天气很好。' }], max_new_tokens: 24 },
  { messages: [{ role: 'user', content: 'Bonjour le monde ! Où est la bibliothèque ? 🙂' }], max_new_tokens: 24 },
];

async function jsGreedy(dir, cases) {
  const artifact = await Artifact.open(dir);
  const gen = await Generator.create(artifact);
  const template = ChatTemplate.fromArtifact(artifact);
  const results = [];
  for (const c of cases) {
    const prompt = c.messages ? template.render(c.messages, { addGenerationPrompt: true }) : c.text;
    const ids = gen.encode(prompt);
    gen.reset();
    const g = gen.generate(ids, samplingParams(), { maxNewTokens: c.max_new_tokens });
    const text = await g.read();
    results.push({ prompt, prompt_ids: ids, token_ids: g.tokenIds, text, finish_reason: g.finishReason });
  }
  return results;
}

describe('same tokens as the Python loop', () => {
  for (const name of ['qwen2-fp32', 'qwen3-int4']) {
    test(`${name}: template, tokenizer, greedy tokens and text`, async () => {
      const py = pythonGreedy(artifacts[name], CASES);
      const js = await jsGreedy(artifacts[name], CASES);
      for (let i = 0; i < CASES.length; i++) {
        assert.equal(js[i].prompt, py[i].prompt, `case ${i}: rendered prompt`);
        assert.deepEqual(js[i].prompt_ids, py[i].prompt_ids, `case ${i}: prompt ids`);
        assert.deepEqual(js[i].token_ids, py[i].token_ids, `case ${i}: generated ids`);
        assert.equal(js[i].text, py[i].text, `case ${i}: streamed text`);
        assert.equal(js[i].finish_reason, py[i].finish_reason, `case ${i}: finish reason`);
      }
    });
  }
});

function copyArtifact(dir) {
  const out = tempDir();
  cpSync(dir, out, { recursive: true });
  return out;
}

describe('artifact verification', () => {
  test('a byte-flipped file is rejected by sha256', async () => {
    const dir = copyArtifact(artifacts['qwen2-fp32']);
    const file = path.join(dir, 'model.onnx.data');
    const fd = openSync(file, 'r+');
    const b = Buffer.alloc(1);
    const at = Math.floor(statSync(file).size / 2);
    readSync(fd, b, 0, 1, at);
    b[0] ^= 0xff;
    writeSync(fd, b, 0, 1, at);
    closeSync(fd);
    await assert.rejects(Artifact.open(dir), (e) => e instanceof ArtifactError && /model\.onnx\.data does not match its sha256/.test(e.message));
    await Artifact.open(dir, { verify: 'size' }); // same size: only the full check catches it
  });

  test('a truncated file is rejected by size', async () => {
    const dir = copyArtifact(artifacts['qwen2-fp32']);
    truncateSync(path.join(dir, 'tokenizer.json'), 100);
    await assert.rejects(Artifact.open(dir, { verify: 'size' }), (e) => e instanceof ArtifactError && /has 100 bytes, the manifest says/.test(e.message));
  });

  test('a missing directory or manifest says what to do', async () => {
    await assert.rejects(Artifact.open('/nonexistent/artifact'), /is not an artifact directory/);
    const dir = tempDir();
    await assert.rejects(Artifact.open(dir), /manifest\.json is missing/);
  });
});

describe('sampling', () => {
  const params = (seed) => samplingParams({ temperature: 1.2, topK: 100, topP: 0.95, minP: 0.01, repetitionPenalty: 1.1, seed });

  test('a seed reproduces a sampled run; another seed changes it', async () => {
    const gen = await Generator.create(await Artifact.open(artifacts['qwen2-fp32'], { verify: 'none' }));
    const ids = gen.encode('Hello, world! How are you today?');
    const run = async (seed) => {
      const g = gen.generate(ids, params(seed), { maxNewTokens: 32 });
      await g.read();
      return g.tokenIds;
    };
    const a = await run(7);
    assert.deepEqual(await run(7), a);
    assert.notDeepEqual(await run(8), a);
  });

  test('top-k, top-p, min-p and the repetition penalty keep only the tokens they should', () => {
    const row = Float32Array.from([0, 5, 4.9, 1, 3, -2]); // probabilities at temperature 1: ids 1, 2 lead, then 4
    const draws = (params, seen = null) => {
      const s = new Sampler(samplingParams({ temperature: 1, seed: 0, ...params }));
      return new Set(Array.from({ length: 400 }, () => s.pick(row, seen)));
    };
    assert.deepEqual([...draws({ topK: 2 })].sort(), [1, 2]);
    assert.deepEqual([...draws({ topP: 0.45 })], [1]); // p(1) = 0.48
    assert.deepEqual([...draws({ topP: 0.9 })].sort(), [1, 2]); // p(1) + p(2) = 0.92
    assert.deepEqual([...draws({ minP: 0.5 })].sort(), [1, 2]);
    assert.deepEqual([...draws({ topK: 3, minP: 0.1 })].sort(), [1, 2, 4]);
    assert.ok(draws({}).size >= 4, 'no filter: the tail is drawn too');
    const greedy = new Sampler(samplingParams({ repetitionPenalty: 2 }));
    assert.equal(greedy.pick(row, [1, 1]), 2, 'the penalty divides a positive seen logit once');
    assert.deepEqual(row, Float32Array.from([0, 5, 4.9, 1, 3, -2]), 'the logits row is not modified');
  });

  test('bad parameters are one-line errors', () => {
    assert.throws(() => samplingParams({ topP: 0 }), /top_p must be in \(0, 1\]/);
    assert.throws(() => samplingParams({ temperature: -1 }), /temperature must be >= 0/);
  });
});

describe('streaming', () => {
  test('Chinese text streams whole characters only', async () => {
    const artifact = await Artifact.open(artifacts['qwen2-fp32'], { verify: 'none' });
    const gen = await Generator.create(artifact);
    const text = '你好，世界！今天天气很好。量化可以让模型在手机上运行。';
    const ids = gen.encode(text);
    assert.ok(ids.length > [...text].length, 'the tiny tokenizer splits some characters over several tokens');
    const detok = new Detokenizer(gen.tokenizer);
    const pieces = ids.map((id) => detok.push(id));
    assert.ok(pieces.includes(''), 'some tokens complete no character and are held back');
    for (const p of pieces) assert.ok(!p.includes('\uFFFD'), `piece ${JSON.stringify(p)} splits a character`);
    assert.equal(pieces.join(''), text);
  });

  test('bytes that never complete a character are flushed at the end as U+FFFD', async () => {
    const artifact = await Artifact.open(artifacts['qwen2-fp32'], { verify: 'none' });
    const gen = await Generator.create(artifact);
    const tok = gen.tokenizer;
    // the first byte-level symbol of a three-byte character, alone: an incomplete UTF-8 sequence
    const lead = tok.token_to_id([...tok.encode('界').tokens[0]][0]);
    const ids = [...gen.encode('hello'), lead];
    const detok = new Detokenizer(tok);
    const pieces = ids.map((id) => detok.push(id));
    assert.equal(pieces.at(-1), '');
    assert.equal(pieces.join('') + detok.flush(), tok.decode(ids, { skip_special_tokens: true }));
    assert.equal(detok.flush(), '');
  });

  test('stop strings end generation and are held back, not emitted', () => {
    const f = new StopFilter(['<END>']);
    assert.deepEqual(f.push('abc<E'), ['abc', false]);
    assert.deepEqual(f.push('N'), ['', false]);
    assert.deepEqual(f.push('D>tail'), ['', true]);
    const g = new StopFilter(['<END>']);
    assert.deepEqual(g.push('x<'), ['x', false]);
    assert.deepEqual(g.push('y'), ['<y', false]);
  });

  test('a stop string cuts the generated text where it starts', async () => {
    const gen = await Generator.create(await Artifact.open(artifacts['qwen2-fp32'], { verify: 'none' }));
    const ids = gen.encode('Hello, world!');
    const full = await gen.generate(ids, samplingParams(), { maxNewTokens: 16 }).read();
    const stop = full.slice(4, 7);
    const g = gen.generate(ids, samplingParams(), { maxNewTokens: 16, stopStrings: [stop] });
    const pieces = [];
    for await (const p of g) pieces.push(p);
    assert.equal(g.finishReason, 'stop');
    assert.equal(pieces.join(''), full.slice(0, full.indexOf(stop)));
  });
});

describe('KV cache and context', () => {
  test('a second chat turn reuses the cached first turn and gives the same tokens as a fresh run', async () => {
    const artifact = await Artifact.open(artifacts['qwen3-int4'], { verify: 'none' });
    const chat = new ChatSession(await Generator.create(artifact), { system: 'Be brief.' });
    const drain = async (it) => { for await (const _ of it); }; // eslint-disable-line no-unused-vars
    await drain(chat.send('Hello!', samplingParams(), { maxNewTokens: 8 }));
    assert.equal(chat.messages.length, 3);
    const prompt = chat.template.render([...chat.messages, { role: 'user', content: 'What is the capital of France?' }]);
    await drain(chat.send('What is the capital of France?', samplingParams(), { maxNewTokens: 8 }));
    assert.ok(chat.last.stats.reusedTokens > 10, `reused ${chat.last.stats.reusedTokens} tokens`);
    const fresh = await Generator.create(artifact);
    const g = fresh.generate(fresh.encode(prompt), samplingParams(), { maxNewTokens: 8 });
    await g.read();
    assert.deepEqual(chat.last.tokenIds, g.tokenIds);
  });

  test('the thinking budget closes thinking after N tokens and the history drops the thinking', async () => {
    const hook = new ThinkingBudget(3, 1, 2, [9, 2, 9], false);
    assert.deepEqual([5, 1, 5, 5].map((t) => hook.onToken(t)), [null, null, null, null]);
    assert.deepEqual(hook.onToken(5), [9, 2, 9]);
    assert.equal(hook.onToken(5), null);
    const artifact = await Artifact.open(artifacts['qwen3-int4'], { verify: 'none' });
    const gen = await Generator.create(artifact);
    const chat = new ChatSession(gen, { enableThinking: true, thinkingBudget: 5 });
    const render = chat.render.bind(chat);
    chat.render = () => `${render()}<think>\n`; // a template that opens thinking in the generation prompt
    let text = '';
    for await (const piece of chat.send('Think a little', samplingParams(), { maxNewTokens: 20 })) text += piece;
    const close = gen.encode(CLOSE_THINKING);
    assert.deepEqual(chat.last.tokenIds.slice(5, 5 + close.length), close);
    assert.ok(text.includes('</think>'));
    assert.equal(chat.messages.at(-1).content, stripThinking(text));
    assert.ok(!chat.messages.at(-1).content.includes('</think>'));
    assert.throws(() => new ChatSession(gen, { thinkingBudget: 0 }), /thinking budget must be >= 1/);
  });

  test('a prompt beyond max_length is refused with the numbers', async () => {
    const gen = await Generator.create(await Artifact.open(artifacts['qwen2-fp32'], { verify: 'none' }), { maxLength: 8 });
    assert.throws(() => gen.generate(gen.encode('The quick brown fox jumps over the lazy dog.'), samplingParams(), { maxNewTokens: 4 }),
      (e) => e instanceof ContextOverflowError && /the context holds 8/.test(e.message));
    const g = gen.generate(gen.encode('Hello'), samplingParams(), { maxNewTokens: 50 });
    await g.read();
    assert.equal(g.finishReason, 'length');
    assert.equal(gen.position, 8);
  });
});

/**
 * Copy artifact `src`, let `change(dir, manifest)` edit its files and manifest (in place), then rewrite the
 * manifest's file table (size + sha256 of every file) as the build would.
 */
async function rewriteArtifact(src, change) {
  const dir = copyArtifact(src);
  const manifestPath = path.join(dir, 'manifest.json');
  const manifest = JSON.parse(readFileSync(manifestPath, 'utf8'));
  await change(dir, manifest);
  manifest.files = {};
  for (const name of readdirSync(dir).sort()) {
    if (name === 'manifest.json') continue;
    const file = path.join(dir, name);
    manifest.files[name] = { size: statSync(file).size, sha256: await sha256File(file) };
  }
  writeFileSync(manifestPath, JSON.stringify(manifest));
  return dir;
}

/** rewriteArtifact with `edit(config)` applied to genai_config.json. */
function rewriteGenaiConfig(src, edit) {
  return rewriteArtifact(src, (dir) => {
    const file = path.join(dir, 'genai_config.json');
    const config = JSON.parse(readFileSync(file, 'utf8'));
    edit(config);
    writeFileSync(file, JSON.stringify(config));
  });
}

const oneLine = (pattern) => (e) => e instanceof ArtifactError && !e.message.includes('\n') && pattern.test(e.message);

async function greedyRuns(dir, prompts, maxNewTokens = 12) {
  const gen = await Generator.create(await Artifact.open(dir, { verify: 'none' }), { prefillChunk: 5 });
  const runs = [];
  for (const ids of prompts) {
    const g = gen.generate(ids, samplingParams(), { maxNewTokens, stopTokenIds: [] });
    await g.read();
    runs.push({ tokenIds: g.tokenIds, reused: g.stats.reusedTokens });
  }
  return { gen, runs };
}

describe('graph layouts (genai_config.json)', () => {
  test('a native artifact states the shared layout; without genai_config.json it is the same', async () => {
    const native = await Artifact.open(artifacts['qwen2-fp32'], { verify: 'none' });
    assert.equal(native.layout.kvCache, SHARED);
    assert.equal(native.layout.positionIds, false);
    const bare = await rewriteArtifact(artifacts['qwen2-fp32'], (dir) => rmSync(path.join(dir, 'genai_config.json')));
    const layout = (await Artifact.open(bare)).layout;
    assert.deepEqual([layout.kvCache, layout.positionIds, layout.names], [SHARED, false, native.layout.names]);
    const ids = [[10, 11, 12, 13, 14, 15, 16]];
    assert.deepEqual((await greedyRuns(bare, ids)).runs, (await greedyRuns(artifacts['qwen2-fp32'], ids)).runs);
  });

  test('the growing layout feeds presents back as the past, rolls back and reuses the prefix', async () => {
    const growing = await rewriteGenaiConfig(artifacts['qwen2-fp32'], (c) => {
      c.search.past_present_share_buffer = false;
    });
    assert.equal((await Artifact.open(growing)).layout.kvCache, GROWING);
    const first = Array.from({ length: 17 }, (_, i) => 20 + i);
    const prompts = [first, [...first.slice(0, 9), 50, 51, 52], [...first.slice(0, 9), 50, 51, 52, 53]];
    const a = await greedyRuns(growing, prompts);
    const b = await greedyRuns(artifacts['qwen2-fp32'], prompts);
    assert.deepEqual(a.runs, b.runs);
    assert.deepEqual(a.runs.map((r) => r.reused), [0, 9, 12]); // rolled back to the shared prefix, then extended
    for (const [i, ids] of prompts.entries()) { // each equals a fresh run on its own
      const fresh = await greedyRuns(growing, [ids]);
      assert.deepEqual(fresh.runs[0].tokenIds, a.runs[i].tokenIds, `prompt ${i}`);
    }
    assert.equal(a.gen.past['past_key_values.0.key'].dims[2], a.gen.position);
  });

  test('position_ids follow the cache position, and a rollback slices the past', async () => {
    const artifact = await Artifact.open(artifacts['qwen2-fp32'], { verify: 'none' });
    const { numLayers, numKvHeads: heads, headDim: dim, vocabSize } = artifact.model;
    const layout = new GraphLayout(GROWING, true, { ...artifact.layout.names, positionIds: 'position_ids' });
    const kv = layout.kvNames(numLayers);
    const feeds = [];
    // a fake plain-operator graph: present = past + this step, each new position filled with its position id
    const session = {
      inputNames: ['input_ids', 'attention_mask', 'position_ids', ...kv.map(([p]) => p)],
      outputNames: ['logits', ...kv.map(([, q]) => q)],
      async run(f) {
        feeds.push(f);
        const positions = Array.from(f.position_ids.data, Number);
        const past = f[kv[0][0]];
        const len = past.dims[2] + positions.length;
        const out = { logits: new ort.Tensor('float32', new Float32Array(positions.length * vocabSize),
          [1, positions.length, vocabSize]) };
        out.logits.data[out.logits.data.length - vocabSize + 7] = 1; // always picks token 7
        for (const [p, q] of kv) {
          const data = new Float32Array(heads * len * dim);
          for (let h = 0; h < heads; h++) {
            data.set(f[p].data.subarray(h * past.dims[2] * dim, (h + 1) * past.dims[2] * dim), h * len * dim);
            const at = (i) => (h * len + past.dims[2] + i) * dim;
            positions.forEach((t, i) => data.fill(t, at(i), at(i + 1)));
          }
          out[q] = new ort.Tensor('float32', data, [1, heads, len, dim]);
        }
        return out;
      },
    };
    const fake = { root: artifact.root, modelPath: artifact.modelPath, model: artifact.model, profile: {}, layout };
    const gen = new Generator(fake, session, null, { maxLength: 64, prefillChunk: 4 });
    await gen.append([1, 2, 3, 4, 5, 6]); // two chunks: 4 + 2
    await gen.append([7]);
    gen.truncate(3);
    await gen.append([8, 9]);
    const steps = feeds.map((f) => ({
      positions: Array.from(f.position_ids.data, Number),
      mask: f.attention_mask.dims[1],
      pastLen: f[kv[0][0]].dims[2],
    }));
    assert.deepEqual(steps, [
      { positions: [0, 1, 2, 3], mask: 4, pastLen: 0 },
      { positions: [4, 5], mask: 6, pastLen: 4 },
      { positions: [6], mask: 7, pastLen: 6 },
      { positions: [3, 4], mask: 5, pastLen: 3 },
    ]);
    const past = feeds[3][kv[1][0]]; // after the rollback: each head's first 3 positions, in order
    for (let h = 0; h < heads; h++) {
      const row = Array.from({ length: 3 }, (_, t) => past.data[(h * 3 + t) * dim]);
      assert.deepEqual(row, [0, 1, 2], `head ${h}`);
    }
    assert.equal(gen.past[kv[0][0]].dims[2], 5);
  });

  test('a graph that takes position_ids unlisted in genai_config.json, or lacks listed ones, is refused', async () => {
    const artifact = await Artifact.open(artifacts['qwen2-fp32'], { verify: 'none' });
    const kv = artifact.layout.kvNames(artifact.model.numLayers);
    const session = {
      inputNames: ['input_ids', 'attention_mask', 'position_ids', ...kv.map(([p]) => p)],
      outputNames: ['logits', ...kv.map(([, q]) => q)],
    };
    assert.throws(() => new Generator(artifact, session, null, {}),
      oneLine(/takes position_ids but genai_config\.json does not list them; rebuild the artifact/));
    const declared = await rewriteGenaiConfig(artifacts['qwen2-fp32'], (c) => {
      c.model.decoder.inputs.position_ids = 'position_ids';
    });
    const opened = await Artifact.open(declared);
    assert.equal(opened.layout.positionIds, true);
    await assert.rejects(Generator.create(opened), oneLine(/lacks the graph inputs\/outputs position_ids .*rebuild/));
  });

  test('a malformed genai_config.json is one line saying to rebuild', async () => {
    const broken = await rewriteArtifact(artifacts['qwen2-fp32'], (dir) => {
      const file = path.join(dir, 'genai_config.json');
      writeFileSync(file, readFileSync(file, 'utf8').slice(0, 200));
    });
    await assert.rejects(Artifact.open(broken),
      oneLine(/genai_config\.json is unreadable or malformed \(.*\); rebuild the artifact$/));
    const edits = [
      (c) => { c.search.past_present_share_buffer = 'no'; },
      (c) => { c.model.decoder.inputs = ['input_ids']; },
      (c) => { delete c.model.decoder; },
      (c) => { c.model.decoder.outputs.present_key_names = 'present.key'; },
    ];
    for (const edit of edits) {
      await assert.rejects(Artifact.open(await rewriteGenaiConfig(artifacts['qwen2-fp32'], edit)),
        oneLine(/genai_config\.json.* malformed|not a graph name pattern.*rebuild the artifact/));
    }
  });

  test('an NPU (static) artifact is refused in one line that says what to do', async () => {
    const npu = await rewriteArtifact(artifacts['qwen2-fp32'], (dir, manifest) => {
      for (const graph of ['prefill.onnx', 'decode.onnx']) {
        copyFileSync(path.join(dir, 'model.onnx'), path.join(dir, graph));
      }
      rmSync(path.join(dir, 'model.onnx'));
      manifest.static = { prefill: 'prefill.onnx', decode: 'decode.onnx', chunk: 32, context_length: 256 };
      manifest.profile = { ...manifest.profile, execution_provider: 'qnn' };
    });
    const artifact = await Artifact.open(npu); // verifies like any artifact: the two graphs instead of model.onnx
    assert.equal(artifact.layout.kvCache, STATIC);
    const refusal = new RegExp("is an NPU artifact .*Python runtime \\(qwen-edge run\\) and the device's QNN " +
      'execution provider, or build a CPU recipe for JavaScript$');
    await assert.rejects(Generator.create(artifact), oneLine(refusal));
    const cli = path.join(REPO, 'runtimes', 'js', 'bin', 'qwen-edge-js.mjs');
    const r = spawnSync(process.execPath, [cli, 'run', npu, 'hi'], { encoding: 'utf8' });
    assert.equal(r.status, 2);
    assert.match(r.stderr, /^error: .*is an NPU artifact .*build a CPU recipe for JavaScript\n$/);
  });
});

describe('CLI', () => {
  const cli = path.join(REPO, 'runtimes', 'js', 'bin', 'qwen-edge-js.mjs');
  test('run streams the same text as the library', async () => {
    const out = execFileSync(process.execPath, [cli, 'run', artifacts['qwen2-fp32'], 'Hello, world!', '--no-chat-template', '--max-new-tokens', '8'], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
    const gen = await Generator.create(await Artifact.open(artifacts['qwen2-fp32'], { verify: 'none' }));
    const text = await gen.generate(gen.encode('Hello, world!'), samplingParams(), { maxNewTokens: 8 }).read();
    assert.equal(out, `${text}\n`);
  });

  test('a bad artifact exits 2 with one line', () => {
    const r = spawnSync(process.execPath, [cli, 'run', '/nonexistent', 'hi'], { encoding: 'utf8' });
    assert.equal(r.status, 2);
    assert.match(r.stderr, /^error: .*is not an artifact directory.*\n$/);
  });
});
