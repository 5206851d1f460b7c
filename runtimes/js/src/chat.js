/** Chat on top of the Generator: the artifact's chat template (@huggingface/jinja) and multi-turn KV reuse. */

import { Template } from '@huggingface/jinja';

import { TOKENIZER_CONFIG_FILE } from './contract.js';
import { ArtifactError, ContextOverflowError, QwenEdgeError } from './errors.js';
import { samplingParams } from './sampling.js';

export const THINK = '<think>';
export const END_THINK = '</think>';
export const CLOSE_THINKING = '\n</think>\n\n'; // forced when the thinking budget runs out

/** The chat template of tokenizer_config.json. */
export class ChatTemplate {
  constructor(source, specialTokens) {
    try {
      this.template = new Template(source);
    } catch (e) {
      throw new ArtifactError(`the artifact's chat template does not compile (${e.message}); rebuild the artifact`);
    }
    this.specialTokens = specialTokens;
  }

  /** The artifact's `chat_template` of tokenizer_config.json (a string, or a list of named templates: "default"). */
  static fromArtifact(artifact) {
    const file = artifact.tokenizerConfigPath;
    const cfg = artifact.json(TOKENIZER_CONFIG_FILE);
    let source = cfg.chat_template;
    if (Array.isArray(source)) source = source.find((t) => t?.name === 'default')?.template;
    if (typeof source !== 'string' || !source.trim()) {
      throw new QwenEdgeError(`${file} has no chat template; use --no-chat-template for a raw completion`);
    }
    const special = {};
    for (const key of ['bos_token', 'eos_token', 'pad_token', 'unk_token']) {
      const tok = typeof cfg[key] === 'object' && cfg[key] !== null ? cfg[key].content : cfg[key];
      if (typeof tok === 'string') special[key] = tok;
    }
    return new ChatTemplate(source, special);
  }

  /** The prompt text for `messages`; `extra` (e.g. enable_thinking) reaches the template. */
  render(messages, { addGenerationPrompt = true, ...extra } = {}) {
    try {
      return this.template.render({ messages, add_generation_prompt: addGenerationPrompt, ...this.specialTokens, ...extra });
    } catch (e) {
      throw new QwenEdgeError(`the chat template failed: ${e.message}; use --no-chat-template for a raw completion`);
    }
  }
}

/** Token hook: after `budget` tokens inside <think> without </think>, force the close of thinking. */
export class ThinkingBudget {
  constructor(budget, thinkId, endId, closeIds, inside) {
    Object.assign(this, { budget, thinkId, endId, closeIds, inside, count: 0 });
  }

  /** Called with each sampled token; returns the token ids to force, or null. */
  onToken(token) {
    if (token === this.thinkId) {
      this.inside = true;
      this.count = 0;
    } else if (token === this.endId) {
      this.inside = false;
    } else if (this.inside && ++this.count >= this.budget) {
      this.inside = false;
      return this.closeIds;
    }
    return null;
  }
}

/** The answer part of a reply: everything after the last </think>. */
export function stripThinking(text) {
  const i = text.lastIndexOf(END_THINK);
  return i < 0 ? text : text.slice(i + END_THINK.length).replace(/^\n+/, '');
}

/** A multi-turn conversation with one Generator, whose KV cache carries over between turns. */
export class ChatSession {
  constructor(generator, { system = null, enableThinking = null, thinkingBudget = null } = {}) {
    this.generator = generator;
    this.template = ChatTemplate.fromArtifact(generator.artifact);
    this.system = system;
    this.enableThinking = enableThinking;
    this.thinkingBudget = thinkingBudget;
    this.last = null;
    this.reset();
    if (thinkingBudget !== null) {
      if (!(Number.isInteger(thinkingBudget) && thinkingBudget >= 1)) {
        throw new QwenEdgeError(`thinking budget must be >= 1 token, not ${thinkingBudget}`);
      }
      const tok = generator.tokenizer;
      this.thinkIds = [tok.token_to_id(THINK), tok.token_to_id(END_THINK)];
      if (this.thinkIds.includes(undefined)) {
        throw new QwenEdgeError('this model has no <think> tokens; a thinking budget applies to Qwen3 thinking models');
      }
      this.closeIds = generator.encode(CLOSE_THINKING);
    }
  }

  /** Start a new conversation (the system prompt stays; its cached tokens are reused). */
  reset() {
    this.messages = this.system ? [{ role: 'system', content: this.system }] : [];
  }

  /** The prompt text of the conversation so far, ending with the assistant generation prompt. */
  render() {
    const extra = this.enableThinking === null ? {} : { enable_thinking: this.enableThinking };
    return this.template.render(this.messages, { addGenerationPrompt: true, ...extra });
  }

  /**
   * Add a user turn and stream the reply's text pieces (an async iterator); the reply (without its
   * thinking) joins the history when the stream ends or is closed. `this.last` is the Generation.
   */
  async *send(userText, params = samplingParams(), { maxNewTokens = 256, stopStrings = [] } = {}) {
    this.messages.push({ role: 'user', content: userText });
    const prompt = this.render();
    const ids = this.generator.encode(prompt);
    let onToken = null;
    if (this.thinkingBudget !== null && this.enableThinking !== false) {
      const inside = prompt.lastIndexOf(THINK) > prompt.lastIndexOf(END_THINK);
      const hook = new ThinkingBudget(this.thinkingBudget, ...this.thinkIds, this.closeIds, inside);
      onToken = (token) => hook.onToken(token);
    }
    let gen;
    try {
      gen = this.generator.generate(ids, params, { maxNewTokens, stopStrings, onToken });
    } catch (e) {
      this.messages.pop();
      if (e instanceof ContextOverflowError) {
        throw new ContextOverflowError(
          `the conversation has ${ids.length} tokens and the context holds ${this.generator.maxLength}; ` +
            'reset the conversation (or start a new session), or use a larger --max-length',
        );
      }
      throw e;
    }
    this.last = gen;
    try {
      yield* gen;
    } finally {
      this.messages.push({ role: 'assistant', content: stripThinking(gen.text) });
    }
  }
}
