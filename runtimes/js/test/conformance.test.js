/**
 * Shared conformance cases (tests/conformance/cases.json) on the JavaScript runtime.
 *
 * tests/test_conformance.py runs the same cases on the Python runtime under the same test names.
 * tests/conformance/make_conformance.py builds the artifacts (a native fp32 Qwen2, a native int4 Qwen3 and
 * an olive-built plain-operator fp32 Qwen3 with a growing cache and position_ids) and computes what each
 * case must give: for fp32 artifacts the transformers fp32 model's greedy tokens, for int4 ones the
 * Python loop's. The cases of one artifact run in order on one generator, so shared prefixes are reused.
 */

import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { before, describe, test } from 'node:test';

import { Artifact, ChatTemplate, Generator, samplingParams } from '../src/index.js';
import { conformance, REPO } from './helpers.js';

const CASES = JSON.parse(readFileSync(path.join(REPO, 'tests', 'conformance', 'cases.json'), 'utf8'));
const ARTIFACT_NAMES = [...new Set(CASES.map((c) => c.artifact))];

let expected;
const opened = new Map();
before(() => {
  expected = conformance();
});

/** One generator and chat template per artifact, kept across its cases. */
async function runtime(name) {
  if (!opened.has(name)) {
    const artifact = await Artifact.open(expected.artifacts[name].path);
    const template = ChatTemplate.fromArtifact(artifact);
    opened.set(name, { gen: await Generator.create(artifact), template });
  }
  return opened.get(name);
}

const expectedCase = (id) => expected.cases.find((c) => c.id === id);

describe('conformance', () => {
  for (const name of ARTIFACT_NAMES) {
    test(`test_artifact_layout[${name}]`, async () => {
      const info = expected.artifacts[name];
      const { kvCache, positionIds } = (await Artifact.open(info.path, { verify: 'size' })).layout;
      assert.deepEqual({ kv_cache: kvCache, position_ids: positionIds }, info.layout);
    });
  }

  for (const { id } of CASES) {
    test(`test_conformance[${id}]`, async () => {
      const c = expectedCase(id);
      const { gen, template } = await runtime(c.artifact);
      const prompt = c.prompt.messages
        ? template.render(c.prompt.messages, { addGenerationPrompt: true })
        : c.prompt.text;
      assert.equal(prompt, c.prompt_text, 'rendered prompt');
      const ids = gen.encode(prompt);
      assert.deepEqual(ids, c.prompt_ids, 'prompt ids');
      const g = gen.generate(ids, samplingParams(), { maxNewTokens: c.max_new_tokens });
      const pieces = [];
      for await (const piece of g) pieces.push(piece);
      assert.deepEqual(g.tokenIds, c.token_ids, 'generated ids');
      assert.equal(pieces.join(''), c.text, 'streamed text');
      assert.equal(g.finishReason, c.finish_reason, 'finish reason');
    });
  }
});
