"""The request and response bodies of AUTOMATIC1111's web API (its `modules/api/models.py`), field for field.

Fields the runtime cannot honour (face restoration, variation seeds at strength 0, scripts' arguments, ...) are
declared so that clients which always send them are accepted, and ignored as A1111 ignores an absent extension;
fields A1111 never had are dropped. Which values the runtime cannot do is decided in translation.py.
"""
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class GenerationRequest(BaseModel):
    """What txt2img and img2img share (A1111's StableDiffusionProcessing)."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = ""
    negative_prompt: str | None = ""
    styles: list[str] | None = None
    seed: int = Field(-1, description="-1: a random seed")
    subseed: int = -1
    subseed_strength: float = 0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = Field(None, description="a name from /sdapi/v1/samplers")
    sampler_index: str | None = "Euler"
    scheduler: str | None = Field(None, description="a name from /sdapi/v1/schedulers")
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int | None = Field(None, description="default: the package's own width")
    height: int | None = Field(None, description="default: the package's own height")
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = Field(None, description="an SDXL refiner package from /sdapi/v1/sd-models")
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    comments: dict[str, Any] | None = None
    script_name: str | None = None
    script_args: list = []
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = {}
    force_task_id: str | None = None
    infotext: str | None = None


class Txt2ImgRequest(GenerationRequest):
    enable_hr: bool = False
    denoising_strength: float | None = 0.75
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""


class Img2ImgRequest(GenerationRequest):
    init_images: list[str] | None = Field(None, description="base64 images (PNG, JPEG, ...), data: URLs too")
    resize_mode: int = 0
    denoising_strength: float = 0.75
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: int | None = None
    mask_round: bool = True
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    include_init_images: bool = False


class GenerationResponse(BaseModel):
    images: list[str] | None = Field(None, description="The generated images as base64 PNGs.")
    parameters: dict
    info: str = Field(description="A JSON string: the settings of the images, `infotexts` their PNG parameters.")


class PNGInfoRequest(BaseModel):
    image: str = Field(description="A base64 PNG")


class PNGInfoResponse(BaseModel):
    info: str
    items: dict
    parameters: dict


class ProgressResponse(BaseModel):
    progress: float = Field(description="0 to 1")
    eta_relative: float
    state: dict
    current_image: str | None = Field(None, description="A preview of the image in progress, base64 PNG.")
    textinfo: str | None = None


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, Any]


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: list[str] | None = None
    default_rho: float | None = None
    need_inner_model: bool | None = None


class SDModelItem(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    title: str
    model_name: str
    hash: str | None = None
    sha256: str | None = None
    filename: str
    config: str | None = None


class LoraItem(BaseModel):
    name: str
    alias: str
    path: str | None = None
    metadata: dict[str, Any] = {}
