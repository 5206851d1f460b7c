#!/usr/bin/env node
/** qwen-edge-js: run a qwen-edge artifact from Node.js.
 *
 *   qwen-edge-js run ARTIFACT "prompt" [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P]
 *       [--min-p P] [--repetition-penalty R] [--seed S] [--stop STR]... [--max-length N]
 *       [--system TEXT] [--think | --no-think] [--thinking-budget N] [--no-chat-template] [--verify full|size|none]
 *
 * PROMPT "-" reads the prompt from stdin. The reply streams to stdout; a summary line goes to stderr.
 */

import { parseArgs } from 'node:util';

import { readFileSync } from 'node:fs';

import { Artifact, ChatSession, Generator, QwenEdgeError, samplingParams } from '../src/index.js';

const USAGE = 'usage: qwen-edge-js run ARTIFACT "prompt" [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] ' +
  '[--min-p P] [--repetition-penalty R] [--seed S] [--stop STR] [--max-length N] [--system TEXT] [--think | --no-think] ' +
  '[--thinking-budget N] [--no-chat-template] ' +
  '[--verify full|size|none]';

const OPTIONS = {
  'max-new-tokens': { type: 'string', default: '256' },
  temperature: { type: 'string', default: '0' },
  'top-k': { type: 'string', default: '0' },
  'top-p': { type: 'string', default: '1' },
  'min-p': { type: 'string', default: '0' },
  'repetition-penalty': { type: 'string', default: '1' },
  seed: { type: 'string' },
  stop: { type: 'string', multiple: true, default: [] },
  'max-length': { type: 'string' },
  system: { type: 'string' },
  think: { type: 'boolean' },
  'no-think': { type: 'boolean' },
  'thinking-budget': { type: 'string' },
  'no-chat-template': { type: 'boolean', default: false },
  verify: { type: 'string', default: 'full' },
  help: { type: 'boolean', short: 'h', default: false },
};

function number(values, name, integer = false) {
  const raw = values[name];
  if (raw === undefined) return null;
  const value = Number(raw);
  if (raw.trim() === '' || Number.isNaN(value) || (integer && !Number.isInteger(value))) {
    throw new QwenEdgeError(`--${name} takes ${integer ? 'an integer' : 'a number'}, not ${JSON.stringify(raw)}`);
  }
  return value;
}

async function run(argv) {
  let parsed;
  try {
    parsed = parseArgs({ args: argv, options: OPTIONS, allowPositionals: true });
  } catch (e) {
    throw new QwenEdgeError(`${e.message}; ${USAGE}`);
  }
  const { values, positionals } = parsed;
  if (values.help) {
    console.log(USAGE);
    return;
  }
  if (positionals[0] !== 'run' || positionals.length !== 3) throw new QwenEdgeError(USAGE);
  const [, artifactDir, promptArg] = positionals;
  const prompt = promptArg === '-' ? readFileSync(0, 'utf8') : promptArg;
  if (values.think && values['no-think']) throw new QwenEdgeError('give --think or --no-think, not both');
  const enableThinking = values.think ? true : values['no-think'] ? false : null;
  const thinkingBudget = number(values, 'thinking-budget', true);
  const params = samplingParams({
    temperature: number(values, 'temperature'),
    topK: number(values, 'top-k', true),
    topP: number(values, 'top-p'),
    minP: number(values, 'min-p'),
    repetitionPenalty: number(values, 'repetition-penalty'),
    seed: number(values, 'seed', true),
  });
  const artifact = await Artifact.open(artifactDir, { verify: values.verify });
  const generator = await Generator.create(artifact, { maxLength: number(values, 'max-length', true) });
  const options = { maxNewTokens: number(values, 'max-new-tokens', true), stopStrings: values.stop };
  let pieces;
  let result; // the Generation, once the pieces have been read
  if (values['no-chat-template']) {
    if (values.system || enableThinking !== null || thinkingBudget !== null) {
      throw new QwenEdgeError('--system, --think and --thinking-budget need the chat template; drop --no-chat-template');
    }
    const gen = generator.generate(generator.encode(prompt), params, options);
    pieces = gen;
    result = () => gen;
  } else {
    const chat = new ChatSession(generator, { system: values.system ?? null, enableThinking, thinkingBudget });
    pieces = chat.send(prompt, params, options);
    result = () => chat.last;
  }
  for await (const piece of pieces) process.stdout.write(piece);
  process.stdout.write('\n');
  report(result());
}

function report(gen) {
  const s = gen.stats;
  const rate = (n, secs) => (secs > 0 ? n / secs : 0).toFixed(1);
  console.error(
    `[${gen.finishReason}] prompt ${s.promptTokens} tokens (${s.reusedTokens} cached), ${s.newTokens} new | ` +
      `ttft ${(s.ttftS * 1000).toFixed(0)} ms | prefill ${rate(s.prefillTokens, s.prefillS)} tok/s | ` +
      `decode ${rate(s.newTokens - 1, s.newTokens > 1 ? s.decodeS : 0)} tok/s`,
  );
  if (gen.notice) console.error(`qwen-edge-js: note: ${gen.notice}`);
}

run(process.argv.slice(2)).catch((e) => {
  if (e instanceof QwenEdgeError) {
    console.error(`error: ${e.message}`);
    process.exit(2);
  }
  throw e;
});
