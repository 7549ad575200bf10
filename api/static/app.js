// m2fp-serve web page: upload a photo, follow its job, draw the parsing in the browser.
// No framework, no inline code (strict CSP). The result is fetched exactly once: the server
// deletes it on that fetch, so nothing here ever asks for it a second time.
(function () {
  "use strict";

  // CIHP class names and colours: the same table as shared/constants.py (CIHP_CLASSES,
  // PALETTE); tests/integration/test_web_browser.py checks that the two stay equal.
  const CIHP_CLASSES = [
    "Background", "Hat", "Hair", "Gloves", "Sunglasses", "UpperClothes", "Dress", "Coat",
    "Socks", "Pants", "Torso-skin", "Scarf", "Skirt", "Face", "Left-arm", "Right-arm",
    "Left-leg", "Right-leg", "Left-shoe", "Right-shoe",
  ];
  const PALETTE = [
    [0, 0, 0], [128, 0, 0], [255, 0, 0], [0, 85, 0], [170, 0, 51], [255, 85, 0], [0, 0, 85],
    [0, 119, 221], [85, 85, 0], [0, 85, 85], [85, 51, 0], [52, 86, 128], [0, 128, 0],
    [0, 0, 255], [51, 170, 221], [0, 255, 255], [85, 255, 170], [170, 255, 85],
    [255, 255, 0], [255, 170, 0],
  ];

  // A human sentence for every error code the API (or this page) can produce.
  const MESSAGES = {
    missing_image: "The upload did not contain a photo. Please choose a file and try again.",
    bad_request: "The server could not understand the request.",
    unauthorized: "This server requires an API key. Enter a valid key under \u201cAPI key\u201d and try again.",
    banned: "Too many invalid uploads came from your address, so uploads are blocked for a while. Please try again later.",
    not_found: "This job no longer exists on the server: it was cancelled, or it expired.",
    not_ready: "The result is not ready yet.",
    result_gone: "This result was already fetched or has expired. Results can be fetched only once: upload the photo again to see it again.",
    method_not_allowed: "The server refused this kind of request.",
    payload_too_large: "The file is larger than this server accepts.",
    image_too_large: "The image has too many pixels, or one of its sides is too long, for this server.",
    unsupported_type: "Only JPEG and PNG photos are accepted (.jpg, .jpeg, .png).",
    type_mismatch: "The file's content does not match its name (for example a PNG named .jpg). Save it again as JPEG or PNG.",
    undecodable_image: "The image is corrupt or truncated and cannot be decoded.",
    rate_limited: "Too many requests from your address. Please wait a moment and try again.",
    queue_full: "The service is busy right now. Please try again in a little while.",
    unavailable: "The service is temporarily unavailable. Please try again shortly.",
    expired: "The job expired before it could be finished. Please upload the photo again.",
    worker_lost: "The server lost this job while processing it. Please try again.",
    timeout: "Processing took too long and was stopped. A smaller photo may work.",
    internal_error: "The server could not process this photo.",
    network_error: "The server could not be reached. Check your connection and try again.",
    result_lost: "The connection broke while the result was being fetched; the server may already have deleted it. Please upload the photo again.",
    client_type: "Please choose a JPEG or PNG photo (.jpg, .jpeg or .png).",
    client_mismatch: "This file's content is not a JPEG or PNG image, whatever its name says.",
    client_empty: "This file is empty.",
    client_too_large: "This file is too large.",
    client_too_many_pixels: "This image has too many pixels or too long a side.",
    client_undecodable: "Your browser cannot read this image: it looks corrupt or truncated.",
    client_busy: "A photo is already being processed. Wait for it, or cancel it first.",
    render_failed: "Your browser could not draw the result.",
    bad_response: "The server's answer could not be understood.",
  };

  const IMAGE_EXTENSIONS = [".jpg", ".jpeg", ".png"];
  const IMAGE_TYPES = ["image/jpeg", "image/png"];
  const POLL_FIRST_MS = 500;
  const POLL_MAX_MS = 5000;
  const MAX_RETRY_AFTER_S = 300;
  const MAX_SUBMIT_RETRIES = 3;
  const MAX_NETWORK_FAILURES = 6;

  const state = {
    limits: { bytes: 10485760, pixels: 40000000, side: 10000 },
    job: null, // {job_id, token, status_url, result_url}; dropped once the result is in
    busy: false,
    generation: 0, // bumped by cancel/new upload: stale timers and responses are ignored
    fetchedResults: new Set(), // result URLs already requested: never request one again
    objectUrls: { original: null, labels: null, instances: null, overlay: null },
    view: null, // {width, height, labels, instances, original, names, persons}
    selected: 0,
    redrawPending: false,
    overlayTimer: null,
  };

  const $ = (id) => document.getElementById(id);

  // --- small helpers -------------------------------------------------------------------
  function sleep(ms) {
    return new Promise((resolve) => setTimeout(resolve, ms));
  }

  function formatBytes(bytes) {
    if (bytes >= 1048576) return (bytes / 1048576).toFixed(bytes % 1048576 ? 1 : 0) + " MB";
    if (bytes >= 1024) return Math.round(bytes / 1024) + " KB";
    return bytes + " bytes";
  }

  function parseRetryAfter(value) {
    if (!value) return null;
    const seconds = Number(value);
    if (Number.isFinite(seconds)) return Math.max(0, seconds);
    const when = Date.parse(value);
    return Number.isNaN(when) ? null : Math.max(0, (when - Date.now()) / 1000);
  }

  function setObjectUrl(slot, blob) {
    if (state.objectUrls[slot]) URL.revokeObjectURL(state.objectUrls[slot]);
    state.objectUrls[slot] = blob ? URL.createObjectURL(blob) : null;
    return state.objectUrls[slot];
  }

  function base64ToBytes(text) {
    const binary = atob(text);
    const bytes = new Uint8Array(binary.length);
    for (let i = 0; i < binary.length; i += 1) bytes[i] = binary.charCodeAt(i);
    return bytes;
  }

  class ApiError extends Error {
    constructor(code, message, status, retryAfter) {
      super(message || code);
      this.code = code;
      this.serverMessage = message || "";
      this.status = status || 0;
      this.retryAfter = retryAfter;
    }
  }

  // --- status, errors, banner -----------------------------------------------------------
  function setStatus(phase, text, busy) {
    const status = $("status");
    status.textContent = text;
    status.dataset.state = phase;
    if (state.job) status.dataset.jobId = state.job.job_id;
    else delete status.dataset.jobId;
    $("progress").hidden = !busy;
    $("cancel-button").hidden = !(busy && state.job);
  }

  // `text` overrides the sentence of MESSAGES; `serverMessage` is shown as a detail.
  function showError(code, serverMessage, text) {
    const box = $("error");
    box.textContent = "";
    const sentence = document.createElement("p");
    sentence.textContent = text || MESSAGES[code] || serverMessage || "Something went wrong.";
    box.appendChild(sentence);
    if (serverMessage && MESSAGES[code] && serverMessage !== MESSAGES[code]) {
      const detail = document.createElement("p");
      detail.className = "error-detail";
      detail.textContent = "Server says: " + serverMessage;
      box.appendChild(detail);
    }
    const codeLine = document.createElement("p");
    codeLine.className = "error-code";
    codeLine.textContent = "Error code: " + code;
    box.appendChild(codeLine);
    box.dataset.code = code;
    box.hidden = false;
  }

  function clearError() {
    const box = $("error");
    box.hidden = true;
    box.textContent = "";
    delete box.dataset.code;
  }

  function showUntrained(warnings) {
    const list = $("untrained-warnings");
    const known = new Set(Array.from(list.children, (item) => item.textContent));
    (warnings && warnings.length ? warnings : ["The server runs an untrained model."]).forEach((warning) => {
      if (known.has(warning)) return;
      const item = document.createElement("li");
      item.textContent = warning;
      list.appendChild(item);
      known.add(warning);
    });
    $("untrained-banner").hidden = false;
  }

  function showServiceNotice(text) {
    const notice = $("service-notice");
    notice.textContent = text;
    notice.hidden = !text;
  }

  // --- HTTP -------------------------------------------------------------------------------
  function apiHeaders(extra) {
    const headers = Object.assign({ Accept: "application/json" }, extra || {});
    const key = $("api-key-input").value.trim();
    if (key) headers["X-API-Key"] = key;
    return headers;
  }

  function bearer() {
    return { Authorization: "Bearer " + state.job.token };
  }

  async function apiFetch(url, options) {
    const init = Object.assign({ credentials: "same-origin", cache: "no-store" }, options || {});
    init.headers = apiHeaders(init.headers);
    try {
      return await fetch(url, init);
    } catch (err) {
      throw new ApiError("network_error", "", 0, null);
    }
  }

  async function errorFrom(response) {
    let body = null;
    try {
      body = await response.json();
    } catch (err) {
      body = null;
    }
    const retryAfter = parseRetryAfter(response.headers.get("Retry-After"));
    if (body && typeof body.error === "string") {
      return new ApiError(body.error, body.message, response.status, retryAfter);
    }
    const code = response.status >= 500 ? "unavailable" : "bad_response";
    return new ApiError(code, "HTTP " + response.status, response.status, retryAfter);
  }

  async function checkReadiness() {
    try {
      const response = await fetch("/readyz", { cache: "no-store", headers: { Accept: "application/json" } });
      const body = await response.json();
      if (body.untrained) showUntrained(body.warnings);
      if (response.ok) {
        showServiceNotice("");
      } else {
        const reason = (body.warnings && body.warnings[0]) || "The service is not ready.";
        showServiceNotice("The service is not ready yet: " + reason + " You can still upload; the photo waits in the queue.");
      }
    } catch (err) {
      showServiceNotice("The service's readiness could not be checked.");
    }
  }

  // --- choosing a file --------------------------------------------------------------------
  function extensionOf(name) {
    const dot = name.lastIndexOf(".");
    return dot >= 0 ? name.slice(dot).toLowerCase() : "";
  }

  async function sniffType(file) {
    const head = new Uint8Array(await file.slice(0, 8).arrayBuffer());
    const png = [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a];
    if (png.every((byte, i) => head[i] === byte)) return "image/png";
    if (head[0] === 0xff && head[1] === 0xd8 && head[2] === 0xff) return "image/jpeg";
    return null;
  }

  // Returns the decoded photo (ImageBitmap) or throws ApiError with a client_* code.
  async function checkFile(file) {
    const extension = extensionOf(file.name);
    if (!IMAGE_EXTENSIONS.includes(extension) || (file.type && !IMAGE_TYPES.includes(file.type))) {
      throw new ApiError("client_type", "");
    }
    if (file.size === 0) throw new ApiError("client_empty", "");
    if (file.size > state.limits.bytes) {
      throw new ApiError("client_too_large", "");
    }
    const sniffed = await sniffType(file);
    if (!sniffed) throw new ApiError("client_mismatch", "");
    if ((sniffed === "image/png") !== (extension === ".png")) throw new ApiError("client_mismatch", "");
    let bitmap;
    try {
      bitmap = await createImageBitmap(file, { imageOrientation: "from-image" });
    } catch (err) {
      throw new ApiError("client_undecodable", "");
    }
    const { width, height } = bitmap;
    if (width * height > state.limits.pixels || Math.max(width, height) > state.limits.side) {
      bitmap.close();
      throw new ApiError("client_too_many_pixels", "");
    }
    return bitmap;
  }

  function clientErrorText(code) {
    if (code === "client_too_large") {
      return MESSAGES.client_too_large + " The limit is " + formatBytes(state.limits.bytes) + ".";
    }
    if (code === "client_too_many_pixels") {
      return MESSAGES.client_too_many_pixels + " The limit is " + Math.round(state.limits.pixels / 1e6) +
        " megapixels and " + state.limits.side + " pixels per side.";
    }
    return MESSAGES[code];
  }

  async function handleFiles(files) {
    if (!files || files.length === 0) return;
    if (state.busy) {
      showError("client_busy");
      return;
    }
    clearError();
    const file = files[0];
    state.busy = true;
    setStatus("checking", "Checking the photo\u2026", true);
    let bitmap;
    try {
      bitmap = await checkFile(file);
    } catch (err) {
      const code = err instanceof ApiError ? err.code : "client_undecodable";
      state.busy = false;
      setStatus("idle", "No photo sent.", false);
      showError(code, "", clientErrorText(code));
      return;
    }
    if (files.length > 1) showServiceNotice("Only the first of the " + files.length + " files is parsed; one photo at a time.");
    await runJob(file, bitmap);
  }

  // --- the job ------------------------------------------------------------------------------
  async function waitWithCountdown(seconds, generation, phase, label) {
    const end = Date.now() + seconds * 1000;
    while (Date.now() < end) {
      if (generation !== state.generation) return false;
      const left = Math.ceil((end - Date.now()) / 1000);
      setStatus(phase, label + " Retrying in " + left + " s\u2026", true);
      await sleep(Math.min(1000, end - Date.now()));
    }
    return generation === state.generation;
  }

  async function submit(file, generation) {
    for (let attempt = 0; ; attempt += 1) {
      setStatus("uploading", "Uploading " + file.name + " (" + formatBytes(file.size) + ")\u2026", true);
      const form = new FormData();
      form.append("image", file, file.name);
      const response = await apiFetch("/v1/jobs", { method: "POST", body: form });
      if (response.status === 202) return response.json();
      const error = await errorFrom(response);
      const retryable = response.status === 429 || response.status === 503;
      const wait = error.retryAfter === null || error.retryAfter === undefined ? 5 * (attempt + 1) : error.retryAfter;
      if (!retryable || attempt >= MAX_SUBMIT_RETRIES || wait > MAX_RETRY_AFTER_S) throw error;
      const label = MESSAGES[error.code] || "The service is busy.";
      if (!(await waitWithCountdown(wait, generation, "waiting", label))) return null;
    }
  }

  async function runJob(file, bitmap) {
    state.generation += 1;
    const generation = state.generation;
    try {
      const job = await submit(file, generation);
      if (!job || generation !== state.generation) return;
      state.job = job;
      const result = await pollUntilDone(generation);
      if (!result || generation !== state.generation) return;
      state.job = null; // the token is of no further use: the result is gone from the server
      setStatus("rendering", "Drawing the result\u2026", true);
      await render(file, bitmap, result);
      setStatus("done", describeDone(result), false);
    } catch (err) {
      if (generation !== state.generation) return;
      const code = err instanceof ApiError ? err.code : "render_failed";
      if (!(err instanceof ApiError)) console.warn("m2fp: rendering failed", err);
      state.job = null;
      setStatus("failed", "The photo could not be parsed.", false);
      showError(code, err instanceof ApiError ? err.serverMessage : "");
    } finally {
      if (generation === state.generation) state.busy = false;
      if (bitmap) bitmap.close();
    }
  }

  function describeDone(result) {
    const people = result.persons ? result.persons.length : 0;
    const who = people === 1 ? "1 person" : people + " people";
    const seconds = result.timings && result.timings.inference ? " in " + result.timings.inference.toFixed(1) + " s" : "";
    return "Done: " + who + " found" + seconds + ". The result has been deleted from the server.";
  }

  async function pollUntilDone(generation) {
    const started = Date.now();
    let delay = POLL_FIRST_MS;
    let failures = 0;
    for (;;) {
      if (generation !== state.generation) return null;
      let response;
      try {
        response = await apiFetch(state.job.status_url, { headers: bearer() });
        failures = 0;
      } catch (err) {
        failures += 1;
        if (failures > MAX_NETWORK_FAILURES) throw err;
        setStatus("waiting", "Connection problem; retrying\u2026", true);
        await sleep(Math.min(POLL_MAX_MS * 2, delay * 2 ** failures));
        continue;
      }
      if (generation !== state.generation) return null;
      if (response.status === 429 || response.status === 503) {
        const error = await errorFrom(response);
        const wait = error.retryAfter === null ? delay / 1000 : Math.min(error.retryAfter, MAX_RETRY_AFTER_S);
        if (!(await waitWithCountdown(wait, generation, "waiting", MESSAGES[error.code] || "The service is busy."))) return null;
        continue;
      }
      if (!response.ok) throw await errorFrom(response);
      const body = await response.json();
      const elapsed = Math.round((Date.now() - started) / 1000);
      if (body.status === "done") {
        const result = await fetchResultOnce(generation);
        if (result !== "retry") return result;
      } else if (body.status === "failed" || body.status === "expired") {
        const error = body.error || { code: body.status, message: "" };
        throw new ApiError(error.code || body.status, error.message, 0, null);
      } else if (body.status === "running") {
        setStatus("running", "Parsing the photo\u2026 (" + elapsed + " s)", true);
      } else {
        setStatus("queued", "Waiting in the queue\u2026 (" + elapsed + " s)", true);
      }
      await sleep(delay);
      delay = Math.min(POLL_MAX_MS, Math.round(delay * 1.5));
    }
  }

  // The one and only request for this job's result. "retry" only when the server said it did
  // not hand the result out (409/429/503), so asking again cannot be a second fetch.
  async function fetchResultOnce(generation) {
    const url = state.job.result_url;
    if (state.fetchedResults.has(url)) throw new ApiError("result_gone", "", 410, null);
    state.fetchedResults.add(url);
    setStatus("fetching", "Fetching the result\u2026", true);
    let response;
    try {
      response = await apiFetch(url, { headers: bearer() });
    } catch (err) {
      throw new ApiError("result_lost", "", 0, null);
    }
    if (response.ok) return response.json();
    const error = await errorFrom(response);
    if (generation !== state.generation) return null;
    if (response.status === 409 || response.status === 429 || response.status === 503) {
      state.fetchedResults.delete(url);
      if (error.retryAfter) await waitWithCountdown(Math.min(error.retryAfter, MAX_RETRY_AFTER_S), generation, "waiting", MESSAGES[error.code] || "");
      return "retry";
    }
    throw error;
  }

  async function cancelJob() {
    const job = state.job;
    state.generation += 1;
    state.job = null;
    state.busy = false;
    if (!job) return;
    setStatus("cancelling", "Cancelling\u2026", false);
    try {
      const response = await apiFetch(job.status_url, {
        method: "DELETE",
        headers: { Authorization: "Bearer " + job.token },
      });
      if (response.status === 204 || response.status === 404) {
        setStatus("cancelled", "Cancelled. Your photo and its job were deleted from the server.", false);
      } else {
        const error = await errorFrom(response);
        setStatus("cancelled", "Cancelled here; the server's copy expires within minutes.", false);
        showError(error.code, error.serverMessage);
      }
    } catch (err) {
      setStatus("cancelled", "Cancelled here; the server's copy expires within minutes.", false);
    }
  }

  // Leaving the page mid-job: withdraw it so the encrypted photo does not wait for its TTL.
  function withdrawOnLeave() {
    const job = state.job;
    if (!job) return;
    try {
      fetch(job.status_url, {
        method: "DELETE",
        keepalive: true,
        credentials: "same-origin",
        headers: apiHeaders({ Authorization: "Bearer " + job.token }),
      }).catch(() => {});
    } catch (err) {
      // The page is going away; nothing more can be done.
    }
  }

  // --- drawing the result -------------------------------------------------------------------
  async function decodeMap(base64, width, height) {
    const bytes = base64ToBytes(base64);
    const bitmap = await createImageBitmap(new Blob([bytes], { type: "image/png" }), {
      colorSpaceConversion: "none",
      premultiplyAlpha: "none",
    });
    if (bitmap.width !== width || bitmap.height !== height) {
      bitmap.close();
      throw new Error("map size " + bitmap.width + "x" + bitmap.height + " is not " + width + "x" + height);
    }
    const rgba = pixelsOf(bitmap, width, height, false);
    bitmap.close();
    const values = new Uint8Array(width * height);
    for (let i = 0; i < values.length; i += 1) values[i] = rgba[i * 4];
    return { values, bytes };
  }

  function pixelsOf(source, width, height, onWhite) {
    const canvas = document.createElement("canvas");
    canvas.width = width;
    canvas.height = height;
    const context = canvas.getContext("2d", { willReadFrequently: true });
    if (onWhite) {
      context.fillStyle = "#ffffff"; // the worker composites transparent pixels on white too
      context.fillRect(0, 0, width, height);
    }
    context.drawImage(source, 0, 0, width, height);
    return context.getImageData(0, 0, width, height).data;
  }

  async function render(file, bitmap, result) {
    if (result.untrained || (result.warnings && result.warnings.length)) showUntrained(result.warnings);
    const width = result.width;
    const height = result.height;
    const labels = await decodeMap(result.label_map_png, width, height);
    const instances = await decodeMap(result.instance_map_png, width, height);
    const names = CIHP_CLASSES.map((name, id) => (result.classes && result.classes[String(id)]) || name);
    state.view = {
      width,
      height,
      labels: labels.values,
      instances: instances.values,
      original: pixelsOf(bitmap, width, height, true),
      names,
      persons: result.persons || [],
      stem: file.name.replace(/\.[^.]+$/, "") || "photo",
    };
    state.selected = 0;
    checkClassesPresent(labels.values, result.classes_present);
    $("original-image").src = setObjectUrl("original", file);
    const canvas = $("overlay-canvas");
    canvas.width = width;
    canvas.height = height;
    setDownload("download-labels", "labels", new Blob([labels.bytes], { type: "image/png" }), ".labels.png");
    setDownload("download-instances", "instances", new Blob([instances.bytes], { type: "image/png" }), ".instances.png");
    renderPersons();
    drawOverlay();
    $("result").hidden = false;
  }

  // The classes drawn must be the classes the server says are present; a mismatch means the
  // browser altered the PNG's values while decoding (colour management): say so loudly.
  function checkClassesPresent(labels, present) {
    if (!Array.isArray(present)) return;
    const seen = new Set(labels);
    const expected = new Set(present.map(Number));
    const same = seen.size === expected.size && Array.from(seen).every((id) => expected.has(id));
    if (!same) console.error("m2fp: decoded label map classes", Array.from(seen), "differ from classes_present", present);
  }

  function setDownload(id, slot, blob, suffix) {
    const link = $(id);
    link.href = setObjectUrl(slot, blob);
    link.download = state.view.stem + suffix;
  }

  function drawOverlay() {
    const view = state.view;
    if (!view) return;
    const alpha = Number($("opacity-input").value) / 100;
    const canvas = $("overlay-canvas");
    const context = canvas.getContext("2d");
    const image = context.createImageData(view.width, view.height);
    const out = image.data;
    const selected = state.selected;
    const { labels, instances, original } = view;
    for (let i = 0, p = 0; i < labels.length; i += 1, p += 4) {
      const label = labels[i];
      const shown = label !== 0 && (selected === 0 || instances[i] === selected);
      const colour = PALETTE[label] || PALETTE[0];
      if (shown) {
        out[p] = original[p] * (1 - alpha) + colour[0] * alpha;
        out[p + 1] = original[p + 1] * (1 - alpha) + colour[1] * alpha;
        out[p + 2] = original[p + 2] * (1 - alpha) + colour[2] * alpha;
      } else if (selected !== 0) {
        out[p] = original[p] * 0.3; // dim everything that is not the chosen person's
        out[p + 1] = original[p + 1] * 0.3;
        out[p + 2] = original[p + 2] * 0.3;
      } else {
        out[p] = original[p];
        out[p + 1] = original[p + 1];
        out[p + 2] = original[p + 2];
      }
      out[p + 3] = 255;
    }
    context.putImageData(image, 0, 0);
    $("overlay-caption").textContent = selected === 0 ? "Parsing overlay: all people" : "Parsing overlay: person " + selected;
    renderLegend();
    scheduleOverlayDownload();
  }

  function requestRedraw() {
    $("opacity-output").textContent = $("opacity-input").value + "%";
    if (state.redrawPending) return;
    state.redrawPending = true;
    requestAnimationFrame(() => {
      state.redrawPending = false;
      drawOverlay();
    });
  }

  function scheduleOverlayDownload() {
    clearTimeout(state.overlayTimer);
    state.overlayTimer = setTimeout(() => {
      $("overlay-canvas").toBlob((blob) => {
        if (!blob || !state.view) return;
        const suffix = state.selected === 0 ? ".overlay.png" : ".person" + state.selected + ".overlay.png";
        setDownload("download-overlay", "overlay", blob, suffix);
      }, "image/png");
    }, 250);
  }

  function renderLegend() {
    const view = state.view;
    const counts = new Array(PALETTE.length).fill(0);
    let total = 0;
    for (let i = 0; i < view.labels.length; i += 1) {
      const label = view.labels[i];
      if (label === 0 || (state.selected !== 0 && view.instances[i] !== state.selected)) continue;
      counts[label] += 1;
      total += 1;
    }
    const legend = $("legend");
    legend.textContent = "";
    counts.forEach((count, id) => {
      if (!count) return;
      const item = document.createElement("li");
      item.className = "legend-item";
      item.dataset.classId = String(id);
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.setAttribute("aria-hidden", "true");
      swatch.style.backgroundColor = "rgb(" + PALETTE[id].join(",") + ")";
      const name = document.createElement("span");
      name.className = "legend-name";
      name.textContent = view.names[id];
      const share = document.createElement("span");
      share.className = "legend-share";
      share.textContent = ((100 * count) / total).toFixed(1) + "%";
      item.append(swatch, name, share);
      legend.appendChild(item);
    });
    if (!total) {
      const item = document.createElement("li");
      item.className = "legend-empty";
      item.textContent = "No body part or garment found.";
      legend.appendChild(item);
    }
  }

  function renderPersons() {
    const list = $("persons");
    list.textContent = "";
    const view = state.view;
    if (!view.persons.length) {
      const item = document.createElement("li");
      item.className = "persons-empty";
      item.textContent = "No person was found in this photo.";
      list.appendChild(item);
      return;
    }
    list.appendChild(personItem(0, "Everyone (" + view.persons.length + ")"));
    view.persons.forEach((person) => {
      const parts = (person.parts || []).length;
      const share = ((100 * (person.area || 0)) / (view.width * view.height)).toFixed(1);
      const label = "Person " + person.index + " \u00b7 score " + Number(person.score || 0).toFixed(2) +
        " \u00b7 " + parts + (parts === 1 ? " part" : " parts") + " \u00b7 " + share + "% of the photo";
      list.appendChild(personItem(person.index, label));
    });
  }

  function personItem(index, label) {
    const item = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.className = "person-button";
    button.dataset.person = String(index);
    button.setAttribute("aria-pressed", String(index === state.selected));
    button.textContent = label;
    item.appendChild(button);
    return item;
  }

  function selectPerson(index) {
    state.selected = index;
    document.querySelectorAll("#persons .person-button").forEach((button) => {
      button.setAttribute("aria-pressed", String(Number(button.dataset.person) === index));
    });
    drawOverlay();
  }

  // --- wiring ---------------------------------------------------------------------------------
  function readLimits() {
    const data = document.body.dataset;
    const number = (value, fallback) => (Number(value) > 0 ? Number(value) : fallback);
    state.limits = {
      bytes: number(data.maxBytes, state.limits.bytes),
      pixels: number(data.maxPixels, state.limits.pixels),
      side: number(data.maxSide, state.limits.side),
    };
    $("limit-bytes").textContent = formatBytes(state.limits.bytes);
    $("limit-pixels").textContent = Math.round(state.limits.pixels / 1e6) + " megapixels";
  }

  function wireDropZone() {
    const zone = $("drop-zone");
    ["dragenter", "dragover"].forEach((type) => zone.addEventListener(type, (event) => {
      event.preventDefault();
      zone.classList.add("dragging");
    }));
    ["dragleave", "dragend"].forEach((type) => zone.addEventListener(type, () => zone.classList.remove("dragging")));
    zone.addEventListener("drop", (event) => {
      event.preventDefault();
      zone.classList.remove("dragging");
      handleFiles(event.dataTransfer && event.dataTransfer.files);
    });
    // A photo dropped outside the zone must not make the browser navigate away to it.
    ["dragover", "drop"].forEach((type) => window.addEventListener(type, (event) => event.preventDefault()));
  }

  function init() {
    readLimits();
    wireDropZone();
    const input = $("file-input");
    input.addEventListener("change", () => {
      const files = Array.from(input.files || []);
      input.value = ""; // choosing the same file again must fire "change" again
      handleFiles(files);
    });
    $("cancel-button").addEventListener("click", cancelJob);
    $("api-key-form").addEventListener("submit", (event) => event.preventDefault()); // Enter must not reload
    $("opacity-input").addEventListener("input", requestRedraw);
    $("persons").addEventListener("click", (event) => {
      const button = event.target.closest(".person-button");
      if (button) selectPerson(Number(button.dataset.person));
    });
    window.addEventListener("pagehide", withdrawOnLeave);
    checkReadiness();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
