/** Greedy JS tokens == Python tokens on a real artifact for the evaluation chat prompts.
 * Runs only with QWEN_EDGE_REAL_ARTIFACT=/path/to/artifact (e.g. the demo Qwen2.5-Coder-0.5B int4). */

import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';

import { Artifact, ChatTemplate, Generator, samplingParams } from '../src/index.js';
import { pythonGreedy, REPO } from './helpers.js';

const ARTIFACT = process.env.QWEN_EDGE_REAL_ARTIFACT;
const MAX_NEW = 32;

test('real artifact: greedy tokens equal the Python loop on the evaluation chat prompts', { skip: !ARTIFACT && 'set QWEN_EDGE_REAL_ARTIFACT' }, async () => {
  const prompts = JSON.parse(readFileSync(path.join(REPO, 'edge', 'data', 'eval', 'chat_prompts.json'), 'utf8'));
  const cases = prompts.map((p) => ({ messages: p.messages, max_new_tokens: MAX_NEW }));
  const py = pythonGreedy(ARTIFACT, cases);
  const artifact = await Artifact.open(ARTIFACT, { verify: 'size' });
  const gen = await Generator.create(artifact);
  const template = ChatTemplate.fromArtifact(artifact);
  for (let i = 0; i < prompts.length; i++) {
    const ids = gen.encode(template.render(prompts[i].messages, { addGenerationPrompt: true }));
    assert.deepEqual(ids, py[i].prompt_ids, `${prompts[i].id}: prompt ids`);
    gen.reset();
    const g = gen.generate(ids, samplingParams(), { maxNewTokens: MAX_NEW });
    await g.read();
    assert.deepEqual(g.tokenIds, py[i].token_ids, `${prompts[i].id}: generated ids`);
    assert.equal(g.text, py[i].text, `${prompts[i].id}: text`);
  }
});
