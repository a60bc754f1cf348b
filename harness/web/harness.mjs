// Thin layer over MediaPipe's LlmInference for harness/web_runtime.py. Every call starts an
// operation and returns its id at once; Python polls `harness.poll(id)` with a hard timeout, so a
// runtime that hangs (or blocks the page) fails the step instead of waiting forever.
import {FilesetResolver, LlmInference} from '/genai/genai_bundle.mjs';

const operations = new Map();
const loras = new Map();
let llm = null;
let nextId = 1;

function start(work) {
  const id = nextId++;
  operations.set(id, {done: false});
  work().then(
    (value) => operations.set(id, {done: true, value}),
    (error) => operations.set(id, {done: true, error: String((error && error.stack) || error)}));
  return id;
}

window.harness = {
  poll(id) {
    const operation = operations.get(id);
    if (operation && operation.done) operations.delete(id);
    return operation || {done: true, error: `no operation ${id}`};
  },
  // options: LlmInferenceOptions minus baseOptions; modelUrl: the weights (.bin or .task).
  createLlm(modelUrl, options) {
    return start(async () => {
      if (llm) llm.close();
      llm = null;
      loras.clear();
      const fileset = await FilesetResolver.forGenAiTasks(new URL('/genai/wasm', location.href).href);
      // The model goes in as a buffer, not as modelAssetPath: with a URL, tasks-genai tees the
      // download stream to detect the format, and that tee sometimes errors ("Cannot close an
      // errored readable stream") and leaves createFromOptions waiting forever.
      const response = await fetch(modelUrl);
      if (!response.ok) throw new Error(`fetching ${modelUrl}: HTTP ${response.status}`);
      const modelAssetBuffer = new Uint8Array(await response.arrayBuffer());
      llm = await LlmInference.createFromOptions(fileset, {baseOptions: {modelAssetBuffer}, ...options});
      return true;
    });
  },
  loadLora(url) {
    return start(async () => {
      const id = `lora${loras.size + 1}`;
      loras.set(id, await llm.loadLoraModel(url));
      return id;
    });
  },
  generate(prompt, loraId) {
    return start(async () => loraId ? llm.generateResponse(prompt, loras.get(loraId)) : llm.generateResponse(prompt));
  },
};
window.harnessReady = true;
