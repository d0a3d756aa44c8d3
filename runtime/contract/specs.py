"""Each component's spec, from the model's dimensions and the chosen resolution.

`ModelDimensions` is what the contract needs to know of a model (text widths, image size, batch, SDXL's extra
conditioning, the ControlNet residuals' layout); from it the text encoders', Unet's, ControlNet's, ControlledUnet's,
VAE's and safety checker's inputs and outputs follow, and the rule two chunks of a split Unet must keep.
"""
from dataclasses import asdict, dataclass, field

from .names import CLIP_IMAGE_SIZE, LATENT_CHANNELS, SAFETY_CONCEPTS, TEXT_LENGTH, VAE_FACTOR
from .tensors import DEEPER_HIDDEN_PREFIX, RESIDUAL_PREFIX, ComponentSpec, TensorSpec


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
