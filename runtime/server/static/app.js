// The page: a form over /sdapi/v1/txt2img and img2img, /progress polled while a request runs.
"use strict";

const $ = (id) => document.getElementById(id);
const POLL_MS = 250;
let initImage = null; // a data: URL once an image is dropped
let busy = false;

async function api(path, body) {
  const options = body === undefined ? {} :
    { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  const response = await fetch(path, options);
  const answer = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(answer.detail || `${response.status} ${response.statusText}`);
  return answer;
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function fill(select, names, chosen) {
  select.replaceChildren(...names.map((name) => new Option(name, name, false, name === chosen)));
}

async function loadChoices() {
  const [models, samplers, options] = await Promise.all([
    api("/sdapi/v1/sd-models"), api("/sdapi/v1/samplers"), api("/sdapi/v1/options")]);
  fill($("model"), models.map((m) => m.title), options.sd_model_checkpoint);
  fill($("sampler_name"), samplers.map((s) => s.name), "DPM++ 2M");
}

function request() {
  const number = (id) => ($(id).value === "" ? null : Number($(id).value));
  const body = {
    prompt: $("prompt").value, negative_prompt: $("negative_prompt").value,
    width: number("width"), height: number("height"), steps: number("steps"),
    cfg_scale: number("cfg_scale"), sampler_name: $("sampler_name").value, seed: number("seed") ?? -1,
  };
  if (initImage) {
    body.init_images = [initImage];
    body.denoising_strength = Number($("denoising_strength").value);
  }
  return body;
}

function showProgress(fraction, text) {
  const percent = Math.round(fraction * 100);
  $("progress-bar").style.width = `${percent}%`;
  $("progress").setAttribute("aria-valuenow", String(percent));
  $("progress-text").textContent = text;
}

async function poll() {
  while (busy) {
    try {
      const state = await api("/sdapi/v1/progress");
      if (busy && state.state.job_count > 0) {
        showProgress(state.progress, `${state.textinfo} · ${state.eta_relative.toFixed(1)} s left`);
        if (state.current_image) {
          $("current-image").src = `data:image/png;base64,${state.current_image}`;
          $("current-image").hidden = false;
          $("current-image").classList.add("preview");
          $("current-caption").textContent = `preview at step ${state.state.sampling_step}`;
        }
      } else if (busy && state.state.queued > 0) {
        showProgress(0, `waiting behind ${state.state.queued} request(s)`);
      }
    } catch (error) {
      setStatus(error.message, true);
    }
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
  }
}

function addToGallery(image, infotext, seed) {
  const url = `data:image/png;base64,${image}`;
  const figure = document.createElement("figure");
  const picture = Object.assign(document.createElement("img"), { src: url, alt: infotext.split("\n")[0] });
  picture.addEventListener("click", () => show(url, infotext));
  const caption = Object.assign(document.createElement("figcaption"), { textContent: infotext });
  const link = Object.assign(document.createElement("a"), { href: url, download: `coreml-sd-${seed}.png`,
    textContent: "Download", className: "download" });
  figure.append(picture, caption, link);
  $("gallery").prepend(figure);
}

function show(url, infotext) {
  $("current-image").src = url;
  $("current-image").hidden = false;
  $("current-image").classList.remove("preview");
  $("current-caption").textContent = infotext;
}

async function generate() {
  if (busy) return;
  busy = true;
  $("generate").disabled = true;
  $("interrupt").disabled = false;
  setStatus("");
  showProgress(0, "starting");
  poll();
  try {
    const answer = await api(initImage ? "/sdapi/v1/img2img" : "/sdapi/v1/txt2img", request());
    const info = JSON.parse(answer.info);
    answer.images.forEach((image, index) => addToGallery(image, info.infotexts[index], info.all_seeds[index]));
    if (answer.images.length) show(`data:image/png;base64,${answer.images[0]}`, info.infotexts[0]);
    showProgress(1, `done: ${answer.images.length} image(s)`);
  } catch (error) {
    setStatus(error.message, true);
    showProgress(0, "failed");
  } finally {
    busy = false;
    $("generate").disabled = false;
    $("interrupt").disabled = true;
  }
}

function useImage(file) {
  if (!file || !file.type.startsWith("image/")) {
    setStatus("drop an image file (PNG, JPEG, WebP)", true);
    return;
  }
  const reader = new FileReader();
  reader.onload = () => {
    initImage = reader.result;
    $("init-image").src = initImage;
    $("init-image").hidden = $("clear-image").hidden = $("strength-row").hidden = false;
    $("drop-hint").hidden = true;
  };
  reader.readAsDataURL(file);
}

function clearImage() {
  initImage = null;
  $("init-image").hidden = $("clear-image").hidden = $("strength-row").hidden = true;
  $("drop-hint").hidden = false;
}

function wire() {
  $("settings").addEventListener("submit", (event) => { event.preventDefault(); generate(); });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) { event.preventDefault(); generate(); }
  });
  $("interrupt").addEventListener("click", () => api("/sdapi/v1/interrupt", {}).catch(() => {}));
  $("model").addEventListener("change", async () => {
    setStatus(`loading ${$("model").value} ...`);
    try {
      await api("/sdapi/v1/options", { sd_model_checkpoint: $("model").value });
      setStatus(`${$("model").value} loaded`);
    } catch (error) {
      setStatus(error.message, true);
    }
  });
  $("denoising_strength").addEventListener("input", () => {
    $("strength-value").textContent = $("denoising_strength").value;
  });
  for (const target of [$("drop"), document.body]) {
    target.addEventListener("dragover", (event) => { event.preventDefault(); $("drop").classList.add("over"); });
    target.addEventListener("dragleave", () => $("drop").classList.remove("over"));
    target.addEventListener("drop", (event) => {
      event.preventDefault();
      event.stopPropagation();
      $("drop").classList.remove("over");
      useImage(event.dataTransfer.files[0]);
    });
  }
  $("clear-image").addEventListener("click", clearImage);
}

wire();
loadChoices().catch((error) => setStatus(error.message, true));
