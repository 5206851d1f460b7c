/** Tool calls: Qwen's `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` replies as OpenAI tool calls,
 * whole (`parseReply`) or streamed (`ToolCallStream`), as qwen_edge/tools.py parses them. A block that is not a
 * well-formed call of a known tool stays text; a reply that is one bare call JSON (maybe in a code fence) is a call. */

export const OPEN = '<tool_call>';
export const CLOSE = '</tool_call>';

/** One call: its id, the function name and its arguments as JSON text (what OpenAI sends). */
export class ToolCall {
  constructor(name, args, id = `call_${globalThis.crypto.randomUUID().replaceAll('-', '').slice(0, 24)}`) {
    this.name = name;
    this.arguments = args;
    this.id = id;
  }

  /** The call as an OpenAI `tool_calls` entry (with `index` for a streamed delta). */
  openai(index) {
    const out = { id: this.id, type: 'function', function: { name: this.name, arguments: this.arguments } };
    return index === undefined ? out : { index, ...out };
  }
}

/** The function names of OpenAI-style tools. */
export function toolNames(tools) {
  return new Set(tools.map((t) => t.function.name));
}

const isObject = (v) => v !== null && typeof v === 'object' && !Array.isArray(v);

/** The call in the text of one block, or null when it is not a valid call of one of `names`. */
export function parseCall(block, names) {
  let data;
  try {
    data = JSON.parse(block);
  } catch {
    return null;
  }
  if (!isObject(data) || !names.has(data.name)) return null;
  let args = data.arguments ?? {};
  if (typeof args === 'string') {
    try {
      args = JSON.parse(args);
    } catch {
      return null;
    }
  }
  if (!isObject(args)) return null;
  return new ToolCall(data.name, pyJson(args));
}

/** JSON text with Python json.dumps's separators (", " and ": "), so both runtimes send the same arguments. */
function pyJson(value) {
  if (Array.isArray(value)) return `[${value.map(pyJson).join(', ')}]`;
  if (isObject(value)) return `{${Object.entries(value).map(([k, v]) => `${JSON.stringify(k)}: ${pyJson(v)}`).join(', ')}}`;
  return JSON.stringify(value);
}

function bareCall(text, names) {
  const t = text.trim();
  const fenced = /^```(?:json)?\s*\n([\s\S]*?)\n?```$/.exec(t);
  return parseCall(fenced ? fenced[1] : t, names);
}

/** Splits streamed reply text into ['content', text] and ['tool_call', ToolCall] parts, in order. */
export class ToolCallStream {
  constructor(names) {
    this.names = names;
    this.held = '';
    this.inside = false;
    this.bare = null; // whether the reply may be one bare call (null: not known yet)
  }

  /** The parts certain after `piece`. */
  push(piece) {
    let buf = this.held + piece;
    const out = [];
    if (this.bare === null && buf.trim()) this.bare = /^\s*[{`]/.test(buf);
    if (this.bare !== false) {
      this.held = buf;
      return [];
    }
    for (;;) {
      if (this.inside) {
        const end = buf.indexOf(CLOSE);
        if (end < 0) break;
        const block = buf.slice(0, end + CLOSE.length);
        buf = buf.slice(end + CLOSE.length);
        const call = parseCall(block.slice(OPEN.length, -CLOSE.length), this.names);
        out.push(call ? ['tool_call', call] : ['content', block]);
        this.inside = false;
        if (call) buf = buf.replace(/^\n+/, '');
      } else {
        const start = buf.indexOf(OPEN);
        if (start < 0) {
          let hold = 0;
          for (let k = 1; k < OPEN.length; k++) if (buf.endsWith(OPEN.slice(0, k))) hold = k;
          out.push(['content', buf.slice(0, buf.length - hold)]);
          buf = buf.slice(buf.length - hold);
          break;
        }
        out.push(['content', buf.slice(0, start)]);
        buf = buf.slice(start);
        this.inside = true;
      }
    }
    this.held = buf;
    return out.filter(([, part]) => part);
  }

  /** What was held back (an unfinished block stays text), once the reply ended. */
  flush() {
    const held = this.held;
    this.held = '';
    this.inside = false;
    const call = this.bare ? bareCall(held, this.names) : null;
    if (call) return [['tool_call', call]];
    if (this.bare) {
      this.bare = false;
      return [...this.push(held), ...this.flush()];
    }
    return held ? [['content', held]] : [];
  }
}

/** A whole reply as its text (without the call blocks) and its tool calls. */
export function parseReply(text, names) {
  const stream = new ToolCallStream(names);
  const parts = [...stream.push(text), ...stream.flush()];
  const calls = parts.filter(([k]) => k === 'tool_call').map(([, c]) => c);
  const content = parts.filter(([k]) => k === 'content').map(([, t]) => t).join('');
  return [calls.length ? content.trim() : content, calls];
}
