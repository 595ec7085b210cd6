"use strict";
// The playground: a form over the streamed form of POST /generate, and the /health state.
// Plain browser JavaScript with no dependencies, so the page works on an offline GPU box.

(() => {
  const $ = (id) => document.getElementById(id);
  const form = $("form");
  const apiKeyRow = $("api-key-row");
  const apiKeyInput = $("api_key");
  const prompt = $("prompt");
  const negativePrompt = $("negative_prompt");
  const imageSize = $("image_size");
  const steps = $("num_inference_steps");
  const cfgScale = $("cfg_scale");
  const seedInput = $("seed");
  const button = $("generate");
  const progress = $("progress");
  const progressText = $("progress-text");
  const errorBox = $("error");
  const health = $("health");
  const output = $("output");
  const result = $("result");
  const resultSeed = $("result-seed");
  const download = $("download");
  const curlText = $("curl");
  const copyCurl = $("copy-curl");

  const KEY_STORAGE = "ovis-service.api_key";
  const SIZE_CHOICES = [256, 384, 512, 640, 768, 896, 1024, 1280, 1536, 2048];
  const FALLBACK_MAX_SIZE = 1024; // used only when the schema cannot be read
  const DEFAULT_SIZE = 1024;
  const FIELDS = ["prompt", "negative_prompt", "num_inference_steps", "cfg_scale",
    "image_size", "seed", "api_key"];

  let inFlight = null; // AbortController of the running request
  let resultUrl = null; // blob: URL of the image on show
  let healthTimer = null;

  // --- API key: asked for only when the service wants one, kept in this tab only.

  const apiKey = () => apiKeyInput.value.trim();
  const authHeaders = () => (apiKey() ? { Authorization: `Bearer ${apiKey()}` } : {});

  function askForKey() {
    apiKeyRow.hidden = false;
  }

  apiKeyInput.value = sessionStorage.getItem(KEY_STORAGE) || "";
  if (apiKeyInput.value) askForKey();
  apiKeyInput.addEventListener("input", () => {
    if (apiKey()) sessionStorage.setItem(KEY_STORAGE, apiKey());
    else sessionStorage.removeItem(KEY_STORAGE);
  });
  apiKeyInput.addEventListener("change", loadLimits);

  // --- Limits, read from the OpenAPI schema the service publishes.

  function resolve(spec, schema) {
    let node = schema;
    for (let hops = 0; node && node.$ref && hops < 10; hops += 1) {
      node = node.$ref.replace(/^#\//, "").split("/").reduce((obj, key) => obj?.[key], spec);
    }
    return node;
  }

  // A bound may sit on the property itself or on one member of a oneOf/anyOf (optional fields).
  function bound(spec, property, name) {
    const node = resolve(spec, property);
    if (!node) return undefined;
    if (typeof node[name] === "number") return node[name];
    for (const member of [...(node.oneOf || []), ...(node.anyOf || [])]) {
      const value = bound(spec, member, name);
      if (value !== undefined) return value;
    }
    return undefined;
  }

  function fillSizes(maxSize) {
    const previous = Number(imageSize.value) || DEFAULT_SIZE;
    const sizes = SIZE_CHOICES.filter((size) => size <= maxSize);
    if (!sizes.includes(maxSize) && maxSize % 16 === 0) sizes.push(maxSize);
    imageSize.replaceChildren(...sizes.map((size) => new Option(`${size} × ${size}`, size)));
    const pick = sizes.includes(previous) ? previous : sizes.filter((s) => s <= DEFAULT_SIZE).pop();
    imageSize.value = String(pick ?? sizes[0]);
  }

  async function loadLimits() {
    let spec = null;
    try {
      const response = await fetch("schema/openapi.json", { headers: authHeaders() });
      if (response.status === 401) askForKey();
      if (response.ok) spec = await response.json();
    } catch {
      // Unreachable now; /health says so, and the server still checks every limit.
    }
    const operation = spec?.paths?.["/generate"]?.post;
    if (operation && (operation.security ?? spec.security ?? []).length > 0) askForKey();
    const body = resolve(spec, operation?.requestBody?.content?.["application/json"]?.schema);
    const props = resolve(spec, body)?.properties || {};
    fillSizes(bound(spec, props.image_size, "maximum") ?? FALLBACK_MAX_SIZE);
    const maxSteps = bound(spec, props.num_inference_steps, "maximum");
    if (maxSteps) steps.max = String(maxSteps);
    const maxCfg = bound(spec, props.cfg_scale, "maximum");
    if (maxCfg) cfgScale.max = String(maxCfg);
    const maxChars = bound(spec, props.prompt, "maxLength");
    if (maxChars) {
      prompt.maxLength = maxChars;
      negativePrompt.maxLength = maxChars;
    }
  }

  // --- /health: why nothing happens while the model loads.

  function describeHealth(state) {
    if (state.status === "ok") {
      const where = state.device ? ` on ${state.device}` : "";
      return `Ready: ${state.model}${where} · ${state.running} running · `
        + `${state.queue_depth} of ${state.queue_capacity} queued`;
    }
    if (state.status === "loading") return "Loading the model… generating works once it is ready.";
    if (state.status === "draining") return "Shutting down: finishing accepted images, taking no new ones.";
    const detail = state.detail ? `: ${state.detail}` : "";
    return `Not ready (${state.status}${detail}).`;
  }

  async function refreshHealth() {
    clearTimeout(healthTimer);
    let status = "unreachable";
    let text = "Can't reach the service. Is it running?";
    try {
      const response = await fetch("health", { cache: "no-store" });
      const state = await response.json();
      status = String(state.status);
      text = describeHealth(state);
    } catch {
      // keep the "unreachable" wording
    }
    health.dataset.status = status;
    health.textContent = text;
    // Poll quickly while waiting for readiness, slowly once ready, not at all when hidden.
    if (!document.hidden) healthTimer = setTimeout(refreshHealth, status === "ok" ? 10000 : 2000);
  }

  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) refreshHealth();
  });

  // --- Errors, in words, with the field at fault marked.

  function clearError() {
    errorBox.hidden = true;
    errorBox.textContent = "";
    for (const id of FIELDS) $(id).removeAttribute("aria-invalid");
  }

  function showError(message, field = null, requestId = "") {
    errorBox.textContent = requestId ? `${message}\nRequest id: ${requestId}` : message;
    errorBox.hidden = false;
    if (field && FIELDS.includes(field)) {
      $(field).setAttribute("aria-invalid", "true");
      $(field).focus();
    }
  }

  function retryInWords(value) {
    if (!value) return "";
    let seconds = Number(value);
    if (!Number.isFinite(seconds)) seconds = (Date.parse(value) - Date.now()) / 1000;
    if (!Number.isFinite(seconds)) return "";
    seconds = Math.max(1, Math.ceil(seconds));
    if (seconds < 90) return ` Try again in ${seconds} second${seconds === 1 ? "" : "s"}.`;
    return ` Try again in about ${Math.round(seconds / 60)} minutes.`;
  }

  async function showHttpError(response) {
    let detail = "";
    let requestId = "";
    try {
      const body = await response.json();
      detail = String(body.detail ?? body.error?.message ?? "");
      requestId = String(body.request_id ?? "");
    } catch {
      // not JSON (a proxy's error page): the status says enough
    }
    const field = detail.match(/^([a-z_]+):/)?.[1] ?? null;
    const status = response.status;
    if (status === 401) {
      askForKey();
      const message = apiKey()
        ? "The service refused this API key. Check it and try again."
        : "This service needs an API key: enter it in the API key field.";
      showError(message, "api_key", requestId);
    } else if (status === 400 || status === 422) {
      showError(`The service refused the request: ${detail}`, field, requestId);
    } else if (status === 413) {
      showError(`The request is too large: ${detail}`, field, requestId);
    } else if (status === 503) {
      const why = detail ? ` (${detail})` : "";
      const retry = retryInWords(response.headers.get("retry-after"));
      showError(`The service is busy or not ready${why}.${retry}`, null, requestId);
    } else if (status === 504) {
      showError(`The image took too long and was stopped (${detail}).`, null, requestId);
    } else {
      const why = detail ? `: ${detail}` : ".";
      showError(`The service answered ${status} ${response.statusText}${why}`, null, requestId);
    }
  }

  // --- The request, and the same request as curl.

  function buildRequest() {
    const seed = seedInput.value.trim();
    if (seed && !/^\d+$/.test(seed)) {
      showError("seed: must be a whole number (0 or more), or empty for a random one.", "seed");
      return null;
    }
    const fields = { prompt: prompt.value };
    if (negativePrompt.value) fields.negative_prompt = negativePrompt.value;
    if (steps.value !== "") fields.num_inference_steps = Number(steps.value);
    if (cfgScale.value !== "") fields.cfg_scale = Number(cfgScale.value);
    fields.image_size = Number(imageSize.value);
    return { fields, seed };
  }

  // Seeds go up to 2^63-1, past what a JS number holds exactly, so they stay digit strings
  // and are spliced into the JSON as they are.
  function requestJson({ fields }, seed) {
    const json = JSON.stringify(fields);
    return seed ? `${json.slice(0, -1)},"seed":${seed}}` : json;
  }

  function curlFor(request, seed) {
    const quote = (text) => `'${text.replace(/'/g, "'\\''")}'`;
    const url = new URL("generate", window.location.href).href;
    const lines = [
      `curl -s -o ovis-${seed}.png ${quote(url)}`,
      "-H 'Content-Type: application/json'",
    ];
    if (apiKey()) lines.push('-H "Authorization: Bearer $OVIS_API_KEY"');
    lines.push(`-d ${quote(requestJson(request, seed))}`);
    return lines.join(" \\\n  ");
  }

  function showResult(blob, seed, request) {
    if (resultUrl) URL.revokeObjectURL(resultUrl);
    resultUrl = URL.createObjectURL(blob);
    result.src = resultUrl;
    const side = request.fields.image_size;
    result.alt = `Generated image for: ${request.fields.prompt} (${side} × ${side}, seed ${seed})`;
    resultSeed.textContent = seed;
    download.href = resultUrl;
    download.download = `ovis-${seed}.png`;
    curlText.value = curlFor(request, seed);
    output.hidden = false;
  }

  function base64ToBlob(b64, type) {
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    return new Blob([bytes], { type });
  }

  // --- The event stream: `progress` after each step, then `image` or `error`.

  function parseEvent(block) {
    let event = "message";
    const data = [];
    for (const line of block.split(/\r?\n/)) {
      if (!line || line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const name = colon < 0 ? line : line.slice(0, colon);
      const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
      if (name === "event") event = value;
      else if (name === "data") data.push(value);
    }
    return { event, data: data.join("\n") };
  }

  function handleEvent({ event, data }, request) {
    if (event === "progress") {
      const { step, total } = JSON.parse(data);
      progress.max = total;
      progress.value = step;
      progressText.textContent = `Step ${step} of ${total}`;
      return false;
    }
    if (event === "image") {
      const body = JSON.parse(data);
      // Read the seed from the text itself: JSON.parse would round a 63-bit one.
      const seed = data.match(/"seed"\s*:\s*(\d+)/)?.[1] ?? String(body.seed);
      showResult(base64ToBlob(body.b64_json, `image/${body.format || "png"}`), seed, request);
      progressText.textContent = "Done.";
      return true;
    }
    if (event === "error") {
      const body = JSON.parse(data);
      showError(`Generation failed: ${body.detail}`, null, body.request_id || "");
      return true;
    }
    return false; // events this page does not know yet (e.g. previews) are skipped
  }

  async function readStream(response, request) {
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      for (let end = buffer.search(/\r?\n\r?\n/); end >= 0; end = buffer.search(/\r?\n\r?\n/)) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
        if (handleEvent(parseEvent(block), request)) {
          reader.cancel().catch(() => {});
          return;
        }
      }
    }
    showError("The connection closed before the image arrived. The service may have restarted.");
  }

  // --- Generate / cancel.

  function setRunning(running) {
    button.textContent = running ? "Cancel" : "Generate";
    button.classList.toggle("cancel", running);
    form.setAttribute("aria-busy", String(running));
  }

  async function generate() {
    clearError();
    const request = buildRequest();
    if (!request) return;
    if (!apiKeyRow.hidden && !apiKey()) {
      showError("This service needs an API key: enter it in the API key field.", "api_key");
      return;
    }
    const controller = new AbortController();
    inFlight = controller;
    setRunning(true);
    progress.hidden = false;
    progress.max = request.fields.num_inference_steps || 1;
    progress.value = 0;
    progressText.textContent = "Waiting for the service…";
    try {
      const response = await fetch("generate", {
        method: "POST",
        headers: {
          "Content-Type": "application/json",
          Accept: "text/event-stream",
          ...authHeaders(),
        },
        body: requestJson(request, request.seed),
        signal: controller.signal,
      });
      if (!response.ok) {
        progressText.textContent = "";
        await showHttpError(response);
        return;
      }
      const type = response.headers.get("content-type") || "";
      if (type.startsWith("text/event-stream")) {
        await readStream(response, request);
      } else if (type.startsWith("image/")) {
        // A service without the streamed form answers with the image itself.
        const seed = response.headers.get("x-seed") || request.seed;
        showResult(await response.blob(), seed, request);
        progressText.textContent = "Done.";
      } else {
        showError(`The service answered with ${type || "no content type"}, not an image.`);
      }
    } catch (error) {
      if (error.name === "AbortError") {
        progressText.textContent = "Cancelled: the service stops the job.";
      } else {
        progressText.textContent = "";
        showError("Could not reach the service (network error). Check that it is running and "
          + "that this machine can reach it.");
      }
    } finally {
      inFlight = null;
      setRunning(false);
      refreshHealth();
    }
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    if (inFlight) inFlight.abort();
    else generate();
  });

  prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      form.requestSubmit();
    }
  });

  copyCurl.addEventListener("click", async () => {
    curlText.select();
    try {
      await navigator.clipboard.writeText(curlText.value);
      copyCurl.textContent = "Copied";
    } catch {
      // No clipboard API off https/localhost: the text is selected for Ctrl+C instead.
      copyCurl.textContent = "Press Ctrl+C";
    }
    setTimeout(() => { copyCurl.textContent = "Copy"; }, 2000);
  });

  fillSizes(FALLBACK_MAX_SIZE);
  loadLimits();
  refreshHealth();
})();
