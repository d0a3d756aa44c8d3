"""The package contract's tensors and components: what each input and output is.

Each tensor's meaning and layout (the description Xcode shows beside its name), the ControlNet residuals' names, the
short summary of each kind of component, and the specs themselves: a `TensorSpec` (name, shape, dtype) and a
`ComponentSpec` (a component's inputs and outputs), as the manifest writes them.
"""
from dataclasses import dataclass

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


# How a chunk's intermediate values (which have no meaning of their own) are described.
CHUNK_INTERMEDIATE = "intermediate activation between the chunks"


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
