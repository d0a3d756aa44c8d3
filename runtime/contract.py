"""The package contract, as data: the one home of what a package is.

These are the names and layouts of Apple's StableDiffusion Swift package, so that a Swift app can load the packages
as they are: the component names and their files, each component's inputs and outputs (names, shapes, dtypes), the
chunks a split Unet comes in, the tokenizer files, and per family which components generating needs and the settings
that apply when a package carries no manifest (Apple's published bundles). The same table gives each tensor the
description Xcode shows, the rule a chunked Unet's two packages follow, and the minimum OS versions.

The runtime reads it to find and run packages; the converter's families (`coreml_sd.converter.families`) extend it
with how each component is built; the bundle writer, the tests and packages/README.md read it from here. A new
component is a row here.
"""
from dataclasses import asdict, dataclass, field

TEXT_LENGTH = 77
LATENT_CHANNELS = 4
VAE_FACTOR = 8
CLIP_IMAGE_SIZE = 224  # the safety checker's CLIP input
SAFETY_CONCEPTS = 17  # diffusers' StableDiffusionSafetyChecker holds 17 concept embeddings


TOKENIZER_FILES = ("vocab.json", "merges.txt")  # beside the models, in package folders and Swift bundles
COMPILED_SUFFIX = ".mlmodelc"  # what the Swift package loads: a compiled model
PACKAGE_SUFFIX = ".mlpackage"
MODEL_SUFFIXES = (PACKAGE_SUFFIX, COMPILED_SUFFIX)  # in this order of preference: both backends run a .mlpackage
MANIFEST_FILE = "manifest.json"  # what coreml-convert writes beside the models
BUNDLE_FOLDER = "Resources"  # where a Swift app's (and the Diffusers app's) models lie

# The components, by the names their files have (<Name>.mlpackage / <Name>.mlmodelc).
TEXT_ENCODER = "TextEncoder"
TEXT_ENCODER_2 = "TextEncoder2"
UNET = "Unet"
UNET_REFINER = "UnetRefiner"  # the SDXL refiner's Unet, beside a base's
VAE_DECODER = "VAEDecoder"
VAE_ENCODER = "VAEEncoder"
SAFETY_CHECKER = "SafetyChecker"
CONTROLLED_UNET = "ControlledUnet"  # the Unet taking ControlNet residuals, beside the Unet (Apple's Swift package)
COMPONENTS = (TEXT_ENCODER, TEXT_ENCODER_2, UNET, UNET_REFINER, VAE_DECODER, VAE_ENCODER, SAFETY_CHECKER,
              CONTROLLED_UNET)
# ControlNets: <CONTROLNET_FOLDER>/<Name>.mlpackage (.mlmodelc in Resources/), each a component named
# "controlnet/<Name>"; <Name> is Apple's bundler's (converter.controlnets.controlnet_name).
CONTROLNET_FOLDER = "controlnet"
CONTROLNET_PREFIX = CONTROLNET_FOLDER + "/"

# A Unet split in two for iPhones: <Name>Chunk1 and <Name>Chunk2 (Apple's names), run one after the other.
CHUNK_COUNT = 2
CHUNKED_COMPONENTS = (UNET, UNET_REFINER, CONTROLLED_UNET)


def chunk_names(component: str) -> tuple[str, ...]:
    """The packages a chunked component is installed as, in run order."""
    return tuple(f"{component}Chunk{index}" for index in range(1, CHUNK_COUNT + 1))


# Apple's Python converter (torch2coreml) names its outputs Stable_Diffusion_version_<model id>_<name>.mlpackage.
APPLE_CONVERTER_PREFIX = "Stable_Diffusion_version_"
APPLE_CONVERTER_NAMES = {
    "text_encoder": TEXT_ENCODER, "text_encoder_2": TEXT_ENCODER_2, "unet": UNET, "refiner": UNET_REFINER,
    "vae_decoder": VAE_DECODER, "vae_encoder": VAE_ENCODER, "safety_checker": SAFETY_CHECKER,
    **{f"{python}_chunk{index}": chunk for python, name in (("unet", UNET), ("refiner", UNET_REFINER))
       for index, chunk in enumerate(chunk_names(name), start=1)},
}


@dataclass(frozen=True)
class MinimumOS:
    macos: str
    ios: str

    def __str__(self) -> str:
        return f"macOS {self.macos} / iOS {self.ios}"


# The packages' format: ML Programs of Core ML specification 7, with float16 inputs and palettes.
PACKAGE_MINIMUM_OS = MinimumOS(macos="13", ios="16")
# A multifunction model (several functions sharing one copy of the weights) loads from these versions on.
MULTIFUNCTION_MINIMUM_OS = MinimumOS(macos="15", ios="18")

# A multifunction Unet's (and ControlNet's) functions, one per Unet batch and prompt length: `main` takes the batch
# of guided sampling (2) and 77 tokens, as Apple's Swift package loads it; `unguided` takes batch 1; a prompt of k
# 77-token chunks runs `tokens_<77k>` / `unguided_tokens_<77k>`. A Unet package may also hold the ControlledUnet
# (--shared-controlled-unet): `controlled`, `controlled_tokens_<77k>`, the same weights stored once. The manifest
# lists each function's batch and chunks, and the component it computes when that is not the package's own.
MAIN_FUNCTION = "main"
UNGUIDED_FUNCTION = "unguided"
CONTROLLED_FUNCTION = "controlled"


def function_name(unguided: bool, prompt_chunks: int, controlled: bool = False) -> str:
    """The name of the function that takes batch 1 (`unguided`) or the guided batch, and `prompt_chunks` chunks;
    `controlled`: of the ControlledUnet held in the Unet's package."""
    tokens = f"tokens_{prompt_chunks * TEXT_LENGTH}" if prompt_chunks > 1 else ""
    prefix = UNGUIDED_FUNCTION if unguided else CONTROLLED_FUNCTION if controlled else ""
    if prefix:
        return f"{prefix}_{tokens}" if tokens else prefix
    return tokens or MAIN_FUNCTION

# What each tensor is (its description in Xcode, "sample: noisy latents, (B,4,h,w) float16") and its layout in
# symbols: B the Unet's batch (2 with guidance in one call), h x w the latent size, H x W the image's, D and P the
# text encoders' hidden and pooled widths, N the number of size-conditioning numbers.
TENSOR_MEANINGS = {
    "input_ids": ("prompt token ids, padded to 77", "(1,77)"),
    "last_hidden_state": ("text embeddings, last layer", "(1,77,D)"),
    "hidden_embeds": ("text embeddings, penultimate layer, before the final layer norm", "(1,77,D)"),
    "pooled_outputs": ("pooled text embedding", "(1,P)"),
    "sample": ("noisy latents", "(B,4,h,w)"),
    "timestep": ("diffusion timestep per batch row", "(B)"),
    "encoder_hidden_states": ("text embeddings, negative prompt first", "(B,D,1,77)"),
    "time_ids": ("size conditioning: original size, crop, target size (refiner: aesthetic score)", "(B,N)"),
    "text_embeds": ("pooled text embedding of TextEncoder2", "(B,P)"),
    "timestep_cond": ("LCM guidance embedding: sinusoids of 1000 (guidance scale - 1)", "(B,G)"),
    "noise_pred": ("predicted noise (or v)", "(B,4,h,w)"),
    "z": ("latents divided by the latent scale factor", "(1,4,h,w)"),
    "image": ("decoded image in [-1, 1]", "(1,3,H,W)"),
    "x": ("image in [-1, 1]", "(1,3,H,W)"),
    "latent": ("latent mean and log-variance", "(1,8,h,w)"),
    "clip_input": ("image for CLIP, 224x224, normalized", "(1,3,224,224)"),
    "images": ("decoded images in [0, 1], channels last", "(1,H,W,3)"),
    "adjustment": ("added to the special-care scores", "(1)"),
    "filtered_images": ("the images, zeros where flagged", "(1,H,W,3)"),
    "has_nsfw_concepts": ("1 if the image is flagged", "(1,1,1,1)"),
    "concept_scores": ("score per concept, > 0 flags", "(1,17)"),
    "controlnet_cond": ("control image (edges, pose, depth...) in [0, 1], RGB", "(B,3,H,W)"),
}
# A ControlNet's outputs and a ControlledUnet's extra inputs, in the Unet's skip-connection order (conv_in, each
# down block's resnets and downsampler), the mid block's last: Apple's names.
RESIDUAL_PREFIX = "additional_residual_"
RESIDUAL_MEANING = "ControlNet residual added to a Unet skip connection (the last: to the mid block), summed"
# What each kind of component is, for its package's short description.
COMPONENT_SUMMARIES = {
    "text_encoder": "CLIP text encoder: prompt tokens to text embeddings",
    "unet": "Unet: predicts the noise in latents, conditioned on the text embeddings",
    "vae_decoder": "VAE decoder: latents to an image",
    "vae_encoder": "VAE encoder: an image to latents (image-to-image)",
    "safety_checker": "Safety checker: flags and blanks NSFW images",
    "controlnet": "ControlNet: residuals for the ControlledUnet from a control image",
    "controlled_unet": "Unet with ControlNet residual inputs: predicts the noise in latents",
}


# Clip skip N reads the hidden states N - 1 layers before those the family conditions with (FamilyContract.hidden_layer:
# SD's last layer after the final layer norm, SDXL's penultimate), each an output of its own: transformers'
# hidden_states[-2] is `hidden_embeds` (Apple's XL name), hidden_states[-k] deeper down `hidden_embeds_<k>`.
DEEPER_HIDDEN_PREFIX = "hidden_embeds_"


def tensor_meaning(name: str) -> tuple[str, str] | None:
    """A tensor's meaning and layout (None: a chunk's intermediate value)."""
    if name.startswith(DEEPER_HIDDEN_PREFIX):
        layer = name.removeprefix(DEEPER_HIDDEN_PREFIX)
        return f"text embeddings, layer {layer} from the end, before the final layer norm", "(1,77,D)"
    return TENSOR_MEANINGS.get(name)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # "float16" or "float32"

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "dtype": self.dtype}

    @property
    def description(self) -> str:
        """What Xcode shows beside the name: meaning, layout, dtype; an intermediate value between the chunks
        of a split model, which has no meaning of its own, is described by its concrete shape."""
        if self.name.startswith(RESIDUAL_PREFIX):
            return f"{RESIDUAL_MEANING}, ({','.join(map(str, self.shape))}) {self.dtype}"
        meaning, layout = tensor_meaning(self.name) or (CHUNK_INTERMEDIATE, "(" + ",".join(map(str, self.shape)) + ")")
        return f"{meaning}, {layout} {self.dtype}"


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def file_name(self) -> str:
        return f"{self.name}.mlpackage"

    def to_json(self) -> dict:
        return {
            "file": self.file_name,
            "inputs": {t.name: t.to_json() for t in self.inputs},
            "outputs": {t.name: t.to_json() for t in self.outputs},
        }


@dataclass(frozen=True)
class ModelDimensions:
    """What the contract needs to know about a model and the chosen resolution.

    `text_width` is the width of the Unet's text conditioning. The Unet of an SDXL-style model also
    takes pooled text embeddings (`pooled_width`) and size/crop conditioning (`time_ids_length`
    numbers); its text encoders have their own widths, `text_encoders[component] = (hidden, pooled)`.
    """

    text_width: int
    height: int
    width: int
    unet_batch_size: int = 2
    pooled_width: int = 0
    time_ids_length: int = 0
    text_encoders: dict[str, tuple[int, int]] = field(default_factory=dict)
    guidance_embedding_width: int = 0  # an LCM Unet's `timestep_cond` width (its time_cond_proj_dim)
    # The Unet's skip connections as (channels, downsampling factor), the mid block last: the residuals a
    # ControlNet makes and a ControlledUnet takes (empty: the package has no ControlNet).
    residuals: tuple[tuple[int, int], ...] = ()
    # An inpainting Unet's input channels: the latents, the mask and the masked image's latents (4 + 1 + 4).
    unet_in_channels: int = LATENT_CHANNELS
    # The text encoders' deepest clip skip (1: none): the layers it reads are further outputs of each encoder.
    clip_skip_layers: int = 1
    prompt_chunks: int = 1  # the Unet's text conditioning is this many 77-token chunks long (a function's)

    @property
    def latent_size(self) -> tuple[int, int]:
        return self.height // VAE_FACTOR, self.width // VAE_FACTOR

    def text_encoder_widths(self, component: str) -> tuple[int, int]:
        """(hidden, pooled) widths of a text encoder component; SD's one encoder has the Unet's width."""
        return self.text_encoders.get(component, (self.text_width, self.text_width))

    def as_dict(self) -> dict:
        """The manifest's fields for these dimensions (those an SD model does not use are left out)."""
        fields = asdict(self)
        for name in ("pooled_width", "time_ids_length", "text_encoders", "guidance_embedding_width", "residuals"):
            if not fields[name]:
                del fields[name]
        for name, default in (("unet_in_channels", LATENT_CHANNELS), ("clip_skip_layers", 1)):
            if fields[name] == default:
                del fields[name]
        del fields["prompt_chunks"]  # a function's; the package's main function takes one chunk
        if "text_encoders" in fields:
            fields["text_encoders"] = {name: list(widths) for name, widths in fields["text_encoders"].items()}
        if "residuals" in fields:
            fields["residuals"] = [list(residual) for residual in fields["residuals"]]
        return fields

    @classmethod
    def from_manifest(cls, manifest: dict) -> "ModelDimensions":
        return cls(
            text_width=manifest["text_width"],
            height=manifest["height"],
            width=manifest["width"],
            unet_batch_size=manifest["unet_batch_size"],
            pooled_width=manifest.get("pooled_width", 0),
            time_ids_length=manifest.get("time_ids_length", 0),
            text_encoders={name: tuple(widths) for name, widths in manifest.get("text_encoders", {}).items()},
            guidance_embedding_width=manifest.get("guidance_embedding_width", 0),
            residuals=tuple(tuple(residual) for residual in manifest.get("residuals", ())),
            unet_in_channels=manifest.get("unet_in_channels", LATENT_CHANNELS),
            clip_skip_layers=manifest.get("clip_skip_layers", 1),
        )


def hidden_output(layer: int) -> str:
    """The TextEncoder output holding transformers' `hidden_states[layer]` (-1: `last_hidden_state`, normed)."""
    return {-1: "last_hidden_state", -2: "hidden_embeds"}.get(layer, f"{DEEPER_HIDDEN_PREFIX}{-layer}")


def clip_skip_layer(hidden_layer: int, clip_skip: int) -> int:
    """The `hidden_states` index clip skip N reads where the family conditions with `hidden_layer`."""
    return hidden_layer - (clip_skip - 1)


def text_encoder_spec(name: str, hidden_layer: int, dims: ModelDimensions) -> ComponentSpec:
    """`input_ids` (1, 77) → the hidden states (1, 77, hidden) the family conditions with (`hidden_layer`), and
    `pooled_outputs`; then, for clip skip 2 up to `dims.clip_skip_layers`, the layers it reads."""
    hidden, pooled = dims.text_encoder_widths(name)
    skipped = [clip_skip_layer(hidden_layer, n) for n in range(2, dims.clip_skip_layers + 1)]
    return ComponentSpec(
        name,
        inputs=(TensorSpec("input_ids", (1, TEXT_LENGTH), "float32"),),
        outputs=(
            TensorSpec(hidden_output(hidden_layer), (1, TEXT_LENGTH, hidden), "float32"),
            TensorSpec("pooled_outputs", (1, pooled), "float32"),
            *(TensorSpec(hidden_output(layer), (1, TEXT_LENGTH, hidden), "float32") for layer in skipped),
        ),
    )


def unet_spec(name: str, dims: ModelDimensions) -> ComponentSpec:
    """The latents, timestep and text conditioning in the Swift package's (B, D, 1, 77) layout (77 k tokens for a
    function taking k prompt chunks), and for
    SDXL-style Unets `time_ids` (B, n) and the pooled `text_embeds` (B, P) after them; an LCM Unet converted
    with its guidance embedding takes `timestep_cond` (B, G) last (Apple's Swift package does not feed it)."""
    h, w = dims.latent_size
    b = dims.unet_batch_size
    added = ()
    if dims.time_ids_length:
        added = (TensorSpec("time_ids", (b, dims.time_ids_length), "float16"),
                 TensorSpec("text_embeds", (b, dims.pooled_width), "float16"))
    if dims.guidance_embedding_width:
        added += (TensorSpec("timestep_cond", (b, dims.guidance_embedding_width), "float16"),)
    return ComponentSpec(
        name,
        inputs=(
            TensorSpec("sample", (b, dims.unet_in_channels, h, w), "float16"),
            TensorSpec("timestep", (b,), "float16"),
            TensorSpec("encoder_hidden_states", (b, dims.text_width, 1, TEXT_LENGTH * dims.prompt_chunks), "float16"),
            *added,
        ),
        outputs=(TensorSpec("noise_pred", (b, LATENT_CHANNELS, h, w), "float32"),),
    )


def residual_layout(unet_config: dict) -> tuple[tuple[int, int], ...]:
    """`ModelDimensions.residuals` of a Unet (or ControlNet) configuration: conv_in's output, each down block's
    resnets and downsampler, the mid block."""
    channels = unet_config["block_out_channels"]
    layers = unet_config["layers_per_block"]
    layers = [layers] * len(channels) if isinstance(layers, int) else list(layers)
    residuals = [(channels[0], 1)]
    for index, (width, count) in enumerate(zip(channels, layers)):
        residuals += [(width, 2**index)] * count
        if index < len(channels) - 1:
            residuals.append((width, 2 ** (index + 1)))
    return (*residuals, (channels[-1], 2 ** (len(channels) - 1)))


def residual_specs(dims: ModelDimensions) -> tuple[TensorSpec, ...]:
    """The residuals at the Unet's batch and latent size, float32 as a ControlNet outputs them."""
    h, w = dims.latent_size
    return tuple(TensorSpec(f"{RESIDUAL_PREFIX}{index}", (dims.unet_batch_size, channels, -(-h // factor),
                                                           -(-w // factor)), "float32")
                 for index, (channels, factor) in enumerate(dims.residuals))


def controlnet_spec(name: str, dims: ModelDimensions) -> ComponentSpec:
    """Apple's ControlNet contract: the Unet's inputs and the control image at the image size, in [0, 1]; the
    residuals out (an SDXL ControlNet also takes the Unet's `time_ids` and `text_embeds`)."""
    unet = unet_spec(name, dims)
    image = TensorSpec("controlnet_cond", (dims.unet_batch_size, 3, dims.height, dims.width), "float16")
    return ComponentSpec(name, inputs=(*unet.inputs, image), outputs=residual_specs(dims))


def controlled_unet_spec(name: str, dims: ModelDimensions) -> ComponentSpec:
    """The Unet's contract with the residuals as further float16 inputs, as Apple's ControlledUnet takes them."""
    unet = unet_spec(name, dims)
    residuals = tuple(TensorSpec(t.name, t.shape, "float16") for t in residual_specs(dims))
    return ComponentSpec(name, inputs=(*unet.inputs, *residuals), outputs=unet.outputs)


def vae_decoder_spec(name: str, dims: ModelDimensions) -> ComponentSpec:
    h, w = dims.latent_size
    return ComponentSpec(
        name,
        inputs=(TensorSpec("z", (1, LATENT_CHANNELS, h, w), "float16"),),
        outputs=(TensorSpec("image", (1, 3, dims.height, dims.width), "float32"),),
    )


def vae_encoder_spec(name: str, dims: ModelDimensions) -> ComponentSpec:
    h, w = dims.latent_size
    return ComponentSpec(
        name,
        inputs=(TensorSpec("x", (1, 3, dims.height, dims.width), "float16"),),
        outputs=(TensorSpec("latent", (1, 2 * LATENT_CHANNELS, h, w), "float32"),),
    )


def safety_checker_spec(name: str, dims: ModelDimensions) -> ComponentSpec:
    """Apple's contract: float16 inputs (`images` in [0, 1], channels last, as decoded), float32 outputs;
    `has_nsfw_concepts` is 1.0 for a flagged image, which `filtered_images` then holds as zeros."""
    images = (1, dims.height, dims.width, 3)
    return ComponentSpec(
        name,
        inputs=(
            TensorSpec("clip_input", (1, 3, CLIP_IMAGE_SIZE, CLIP_IMAGE_SIZE), "float16"),
            TensorSpec("images", images, "float16"),
            TensorSpec("adjustment", (1,), "float16"),
        ),
        outputs=(
            TensorSpec("filtered_images", images, "float32"),
            TensorSpec("has_nsfw_concepts", (1, 1, 1, 1), "float32"),
            TensorSpec("concept_scores", (1, SAFETY_CONCEPTS), "float32"),
        ),
    )


CHUNK_INTERMEDIATE = "intermediate activation between the chunks"


def chunk_contract_problems(whole: ComponentSpec, first: ComponentSpec, second: ComponentSpec) -> list[str]:
    """How two chunks break the Swift package's chaining of a split model (none: they follow it).

    The Swift package runs chunk 1 on the model's inputs and chunk 2 on chunk 1's outputs merged with the same
    inputs (an output of chunk 1 wins over an input of that name), and reads the first output of chunk 2; it
    reads the shapes of `sample` and `time_ids` from chunk 1. So: chunk 1 takes the model's inputs, as the whole
    model declares them; its outputs are float32 and do not shadow an input; chunk 2 takes only chunk 1's outputs
    and the model's inputs, as declared; and chunk 2's outputs are the model's."""
    inputs = {t.name: t for t in whole.inputs}
    passed = {t.name: t for t in first.outputs}
    problems = [] if first.inputs == whole.inputs else [
        f"{first.name} takes {[t.name for t in first.inputs]}, not {whole.name}'s inputs {list(inputs)}"]
    problems += [f"{first.name} output {t.name} shadows {whole.name}'s input" for t in first.outputs
                 if t.name in inputs]
    problems += [f"{first.name} output {t.name} is {t.dtype}, not float32" for t in first.outputs
                 if t.dtype != "float32"]
    problems += [f"{second.name} takes {t.name} {t.shape} {t.dtype}, neither an input of {whole.name} nor an output "
                 f"of {first.name}" for t in second.inputs if inputs.get(t.name, passed.get(t.name)) != t]
    if second.outputs != whole.outputs:
        problems.append(f"{second.name} outputs {[t.name for t in second.outputs]}, not {whole.name}'s "
                        f"{[t.name for t in whole.outputs]}")
    return problems


@dataclass(frozen=True)
class FamilyContract:
    """What a family's packages hold and, for packages without a manifest, the settings that apply.

    `force_zeros_for_empty_prompt` is diffusers' pipeline setting: an empty negative prompt conditions on zeros
    rather than on the encoded empty string (None: the family's pipeline has no such setting, which is False).
    """

    name: str
    text_encoders: tuple[str, ...]
    unet: str
    scheduler_config: dict
    latent_scaling_factor: float
    force_zeros_for_empty_prompt: bool | None = None
    prediction_type: str = "epsilon"
    # the text encoders' hidden states that condition the Unet: -1 the last layer's after the final layer norm,
    # -2 the penultimate layer's, without it (transformers' hidden_states index)
    hidden_layer: int = -1

    @property
    def required_components(self) -> tuple[str, ...]:
        """What generating needs: the text encoders, the Unet and the decoder."""
        return (*self.text_encoders, self.unet, VAE_DECODER)


# SD v1.4's scheduler, for bundles that carry no manifest (Apple's published SD v1 bundles).
SD_V1_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
}
# stabilityai's SDXL 1.0 scheduler, for Apple's XL bundles, which carry no manifest.
SDXL_SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "interpolation_type": "linear",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "use_karras_sigmas": False,
}
SD = FamilyContract("sd", (TEXT_ENCODER,), UNET, SD_V1_SCHEDULER_CONFIG, latent_scaling_factor=0.18215)
SDXL = FamilyContract("sdxl", (TEXT_ENCODER, TEXT_ENCODER_2), UNET, SDXL_SCHEDULER_CONFIG,
                      latent_scaling_factor=0.13025, force_zeros_for_empty_prompt=True, hidden_layer=-2)
SDXL_REFINER = FamilyContract("sdxl-refiner", (TEXT_ENCODER_2,), UNET_REFINER, SDXL_SCHEDULER_CONFIG,
                              latent_scaling_factor=0.13025, force_zeros_for_empty_prompt=False, hidden_layer=-2)
FAMILY_CONTRACTS = {family.name: family for family in (SD, SDXL, SDXL_REFINER)}
