/** An onnxruntime InferenceSession (onnxruntime-node or onnxruntime-web) from an artifact's device profile. */

import { ArtifactError, QwenEdgeError } from './errors.js';

// profile graph_optimization_level -> onnxruntime-node graphOptimizationLevel
const OPT_LEVELS = { disable: 'disabled', basic: 'basic', extended: 'extended', all: 'all' };

/** Session options from the profile keys intra_op_num_threads, inter_op_num_threads,
 * graph_optimization_level and session_config (the same keys the Python runtime reads); a cpu profile runs on
 * `executionProviders` (onnxruntime-node: cpu; onnxruntime-web: wasm, or webgpu then wasm). */
export function sessionOptions(profile, executionProviders = ['cpu']) {
  let level = String(profile.graph_optimization_level ?? 'all').toLowerCase().replace(/^ort_enable_/, '');
  if (level === 'ort_disable_all') level = 'disable';
  if (!(level in OPT_LEVELS)) {
    throw new ArtifactError(
      `profile graph_optimization_level ${JSON.stringify(profile.graph_optimization_level)} is not one of ` +
        `${Object.keys(OPT_LEVELS).join(', ')}; fix the profile and rebuild the artifact`,
    );
  }
  const ep = String(profile.execution_provider ?? 'cpu').toLowerCase();
  if (ep !== 'cpu') {
    throw new QwenEdgeError(
      `the artifact's profile asks for the ${ep} execution provider; this JavaScript runtime runs the cpu provider ` +
        'only: build the artifact with a cpu profile',
    );
  }
  const options = {
    executionProviders,
    graphOptimizationLevel: OPT_LEVELS[level],
    logSeverityLevel: 3,
  };
  const intra = Number(profile.intra_op_num_threads ?? 0);
  const inter = Number(profile.inter_op_num_threads ?? 0);
  if (intra > 0) options.intraOpNumThreads = intra;
  if (inter > 0) options.interOpNumThreads = inter;
  const extra = profile.session_config ?? {};
  if (Object.keys(extra).length) {
    options.extra = Object.fromEntries(Object.entries(extra).map(([k, v]) => [k, String(v)]));
  }
  return options;
}

/**
 * `InferenceSession.create(model, options)` of the given onnxruntime; a load failure is one line naming `where`
 * (its `reason` property: onnxruntime's own first line).
 */
export async function createSession(InferenceSession, model, options, where) {
  try {
    return await InferenceSession.create(model, options);
  } catch (e) {
    const first = String(e?.message ?? e).trim().split('\n')[0];
    const error = new ArtifactError(`onnxruntime could not load ${where}: ${first}; rebuild the artifact or re-copy it`);
    error.reason = first;
    throw error;
  }
}
