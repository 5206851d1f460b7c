import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';

import { Tokenizer } from '@huggingface/tokenizers';

import { fimPrompt, fimStopIds } from '../src/fim.js';
import { ToolCallStream, parseReply } from '../src/tools.js';
import { REPO } from './helpers.js';

const CONFORMANCE = JSON.parse(readFileSync(path.join(REPO, 'tests/conformance/tool_calls.json'), 'utf8'));
const NAMES = new Set(CONFORMANCE.names);

test('tool-call replies parse as the Python runtime parses them (tests/conformance/tool_calls.json)', () => {
  for (const c of CONFORMANCE.cases) {
    const [content, calls] = parseReply(c.reply, NAMES);
    assert.equal(content, c.content, c.reply);
    assert.deepEqual(calls.map((k) => [k.name, k.arguments]), c.calls, c.reply);
    assert.ok(calls.every((k) => /^call_[0-9a-f]{24}$/.test(k.id) && k.openai(0).index === 0));
    for (const size of [1, 3, 1000]) {
      const stream = new ToolCallStream(NAMES);
      const parts = [];
      for (let i = 0; i < c.reply.length; i += size) parts.push(...stream.push(c.reply.slice(i, i + size)));
      parts.push(...stream.flush());
      const streamed = parts.filter(([k]) => k === 'tool_call').map(([, k]) => [k.name, k.arguments]);
      assert.deepEqual(streamed, c.calls, `${c.reply} in pieces of ${size}`);
    }
  }
});

const WORDS = { version: '1.0', normalizer: null, post_processor: null, decoder: null,
  model: { type: 'WordLevel', vocab: { a: 0, '<unk>': 1 }, unk_token: '<unk>' }, pre_tokenizer: { type: 'Whitespace' } };

test('fill-in-the-middle prompts need the FIM tokens', () => {
  const withFim = new Tokenizer(
    { ...WORDS,
      added_tokens: ['<|fim_prefix|>', '<|fim_suffix|>', '<|fim_middle|>', '<|endoftext|>'].map((content, i) => (
        { id: 2 + i, content, single_word: false, lstrip: false, rstrip: false, normalized: false, special: true })) },
    {},
  );
  assert.deepEqual(fimPrompt(withFim, 'a', 'a a'), [2, 0, 3, 0, 0, 4]);
  assert.deepEqual([...fimStopIds(withFim, [9])].sort(), [2, 3, 4, 5, 9]);
  const plain = new Tokenizer({ ...WORDS, added_tokens: [] }, {});
  assert.throws(() => fimPrompt(plain, 'a', 'a'), /no <\|fim_prefix\|>.*cannot fill in the middle/);
});
