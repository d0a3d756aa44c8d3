"""Check a converted component against its diffusers original, through the reference executor.

The reference is the original diffusers/transformers module in float32 (not the Neural Engine
rewrite), so one figure covers both the rewrite and the conversion. The two models run one after
the other, each released before the next is loaded, so validation never holds both: the package first (while
the least is held), then the reference, which hands each layer's file-mapped weights back after the layer runs
(`paging`), so that it holds about one layer of its float32 weights, not all of them.
"""
from pathlib import Path

import numpy as np
import torch
from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance

from coreml_sd.runtime.contract import RESIDUAL_PREFIX, ComponentSpec, clip_skip_layer
from coreml_sd.runtime.executor import ReferenceModel, psnr
from coreml_sd.runtime.memory import map_large_allocations, release_memory

from ..chunks import chunked_reference_model
from ..compression import LinearQuantization
from ..compression.linear import quantize_parts
from ..compression.palettize import palettize_parts
from ..compression.recipe import Recipe, apply_recipe
from ..families import Component
from ..sources import ModelParts
from .paging import page_out_after_use

PSNR_THRESHOLD_DB = 35.0
TOKEN_RANGE = 49406  # ordinary CLIP tokens; 49406 and 49407 are start and end of text


def validation_inputs(spec: ComponentSpec, seed: int, latent_scaling_factor: float) -> dict[str, np.ndarray]:
    """Random inputs in the ranges the runtime feeds each component."""
    rng = np.random.RandomState(seed)
    inputs = {}
    for tensor in spec.inputs:
        if tensor.name == "input_ids":
            length = rng.randint(3, tensor.shape[1] - 1)
            ids = np.full(tensor.shape, 49407)
            ids[0, 0] = 49406
            ids[0, 1:length] = rng.randint(0, TOKEN_RANGE, size=length - 1)
            value = ids
        elif tensor.name == "timestep":
            value = rng.randint(0, 1000, size=tensor.shape)
        elif tensor.name == "z":
            value = rng.randn(*tensor.shape) / latent_scaling_factor
        elif tensor.name == "x":
            value = rng.uniform(-1, 1, size=tensor.shape)
        elif tensor.name == "time_ids":
            value = random_time_ids(rng, tensor.shape)
        elif tensor.name in ("images", "controlnet_cond"):
            value = rng.uniform(0, 1, size=tensor.shape)
        elif tensor.name == "adjustment":
            value = np.zeros(tensor.shape)
        else:
            value = rng.randn(*tensor.shape)
        inputs[tensor.name] = value.astype(tensor.dtype)
    return inputs


def random_time_ids(rng: np.random.RandomState, shape: tuple[int, int]) -> np.ndarray:
    """SDXL's size conditioning as the runtime makes it: original size, crop top-left, then the target size
    (base, 6 numbers) or an aesthetic score (refiner, 5), for each batch row."""
    batch, length = shape
    sizes = rng.randint(32, 257, size=(batch, 4)) * 8
    crops = rng.randint(0, 33, size=(batch, 2)) * 8
    if length == 6:
        return np.concatenate([sizes[:, :2], crops, sizes[:, 2:]], axis=1)
    return np.concatenate([sizes[:, :2], crops, rng.uniform(1, 10, size=(batch, 1))], axis=1)


@torch.no_grad()
def reference_outputs(parts: ModelParts, component: Component, spec: ComponentSpec,
                      inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The original modules' outputs in float32, for the contract's inputs."""
    x = {name: torch.from_numpy(value.astype(np.float32)) for name, value in inputs.items()}
    module = getattr(parts, component.module)
    if component.kind == "safety_checker":  # the scores decide; the flag and the filtered images follow from them
        return {"concept_scores": safety_concept_scores(module, x["clip_input"], x["adjustment"]).numpy()}
    if component.kind == "text_encoder":
        output = module(x["input_ids"].long(), output_hidden_states=True)
        hidden = (output.last_hidden_state if component.hidden_layer == -1
                  else output.hidden_states[component.hidden_layer])
        pooled = output.text_embeds if component.projected else output.pooler_output
        # the outputs after the pooled one: the layers of clip skip 2, 3, ...
        skipped = [output.hidden_states[clip_skip_layer(component.hidden_layer, n)]
                   for n in range(2, len(spec.outputs))]
        values = (hidden, pooled, *skipped)
    elif component.kind in ("unet", "controlled_unet", "controlnet"):
        context = x["encoder_hidden_states"][:, :, 0, :].transpose(1, 2)
        added = {"time_ids": x["time_ids"], "text_embeds": x["text_embeds"]} if "time_ids" in x else None
        if component.kind == "controlnet":
            down, mid = module(x["sample"], x["timestep"], context, x["controlnet_cond"], added_cond_kwargs=added,
                               return_dict=False)
            values = (*down, mid)
        else:
            residuals = [x[t.name] for t in spec.inputs if t.name.startswith(RESIDUAL_PREFIX)]
            controlled = {"down_block_additional_residuals": tuple(residuals[:-1]),
                          "mid_block_additional_residual": residuals[-1]} if residuals else {}
            values = (module(x["sample"], x["timestep"], context, timestep_cond=x.get("timestep_cond"),
                             added_cond_kwargs=added, **controlled).sample,)
    elif component.kind == "vae_decoder":
        values = (module.decode(x["z"]).sample,)
    else:
        values = (module.quant_conv(module.encoder(x["x"])),)
    return {tensor.name: value.numpy() for tensor, value in zip(spec.outputs, values)}


def safety_concept_scores(checker: torch.nn.Module, clip_input: torch.Tensor, adjustment: torch.Tensor) -> torch.Tensor:
    """diffusers' concept scores (its `forward_onnx` math, with diffusers' `cosine_distance`), `adjustment` on
    the special-care scores as Apple's contract has it."""
    image_embeds = checker.visual_projection(checker.vision_model(clip_input)[1])
    special_scores = (cosine_distance(image_embeds, checker.special_care_embeds) - checker.special_care_embeds_weights
                      + adjustment)
    special_care = torch.any(special_scores > 0, dim=1, keepdim=True)
    return cosine_distance(image_embeds, checker.concept_embeds) - checker.concept_embeds_weights + special_care * 0.01


def validate(package: Path | tuple[Path, ...], component: Component, spec: ComponentSpec, load_reference, seed: int,
             latent_scaling_factor: float, quantize_nbits: int | None = None, recipe: Recipe | None = None,
             group: int | None = None, linear: LinearQuantization | None = None,
             function_name: str | None = None) -> dict:
    """PSNR (worst output) and max abs error of the package against the original; `load_reference()`
    returns the float32 ModelParts and is called once the package has run and been released.

    A palettized package is compared with the original carrying the same palettes (its float32
    weights palettized as the converter palettized the float16 ones), which isolates the conversion;
    its PSNR against the unquantized original is reported as `unquantized_psnr_db`. So is a Unet palettized with a
    `recipe` (its layers each at their own bits), or with palettes per `group` output channels, or `linear`
    integers. A chunked model (a tuple
    of packages) runs chunk after chunk, as the Swift package runs it. Of a multifunction package, the function
    `function_name` runs (its default one when None), on inputs of its `spec`."""

    map_large_allocations()
    inputs = validation_inputs(spec, seed, latent_scaling_factor)
    model = (chunked_reference_model(package) if isinstance(package, tuple)
             else ReferenceModel(package, function_name=function_name))
    actual = model.predict(inputs)
    del model
    release_memory()
    parts = load_reference()
    page_out_after_use(getattr(parts, component.module))
    expected = reference_outputs(parts, component, spec, inputs)
    unquantized = None
    if quantize_nbits or recipe or linear:
        unquantized = expected
        if quantize_nbits:
            palettize_parts(parts, quantize_nbits, group)
        elif linear:
            quantize_parts(parts, linear)
        else:
            apply_recipe(getattr(parts, component.module), recipe)
        expected = reference_outputs(parts, component, spec, inputs)
    del parts
    release_memory()
    non_finite = [name for name in expected if not np.isfinite(actual[name]).all()]
    result = {
        "non_finite_outputs": non_finite,  # an overflow of the package's float16 activations
        "psnr_db": worst_psnr(expected, actual) if not non_finite else float("nan"),
        "max_abs_error": float(max(np.abs(expected[name] - actual[name].astype(np.float32)).max()
                                   for name in expected)),
        "seed": seed,
    }
    if unquantized is not None:
        if quantize_nbits:
            result.update(quantize_nbits=quantize_nbits, **({"quantize_group": group} if group else {}))
        elif linear:
            result.update(quantize_linear=linear.settings())
        else:
            result.update(quantize_recipe=recipe.name)
        result.update(unquantized_psnr_db=worst_psnr(unquantized, actual))
    return result


def worst_psnr(expected: dict[str, np.ndarray], actual: dict[str, np.ndarray]) -> float:
    return round(min(psnr(expected[name], actual[name]) for name in expected), 2)
