/** Test helpers: the repo's Python interpreter, tiny artifacts built by the Python toolkit, the Python reference
 * loop, the shared conformance cases. */

import { execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const HERE = path.dirname(fileURLToPath(import.meta.url));
export const REPO = path.resolve(HERE, '..', '..', '..');

/** $QWEN_EDGE_PYTHON, else the repo's .venv, else python3 on PATH. */
export function python() {
  if (process.env.QWEN_EDGE_PYTHON) return process.env.QWEN_EDGE_PYTHON;
  const venv = path.join(REPO, '.venv', 'bin', 'python');
  return existsSync(venv) ? venv : 'python3';
}

function runPython(script, args = [], input = undefined) {
  const out = execFileSync(python(), [path.resolve(HERE, script), ...args], {
    cwd: REPO,
    input,
    encoding: 'utf8',
    maxBuffer: 64 << 20,
    stdio: ['pipe', 'pipe', 'inherit'],
  });
  return JSON.parse(out.trim().split('\n').pop());
}

const tempDirs = [];
process.on('exit', () => {
  for (const dir of tempDirs) rmSync(dir, { recursive: true, force: true });
});

/** A fresh temporary directory, removed when the test process exits. */
export function tempDir(prefix = 'qwen-edge-js-') {
  const dir = mkdtempSync(path.join(os.tmpdir(), prefix));
  tempDirs.push(dir);
  return dir;
}

/** Build the tiny artifacts into a temp dir; returns {name: path}. */
export function buildTinyArtifacts() {
  return runPython('make_tiny_artifact.py', [tempDir()]);
}

/**
 * Build the shared conformance artifacts and compute the expected results of tests/conformance/cases.json
 * (tests/conformance/make_conformance.py): {artifacts: {name: {path, layout, ...}}, cases: [...]}.
 */
export function conformance() {
  const script = path.join(REPO, 'tests', 'conformance', 'make_conformance.py');
  return runPython(script, [tempDir('qwen-edge-conformance-')]);
}

/** Greedy results of the Python loop for `cases` ({messages} or {text}, max_new_tokens). */
export function pythonGreedy(artifact, cases) {
  return runPython('python_generate.py', [], JSON.stringify({ artifact, cases }));
}
