"""The Unet inputs the mixed-bit analysis measures on: what the Unet sees when the model samples a few generic prompts.

Each prompt is encoded by the model's own text encoders (tokenized with its own vocabulary, the negative prompt empty,
SDXL's size conditioning as the runtime makes it), and a short DDIM trajectory from seeded noise is sampled with
classifier-free guidance by the unquantized Unet; the Unet's input at each of its steps (noise levels from the start
of the schedule to near its end) is one recorded call, at batch 2 (negative, positive) as the package runs it."""
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDIMScheduler
from transformers import CLIPTokenizer

from coreml_sd.runtime.contract import TEXT_ENCODER_2, TEXT_LENGTH, VAE_FACTOR
from coreml_sd.runtime.sampling import guidance_scale_embedding

from ..errors import ConversionError
from ..sources import ModelSource

PROMPTS = ("a photograph of a dog sitting on a wooden porch", "a city street at night in the rain, neon signs",
           "a bowl of fruit on a kitchen table, oil painting", "portrait of an old man with a beard, studio light")
STEPS = 3
GUIDANCE_SCALE = 7.5  # the runtime's default
AESTHETIC_SCORES = (2.5, 6.0)  # the SDXL refiner's negative and positive, diffusers' defaults


@dataclass
class UnetCall:
    """One recorded input of diffusers' UNet2DConditionModel."""

    sample: torch.Tensor
    timestep: torch.Tensor
    context: torch.Tensor
    added: dict | None = None
    timestep_cond: torch.Tensor | None = None  # an LCM Unet's guidance embedding

    def __call__(self, unet: torch.nn.Module) -> torch.Tensor:
        return unet(self.sample, self.timestep, self.context, timestep_cond=self.timestep_cond,
                    added_cond_kwargs=self.added).sample


def text_conditioning(source: ModelSource, prompts: tuple[str, ...]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Per prompt: (hidden states of (negative, positive), their pooled outputs or None), from the model's own text
    encoders, as the runtime conditions the Unet."""
    contract = source.family.contract
    missing = [name for name in contract.text_encoders if source.family.component(name).module in source.absent_modules]
    if missing:
        raise ConversionError(f"--mixed-bit-analysis encodes prompts with the model's text encoders, and {source.name} "
                              f"holds no weights for {', '.join(missing)}: use a model that has them")
    with tempfile.TemporaryDirectory() as folder:
        source.write_tokenizer_files(Path(folder))
        tokenizers = {name: CLIPTokenizer(str(Path(folder) / "vocab.json"), str(Path(folder) / "merges.txt"),
                                          model_max_length=TEXT_LENGTH,
                                          pad_token="!" if name == TEXT_ENCODER_2 else source.pad_token)
                      for name in contract.text_encoders}
    texts = [text for prompt in prompts for text in ("", prompt)]
    hidden, pooled = [], None
    for name in contract.text_encoders:
        component = source.family.component(name)
        encoder = getattr(source.load(name, torch.float32), component.module)
        ids = tokenizers[name](texts, padding="max_length", max_length=TEXT_LENGTH, truncation=True,
                               return_tensors="pt").input_ids
        with torch.no_grad():
            output = encoder(ids, output_hidden_states=True)
        hidden.append(output.last_hidden_state if component.hidden_layer == -1
                      else output.hidden_states[component.hidden_layer])
        if component.projected:
            pooled = output.text_embeds
        del encoder
    states = torch.cat(hidden, dim=-1)
    if source.force_zeros_for_empty_prompt:  # SDXL: an empty negative prompt conditions on zeros
        states[0::2] = 0
        pooled[0::2] = 0
    return [(states[2 * i: 2 * i + 2], None if pooled is None else pooled[2 * i: 2 * i + 2])
            for i in range(len(prompts))]


def time_ids(source: ModelSource, height: int, width: int) -> torch.Tensor:
    """SDXL's size conditioning of (negative, positive): original size, crop top-left, then target size (base) or
    aesthetic score (refiner)."""
    if source.conditioning.get("time_ids_length") == 5:
        return torch.tensor([[height, width, 0, 0, score] for score in AESTHETIC_SCORES], dtype=torch.float32)
    return torch.tensor([[height, width, 0, 0, height, width]] * 2, dtype=torch.float32)


@torch.no_grad()
def record_unet_calls(source: ModelSource, unet: torch.nn.Module, height: int | None = None,
                      width: int | None = None, prompts: tuple[str, ...] = PROMPTS, steps: int = STEPS,
                      seed: int = 0) -> list[UnetCall]:
    """The Unet's inputs over `steps`-step guided DDIM trajectories of `prompts` at the given size (default: the
    model's), sampled by `unet` (diffusers' module, unquantized)."""
    height = height or source.sample_size * VAE_FACTOR
    width = width or source.sample_size * VAE_FACTOR
    scheduler = DDIMScheduler.from_config(source.scheduler_config, prediction_type=source.prediction_type)
    scheduler.set_timesteps(steps)
    in_channels = unet.config.in_channels
    generator = torch.Generator().manual_seed(seed)
    width_of_guidance = source.conditioning.get("guidance_embedding_width")
    timestep_cond = (torch.from_numpy(guidance_scale_embedding(GUIDANCE_SCALE - 1, width_of_guidance)).repeat(2, 1)
                     if width_of_guidance else None)
    calls = []
    for context, pooled in text_conditioning(source, prompts):
        added = {"text_embeds": pooled, "time_ids": time_ids(source, height, width)} if pooled is not None else None
        latents = torch.randn((1, 4, height // VAE_FACTOR, width // VAE_FACTOR), generator=generator)
        latents = latents * scheduler.init_noise_sigma
        for timestep in scheduler.timesteps:
            sample = scheduler.scale_model_input(torch.cat([latents] * 2), timestep)
            if in_channels > sample.shape[1]:  # an inpainting Unet: all of the picture masked, nothing kept
                extra = torch.zeros(2, in_channels - sample.shape[1], *sample.shape[2:])
                extra[:, 0] = 1
                sample = torch.cat([sample, extra], dim=1)
            call = UnetCall(sample, torch.full((2,), int(timestep)), context, added, timestep_cond)
            calls.append(call)
            negative, positive = call(unet).chunk(2)
            guided = negative + GUIDANCE_SCALE * (positive - negative)
            latents = scheduler.step(guided, timestep, latents).prev_sample
    return calls
