import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { closeSync, cpSync, openSync, readSync, statSync, truncateSync, writeSync } from 'node:fs';
import path from 'node:path';
import { before, describe, test } from 'node:test';

import {
  Artifact, ArtifactError, ChatSession, ChatTemplate, ContextOverflowError, Detokenizer, Generator, Sampler, StopFilter, CLOSE_THINKING, ThinkingBudget, samplingParams, stripThinking,
} from '../src/index.js';
import { buildTinyArtifacts, pythonGreedy, REPO, tempDir } from './helpers.js';

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
  const template = ChatTemplate.fromTokenizerConfig(artifact.tokenizerConfigPath);
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
