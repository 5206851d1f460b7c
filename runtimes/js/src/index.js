/** qwen-edge JavaScript runtime: open an artifact, generate with a KV cache, stream, chat. */

export { Artifact, sha256File } from './artifact.js';
export { GROWING, GraphLayout, LAYOUTS, SHARED, STATIC } from './contract.js';
export { CLOSE_THINKING, ChatSession, ChatTemplate, ThinkingBudget, stripThinking } from './chat.js';
export { Detokenizer } from './detokenize.js';
export { fimPrompt, fimStopIds } from './fim.js';
export { ArtifactError, ContextOverflowError, QwenEdgeError } from './errors.js';
export { Generation, Generator, StopFilter } from './generator.js';
export { Sampler, samplingParams } from './sampling.js';
export { SignatureError, keyId, loadPublicKey, verifySignature } from './signing.js';
export { loadTokenizer } from './tokenizer.js';
export { ToolCall, ToolCallStream, parseReply, toolNames } from './tools.js';
