"""A1111's requests to the runtime's pipeline calls, and the runtime's results back to A1111's answers.

Samplers go by A1111's names ("Euler a", "DPM++ 2M Karras"), which the runtime takes as they are
(sampler_names.py), or by the runtime's short names. The PNG parameters are the runtime's own text (in A1111's
format, infotext.py), so an image from the server equals the one `coreml-generate` writes; png-info reads that text
back into A1111's fields.
"""
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageOps

from .. import sampler_names
from ..generation_options import MAX_SEED, random_seed
from ..infotext import parse_infotext
from ..inpainting import Inpainting, redraw_mask
from ..schedulers import SCHEDULERS
from ..upscaling import MAX_FACTOR, MIN_FACTOR, Upscale
from .errors import invalid
from .schemas import GenerationRequest, Img2ImgRequest, Txt2ImgRequest

# Our short names by the A1111 sampler they are, as clients may send either.
SHORT_NAMES = {a1111: short for short, a1111 in sampler_names.SHORT_NAMES.items()}
# A1111's noise schedules beside the sampler: only the package's own (A1111's "automatic") exists here.
SCHEDULES = {"automatic": "Automatic"}
MAX_SIDE = 2048  # pixels per side of any image made, upscaled ones included
MAX_IMAGES = 16  # batch_size x n_iter
MAX_STEPS = 1000  # SD's training timesteps; the pipeline checks the package's own number too
HIRES_UPSCALERS = ("", "none", "lanczos")  # what `hr_upscaler` may name: the runtime enlarges with Lanczos
# A1111's `inpainting_fill`: what the masked pixels start as. The runtime starts them as the original (1) always.
INPAINTING_FILLS = {0: "fill", 1: "original", 2: "latent noise", 3: "latent nothing"}
EMPTY_MASK = "the mask is black everywhere: nothing to inpaint, so the init image is returned as it is"


def sampler_items() -> list[dict[str, Any]]:
    return [{"name": name, "aliases": [name.lower().replace(" ", "_"), *([SHORT_NAMES[name]] if name in SHORT_NAMES
                                                                        else [])], "options": {}}
            for name in sampler_names.A1111_SAMPLERS]


def scheduler_items() -> list[dict[str, Any]]:
    return [{"name": name, "label": label, "aliases": None, "default_rho": None, "need_inner_model": None}
            for name, label in SCHEDULES.items()]


@dataclass
class Generation:
    """One request's images: what each Pipeline call takes, and which packages make them."""

    prompt: str
    negative_prompt: str
    steps: int
    guidance_scale: float
    scheduler: str
    seed: int
    num_images: int
    width: int | None
    height: int | None
    model: str | None = None  # a package other than the server's current one, for this request
    image: Image.Image | None = None
    strength: float = 0.8
    upscale: Upscale | None = None
    refiner: str | None = None
    refiner_start: float = 0.8
    inpainting: Inpainting | None = None
    clip_skip: int = 1  # A1111's CLIP_stop_at_last_layers
    created: float = field(default_factory=time.time)

    def pipeline_keywords(self, index: int) -> dict[str, Any]:
        """Image `index`'s Pipeline.__call__ keywords (less the refiner): one image per call, so that progress,
        skip and interrupt act per image; the images equal one call's consecutive seeds."""
        return {"negative_prompt": self.negative_prompt, "steps": self.steps, "guidance_scale": self.guidance_scale,
                "scheduler": self.scheduler, "seed": self.seed + index, "image": self.image, "strength": self.strength,
                "num_images": 1, "width": self.width, "height": self.height, "upscale": self.upscale,
                "refiner_start": self.refiner_start, "inpainting": self.inpainting, "clip_skip": self.clip_skip,
                "progress": False}


def _positive(value: int, name: str, limit: int, hint: str) -> int:
    if not 1 <= value <= limit:
        raise invalid(f"{name} must be between 1 and {limit}, not {value}; {hint}")
    return value


def _side(value: int | None, name: str) -> int | None:
    if value is None:
        return None
    if not 8 <= value <= MAX_SIDE or value % 8:
        raise invalid(f"{name} must be a multiple of 8 between 8 and {MAX_SIDE}, not {value}")
    return value


def _sampler(request: GenerationRequest) -> str:
    name = request.sampler_name or request.sampler_index or "Euler"
    scheduler = name if name in SCHEDULERS else sampler_names.a1111_name(name)
    if scheduler is None:
        raise invalid(f"sampler {name!r} is not available; choose one of {', '.join(sampler_names.A1111_SAMPLERS)} "
                      "(GET /sdapi/v1/samplers)")
    schedule = (request.scheduler or "automatic").lower()
    if schedule not in SCHEDULES:
        raise invalid(f"scheduler {request.scheduler!r} is not available; Core ML packages keep their own noise "
                      "schedule: send 'automatic' or leave it out")
    return scheduler


def _seed(seed: int, count: int) -> int:
    if seed == -1:
        return random_seed(count)
    last = MAX_SEED + 1 - count
    if not 0 <= seed <= last:
        raise invalid(f"seed must be -1 (random) or in [0, {last}] for {count} image(s), not {seed}")
    return seed


def _unsupported(request: GenerationRequest) -> None:
    """Values A1111 would act on that the runtime cannot."""
    if request.subseed_strength:
        raise invalid("variation seeds are not supported; send subseed_strength 0")
    if request.script_name:
        raise invalid(f"script {request.script_name!r} not found; this server runs no scripts")


def _model_override(request: GenerationRequest) -> str | None:
    override = (request.override_settings or {}).get("sd_model_checkpoint")
    if override is not None and not isinstance(override, str):
        raise invalid("override_settings.sd_model_checkpoint must be a model title from /sdapi/v1/sd-models")
    return override or None


def _clip_skip(request: GenerationRequest) -> int:
    """A1111's clip skip setting, as a request overrides it."""
    value = (request.override_settings or {}).get("CLIP_stop_at_last_layers", 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise invalid(f"override_settings.CLIP_stop_at_last_layers must be a whole number of at least 1 (1: the "
                      f"last layer, 2: the penultimate), not {value!r}")
    return value


def _common(request: GenerationRequest, count: int) -> dict[str, Any]:
    _unsupported(request)
    steps = _positive(request.steps, "steps", MAX_STEPS, "20 to 50 is usual")
    refiner = request.refiner_checkpoint if request.refiner_checkpoint not in (None, "", "None") else None
    refiner_start = 0.8 if request.refiner_switch_at is None else request.refiner_switch_at
    if refiner is not None and not 0 < refiner_start < 1:
        raise invalid(f"refiner_switch_at must be between 0 and 1, not {refiner_start}")
    return {"prompt": request.prompt, "negative_prompt": request.negative_prompt or "", "steps": steps,
            "guidance_scale": request.cfg_scale, "scheduler": _sampler(request), "seed": _seed(request.seed, count),
            "num_images": count, "width": _side(request.width, "width"), "height": _side(request.height, "height"),
            "model": _model_override(request), "refiner": refiner, "refiner_start": refiner_start,
            "clip_skip": _clip_skip(request)}


def _count(request: GenerationRequest) -> int:
    _positive(request.batch_size, "batch_size", MAX_IMAGES, f"at most {MAX_IMAGES} images per request")
    _positive(request.n_iter, "n_iter", MAX_IMAGES, f"at most {MAX_IMAGES} images per request")
    return _positive(request.batch_size * request.n_iter, "batch_size x n_iter", MAX_IMAGES,
                     "ask in several requests")


def _strength(value: float | None, name: str) -> float:
    if value is None or not 0 <= value <= 1:
        raise invalid(f"{name} must be between 0 and 1, not {value}")
    return value


def txt2img(request: Txt2ImgRequest) -> Generation:
    generation = Generation(**_common(request, _count(request)))
    if request.enable_hr:
        generation.upscale = _hires(request, generation)
    return generation


def _hires(request: Txt2ImgRequest, generation: Generation) -> Upscale:
    if (request.hr_upscaler or "").lower() not in HIRES_UPSCALERS:
        raise invalid(f"hr_upscaler {request.hr_upscaler!r} is not available; send 'Lanczos' (the runtime "
                      "enlarges with Lanczos, then refines)")
    if request.hr_resize_x or request.hr_resize_y:
        raise invalid("hr_resize_x and hr_resize_y are not supported; send hr_scale instead")
    differing = [name for name, value, same in (
        ("hr_checkpoint_name", request.hr_checkpoint_name, None), ("hr_sampler_name", request.hr_sampler_name, None),
        ("hr_prompt", request.hr_prompt or None, request.prompt),
        ("hr_negative_prompt", request.hr_negative_prompt or None, request.negative_prompt),
    ) if value not in (None, "", "Use same checkpoint", "Use same sampler", same)]
    if differing:
        raise invalid(f"the hires pass runs with the first pass's model, sampler and prompts; leave out "
                      f"{', '.join(differing)}")
    if not MIN_FACTOR <= request.hr_scale <= MAX_FACTOR:
        raise invalid(f"hr_scale must be between {MIN_FACTOR:g} and {MAX_FACTOR:g}, not {request.hr_scale}")
    for name, side in (("width", generation.width), ("height", generation.height)):
        if side is not None and side * request.hr_scale > MAX_SIDE:
            raise invalid(f"{name} {side} x hr_scale {request.hr_scale:g} is over {MAX_SIDE} pixels; lower either")
    steps = request.hr_second_pass_steps or None
    if steps is not None:
        _positive(steps, "hr_second_pass_steps", MAX_STEPS, "0 takes the first pass's steps")
    return Upscale(request.hr_scale, _strength(request.denoising_strength, "denoising_strength"), steps)


def img2img(request: Img2ImgRequest, image: Image.Image, mask: Image.Image | None = None) -> Generation:
    generation = Generation(**_common(request, _count(request)))
    generation.image = image
    generation.strength = _strength(request.denoising_strength, "denoising_strength")
    if mask is not None:
        generation.inpainting = _inpainting(request, image, mask)
    return generation


def _inpainting(request: Img2ImgRequest, image: Image.Image, mask: Image.Image) -> Inpainting:
    """A1111's mask settings: white (or opaque) redrawn, or the rest with inpainting_mask_invert; mask_blur, when
    sent, for both of mask_blur_x and mask_blur_y; inpaint_full_res generates only the area around the mask."""
    if mask.size != image.size:
        raise invalid(f"mask is {mask.width}x{mask.height} but init_images[0] {image.width}x{image.height}; send a "
                      "mask of the init image's size")
    if request.inpainting_mask_invert not in (0, 1):
        raise invalid(f"inpainting_mask_invert must be 0 (redraw the white) or 1 (the black), not "
                      f"{request.inpainting_mask_invert}")
    if request.inpainting_fill not in INPAINTING_FILLS:
        fills = ", ".join(f"{key} ({name})" for key, name in INPAINTING_FILLS.items())
        raise invalid(f"inpainting_fill must be one of {fills}, not {request.inpainting_fill}")
    across, down = ((request.mask_blur, request.mask_blur) if request.mask_blur is not None
                    else (request.mask_blur_x, request.mask_blur_y))
    for name, pixels in (("mask_blur" if request.mask_blur is not None else "mask_blur_x", across),
                         ("mask_blur_y", down), ("inpaint_full_res_padding", request.inpaint_full_res_padding)):
        if pixels < 0:
            raise invalid(f"{name} must be at least 0 pixels, not {pixels}")
    redraw = redraw_mask(mask)
    if request.inpainting_mask_invert:
        redraw = ImageOps.invert(redraw)
    return Inpainting(redraw, across, down, request.inpaint_full_res_padding if request.inpaint_full_res else None)


def check_img2img_inputs(request: Img2ImgRequest) -> str:
    """The one init image to decode (the runtime starts every image of a request from the same one)."""
    if not request.init_images:
        raise invalid("img2img needs init_images: a list with one base64 image")
    if len(request.init_images) > 1:
        raise invalid(f"img2img takes one init image, not {len(request.init_images)}; send one request per image")
    return request.init_images[0]


def echoed_parameters(request: GenerationRequest) -> dict[str, Any]:
    """The request as A1111 echoes it in `parameters` (without the input images unless asked for)."""
    parameters = request.model_dump()
    if isinstance(request, Img2ImgRequest) and not request.include_init_images:
        parameters.update(init_images=None, mask=None)
    return parameters


def info_json(generation: Generation, seeds: list[int], infotexts: list[str], model: str, size: tuple[int, int],
              sampler: str) -> str:
    """A1111's `info`: the settings of the images made, as a JSON string."""
    count = len(seeds)
    return json.dumps({
        "prompt": generation.prompt, "all_prompts": [generation.prompt] * count,
        "negative_prompt": generation.negative_prompt, "all_negative_prompts": [generation.negative_prompt] * count,
        "seed": seeds[0] if seeds else generation.seed, "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * count,
        "subseed_strength": 0, "width": size[0], "height": size[1], "sampler_name": sampler,
        "cfg_scale": generation.guidance_scale, "steps": generation.steps, "batch_size": generation.num_images,
        "restore_faces": False, "face_restoration_model": None, "sd_model_name": model, "sd_model_hash": None,
        "sd_vae_name": None, "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": generation.strength if generation.image is not None else None,
        "extra_generation_params": {}, "index_of_first_image": 0, "infotexts": infotexts, "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(generation.created)),
        "clip_skip": generation.clip_skip,
        "is_using_inpainting_conditioning": False,
        **({"comments": EMPTY_MASK} if generation.inpainting is not None and generation.inpainting.empty else {}),
    })


def sampler_title(scheduler: str) -> str:
    return sampler_names.sampler_fields(scheduler)["Sampler"]


def parse_parameters(text: str) -> dict[str, Any]:
    """A PNG's parameters text as A1111's png-info gives it: Prompt, Negative prompt, then each setting as a string
    (Size also as Size-1 and Size-2)."""
    infotext = parse_infotext(text)
    result: dict[str, Any] = {"Prompt": infotext.prompt, "Negative prompt": infotext.negative_prompt}
    for key, value in infotext.settings.items():
        result[key] = value
        size = re.fullmatch(r"(\d+)x(\d+)", value)
        if key.endswith("Size") and size:
            result[f"{key}-1"], result[f"{key}-2"] = size.groups()
    return result
