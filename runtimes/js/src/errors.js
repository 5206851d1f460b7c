/** Errors that reach the user as one clear line (the CLI prints the message and exits 2). */

/** An error the CLI prints as a single line, with what to do about it. */
export class QwenEdgeError extends Error {
  constructor(message) {
    super(message);
    this.name = new.target.name;
  }
}

/** A missing, truncated, altered or incompatible artifact. */
export class ArtifactError extends QwenEdgeError {}

/** A prompt or conversation that does not fit the context length. */
export class ContextOverflowError extends QwenEdgeError {}
