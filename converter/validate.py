"""Check a converted component against its diffusers original, through the reference executor.

The reference is the original diffusers/transformers module in float32 (not the Neural Engine
rewrite), so one figure covers both the rewrite and the conversion. The two models run one after
the other, each released before the next is loaded, so validation never holds both.
"""
from pathlib import Path

import numpy as np
import torch

from .components import ComponentSpec
from .memory import release_memory
from .palettize import palettize_parts
from .sources import ModelParts

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
        else:
            value = rng.randn(*tensor.shape)
        inputs[tensor.name] = value.astype(tensor.dtype)
    return inputs


@torch.no_grad()
def reference_outputs(parts: ModelParts, component: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The original modules' outputs in float32, for the contract's inputs."""
    x = {name: torch.from_numpy(value.astype(np.float32)) for name, value in inputs.items()}
    if component == "TextEncoder":
        output = parts.text_encoder(x["input_ids"].long())
        result = {"last_hidden_state": output.last_hidden_state, "pooled_outputs": output.pooler_output}
    elif component == "Unet":
        context = x["encoder_hidden_states"][:, :, 0, :].transpose(1, 2)
        result = {"noise_pred": parts.unet(x["sample"], x["timestep"], context).sample}
    elif component == "VAEDecoder":
        result = {"image": parts.vae.decode(x["z"]).sample}
    elif component == "VAEEncoder":
        result = {"latent": parts.vae.quant_conv(parts.vae.encoder(x["x"]))}
    else:
        raise ValueError(f"no reference for component {component!r}")
    return {name: value.numpy() for name, value in result.items()}


def validate(package: Path, component: str, spec: ComponentSpec, load_reference, seed: int,
             latent_scaling_factor: float, quantize_nbits: int | None = None) -> dict:
    """PSNR (worst output) and max abs error of the package against the original; `load_reference()`
    returns the float32 ModelParts and is called only when needed, so nothing else is held then.

    A palettized package is compared with the original carrying the same palettes (its float32
    weights palettized as the converter palettized the float16 ones), which isolates the conversion;
    its PSNR against the unquantized original is reported as `unquantized_psnr_db`."""
    from coreml_sd.runtime.executor import ReferenceModel

    inputs = validation_inputs(spec, seed, latent_scaling_factor)
    parts = load_reference()
    expected = reference_outputs(parts, component, inputs)
    unquantized = None
    if quantize_nbits:
        unquantized = expected
        palettize_parts(parts, quantize_nbits)
        expected = reference_outputs(parts, component, inputs)
    del parts
    release_memory()
    model = ReferenceModel(package)
    actual = model.predict(inputs)
    del model
    release_memory()
    result = {
        "psnr_db": worst_psnr(expected, actual),
        "max_abs_error": float(max(np.abs(expected[name] - actual[name].astype(np.float32)).max() for name in expected)),
        "seed": seed,
    }
    if unquantized is not None:
        result.update(quantize_nbits=quantize_nbits, unquantized_psnr_db=worst_psnr(unquantized, actual))
    return result


def worst_psnr(expected: dict[str, np.ndarray], actual: dict[str, np.ndarray]) -> float:
    from coreml_sd.runtime.executor import psnr

    return round(min(psnr(expected[name], actual[name]) for name in expected), 2)
