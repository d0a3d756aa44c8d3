#!/usr/bin/env python3
"""Train the embedded `demo` model on synthetic captioned pictures of coloured shapes, on the CPU.

    .venv/bin/python scripts/train_demo_model.py --work-dir build/demo-training --output converter/data/demo

(coreml-sd installed, as in the .venv that scripts/demo and scripts/test make.)

Three phases, each resumable from `work-dir/checkpoint.pt` (rerun the same command after an interruption):
1. the AutoencoderKL learns to reconstruct the pictures (L1 on pixels and on their gradients, so that edges stay
   sharp, L1 on 8x8 block means, so that flat colours come back as they were, and a small KL term);
2. the frozen encoder turns a pool of pictures into latents, and the UNet2DConditionModel and the CLIPTextModel
   learn together to predict the velocity of the noising (SD v1's betas rescaled to a zero terminal SNR,
   v-prediction), with 10% empty captions so that classifier-free guidance works; the weights shipped are an
   exponential moving average;
3. the decoder learns on for --decoder-steps on the frozen encoder's latents (the denoiser's latent space stays
   put). Phases 2 and 3 depend only on phase 1's result, not on each other.

Every picture, caption, noise draw and initial weight follows from --seed: a rerun gives the same weights.
Losses go to stdout and work-dir/losses.jsonl; sample grids to work-dir/samples/.
"""
import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from PIL import Image
from safetensors.torch import save_file

from coreml_sd.converter.models.demo import (
    IMAGE_SIZE,
    SCALING_FACTOR_KEY,
    SCHEDULER_CONFIG,
    WEIGHT_FILES,
    build_modules,
    build_scheduler,
)
from coreml_sd.converter.models.demo_data import SAMPLE_PROMPTS, ShapePicture, caption, draw, random_picture
from coreml_sd.converter.models.tiny import assemble_pipeline, build_tokenizer

VAE_PHASE, UNET_PHASE, DECODER_PHASE = "vae", "unet", "decoder"
PHASES = (VAE_PHASE, UNET_PHASE, DECODER_PHASE)
# Independent random streams, so that each phase's data depends only on (seed, stream, step).
STREAMS = {"vae": 0, "pool": 1, "captions": 2, "held-out": 3, "decoder": 4}
SHAPE_WEIGHT = 5.0  # the shape covers a few percent of a picture; its colour matters more than that
INITIAL_LOG_VARIANCE = -8.0  # the encoder starts nearly deterministic, so that the decoder sees sharp latents


def picture_batch(seed: int, stream: str, step: int, size: int) -> tuple[torch.Tensor, list[ShapePicture]]:
    """`size` random pictures in [-1, 1], (B, 3, H, W), the same for the same (seed, stream, step)."""
    rng = np.random.default_rng([seed, STREAMS[stream], step])
    pictures = [random_picture(rng) for _ in range(size)]
    pixels = np.stack([draw(picture, IMAGE_SIZE) for picture in pictures])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1, pictures


def image_gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., 1:, :] - x[..., :-1, :], x[..., :, 1:] - x[..., :, :-1]


def shape_weights(x: torch.Tensor) -> torch.Tensor:
    """Per pixel, 1 on the background and SHAPE_WEIGHT on the shape (pixels unlike the top-left corner's)."""
    shape = (x - x[..., :1, :1]).abs().amax(dim=1, keepdim=True) > 0.2
    return 1 + (SHAPE_WEIGHT - 1) * shape.float()


def reconstruction_loss(reconstruction: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    pixel = (shape_weights(x) * (reconstruction - x).abs()).mean()
    edges = sum(F.l1_loss(r, o) for r, o in zip(image_gradients(reconstruction), image_gradients(x)))
    colour = F.l1_loss(F.avg_pool2d(reconstruction, 8), F.avg_pool2d(x, 8))
    return pixel + edges + colour, {"l1": pixel.item(), "edges": edges.item(), "colour": colour.item()}


def vae_loss(vae, x: torch.Tensor, kl_weight: float) -> tuple[torch.Tensor, dict]:
    posterior = vae.encode(x).latent_dist
    loss, parts = reconstruction_loss(vae.decode(posterior.sample()).sample, x)
    kl = posterior.kl().mean()
    return loss + kl_weight * kl, {**parts, "kl": kl.item()}


def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


class Trainer:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.work_dir = Path(args.work_dir)
        (self.work_dir / "samples").mkdir(parents=True, exist_ok=True)
        self.checkpoint_path = self.work_dir / "checkpoint.pt"
        self.log_path = self.work_dir / "losses.jsonl"
        torch.manual_seed(args.seed)
        self.unet, self.vae, self.text_encoder = build_modules()
        with torch.no_grad():  # quant_conv's second half of channels is the posterior's log-variance
            self.vae.quant_conv.bias[self.vae.config.latent_channels:] = INITIAL_LOG_VARIANCE
        self.ema_unet, self.ema_text_encoder = copy.deepcopy(self.unet), copy.deepcopy(self.text_encoder)
        self.tokenizer = build_tokenizer()
        self.token_cache: dict[str, list[int]] = {}
        self.vae_optimizer = torch.optim.AdamW(self.vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
        self.unet_optimizer = torch.optim.AdamW(
            [*self.unet.parameters(), *self.text_encoder.parameters()], lr=args.unet_lr, weight_decay=0.01)
        self.state = {"phase": VAE_PHASE, "step": 0, "seconds": dict.fromkeys(PHASES, 0.0),
                      "scaling_factor": None}
        self.pool = None  # (mean, std) of the encoded pool of pictures, and the pictures
        self.schedule = DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k in (
            "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "rescale_betas_zero_snr")})

    # -- checkpoints ---------------------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        modules = {name: getattr(self, name).state_dict() for name in
                   ("unet", "vae", "text_encoder", "ema_unet", "ema_text_encoder")}
        optimizers = {"vae": self.vae_optimizer.state_dict(), "unet": self.unet_optimizer.state_dict()}
        temporary = self.checkpoint_path.with_suffix(".tmp")
        torch.save({"state": self.state, "modules": modules, "optimizers": optimizers}, temporary)
        temporary.replace(self.checkpoint_path)

    def load_checkpoint(self) -> None:
        if not self.checkpoint_path.is_file():
            return
        checkpoint = torch.load(self.checkpoint_path, weights_only=False)
        for name, state in checkpoint["modules"].items():
            getattr(self, name).load_state_dict(state)
        self.vae_optimizer.load_state_dict(checkpoint["optimizers"]["vae"])
        self.unet_optimizer.load_state_dict(checkpoint["optimizers"]["unet"])
        self.state = checkpoint["state"]
        print(f"resumed at {self.state['phase']} step {self.state['step']}", flush=True)

    def log(self, record: dict) -> None:
        with self.log_path.open("a") as stream:
            stream.write(json.dumps(record) + "\n")
        values = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items())
        print(values, flush=True)

    # -- phase 1: the autoencoder ---------------------------------------------------------------------------
    def train_vae(self) -> None:
        args = self.args
        self.vae.train()
        started = time.perf_counter() - self.state["seconds"][VAE_PHASE]
        while self.state["step"] < args.vae_steps:
            step = self.state["step"]
            for group in self.vae_optimizer.param_groups:
                group["lr"] = learning_rate(step, args.vae_steps, args.vae_lr, warmup=50)
            x, _ = picture_batch(args.seed, VAE_PHASE, step, args.vae_batch)
            torch.manual_seed(args.seed * 100_003 + step)  # the posterior's sample
            loss, parts = vae_loss(self.vae, x, args.kl_weight)
            self.vae_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.vae.parameters(), 1.0)
            self.vae_optimizer.step()
            self.state["step"] = step + 1
            self.state["seconds"][VAE_PHASE] = time.perf_counter() - started
            if step % 50 == 0 or step + 1 == args.vae_steps:
                self.log({"phase": VAE_PHASE, "step": step, "loss": loss.item(), **parts,
                          "seconds": round(self.state["seconds"][VAE_PHASE])})
            if (step + 1) % args.sample_every == 0 or step + 1 == args.vae_steps:
                self.reconstruction_grid(f"vae-{step + 1:05d}.png")
                self.save_checkpoint()
        self.vae.eval()

    @torch.no_grad()
    def reconstruction_grid(self, name: str) -> None:
        """Top row: held-out pictures; bottom row: the autoencoder's reconstructions."""
        was_training = self.vae.training
        self.vae.eval()
        x, _ = picture_batch(self.args.seed, "held-out", 0, 12)
        reconstruction = self.vae.decode(self.vae.encode(x).latent_dist.mode()).sample
        save_grid(torch.cat([x, reconstruction]), rows=2, path=self.work_dir / "samples" / name)
        self.vae.train(was_training)

    # -- phase 2: the denoiser and the text encoder ---------------------------------------------------------
    @torch.no_grad()
    def encode_pool(self) -> None:
        pool_path = self.work_dir / "pool.pt"
        if pool_path.is_file():
            self.pool = torch.load(pool_path, weights_only=False)
        else:
            means, stds, pictures = [], [], []
            for chunk in range(self.args.pool_size // 256):
                x, chunk_pictures = picture_batch(self.args.seed, "pool", chunk, 256)
                latent = self.vae.encode(x).latent_dist
                means.append(latent.mean)
                stds.append(latent.std)
                pictures += chunk_pictures
            self.pool = {"mean": torch.cat(means), "std": torch.cat(stds), "pictures": pictures}
            torch.save(self.pool, pool_path)
        if self.state["scaling_factor"] is None:
            generator = torch.Generator().manual_seed(self.args.seed)
            sample = self.pool["mean"] + self.pool["std"] * torch.randn(self.pool["mean"].shape, generator=generator)
            self.state["scaling_factor"] = round(1.0 / sample.std().item(), 5)
        print(f"latent scaling factor {self.state['scaling_factor']}", flush=True)

    def tokens(self, captions: list[str]) -> torch.Tensor:
        for text in captions:
            if text not in self.token_cache:
                self.token_cache[text] = self.tokenizer(text, padding="max_length", max_length=77,
                                                        truncation=True).input_ids
        return torch.tensor([self.token_cache[text] for text in captions])

    def train_unet(self) -> None:
        args = self.args
        self.encode_pool()
        self.vae.eval().requires_grad_(False)
        self.unet.train()
        self.text_encoder.train()
        parameters = [*self.unet.parameters(), *self.text_encoder.parameters()]
        scaling = self.state["scaling_factor"]
        started = time.perf_counter() - self.state["seconds"][UNET_PHASE]
        count = len(self.pool["pictures"])
        while self.state["step"] < args.unet_steps:
            step = self.state["step"]
            lr = learning_rate(step, args.unet_steps, args.unet_lr, warmup=200)
            for group in self.unet_optimizer.param_groups:
                group["lr"] = lr
            rng = np.random.default_rng([args.seed, STREAMS["captions"], step])
            indices = rng.integers(0, count, args.unet_batch)
            captions = [caption(self.pool["pictures"][i], rng) for i in indices]
            generator = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
            mean, std = self.pool["mean"][indices], self.pool["std"][indices]
            latents = (mean + std * torch.randn(mean.shape, generator=generator)) * scaling
            noise = torch.randn(latents.shape, generator=generator)
            timesteps = torch.randint(0, self.schedule.config.num_train_timesteps, (len(indices),), generator=generator)
            noisy = self.schedule.add_noise(latents, noise, timesteps)
            hidden = self.text_encoder(self.tokens(captions)).last_hidden_state
            prediction = self.unet(noisy, timesteps, hidden).sample
            # The plain v loss weighs a step's error in the picture by SNR + 1: never less than 1, so the noisiest
            # steps, where only the prompt can tell what to draw, count as much as any.
            loss = F.mse_loss(prediction, self.schedule.get_velocity(latents, noise, timesteps))
            self.unet_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            self.unet_optimizer.step()
            self.update_ema(step)
            self.state["step"] = step + 1
            self.state["seconds"][UNET_PHASE] = time.perf_counter() - started
            if step % 50 == 0 or step + 1 == args.unet_steps:
                self.log({"phase": UNET_PHASE, "step": step, "loss": loss.item(), "lr": lr,
                          "seconds": round(self.state["seconds"][UNET_PHASE])})
            if (step + 1) % args.sample_every == 0 or step + 1 == args.unet_steps:
                self.sample_grid(f"unet-{step + 1:05d}.png")
                self.save_checkpoint()

    def train_decoder(self) -> None:
        """The decoder learns on on the frozen encoder's latents (the denoiser's latent space stays put)."""
        args = self.args
        self.vae.eval().requires_grad_(False)
        decoder = [*self.vae.post_quant_conv.parameters(), *self.vae.decoder.parameters()]
        for parameter in decoder:
            parameter.requires_grad_(True)
        started = time.perf_counter() - self.state["seconds"][DECODER_PHASE]
        while self.state["step"] < args.decoder_steps:
            step = self.state["step"]
            for group in self.vae_optimizer.param_groups:
                group["lr"] = learning_rate(step, args.decoder_steps, args.vae_lr / 2, warmup=1)
            x, _ = picture_batch(args.seed, "decoder", step, args.vae_batch)
            with torch.no_grad():
                posterior = self.vae.encode(x).latent_dist
                generator = torch.Generator().manual_seed(args.seed * 100_019 + step)
                z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
            loss, parts = reconstruction_loss(self.vae.decode(z).sample, x)
            self.vae_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(decoder, 1.0)
            self.vae_optimizer.step()
            self.state["step"] = step + 1
            self.state["seconds"][DECODER_PHASE] = time.perf_counter() - started
            if step % 50 == 0 or step + 1 == args.decoder_steps:
                self.log({"phase": DECODER_PHASE, "step": step, "loss": loss.item(), **parts,
                          "seconds": round(self.state["seconds"][DECODER_PHASE])})
            if (step + 1) % args.sample_every == 0 or step + 1 == args.decoder_steps:
                self.reconstruction_grid(f"decoder-{step + 1:05d}.png")
                self.save_checkpoint()
        self.vae.eval()

    @torch.no_grad()
    def update_ema(self, step: int) -> None:
        decay = min(self.args.ema_decay, (1 + step) / (10 + step))
        for ema, live in ((self.ema_unet, self.unet), (self.ema_text_encoder, self.text_encoder)):
            for averaged, current in zip(ema.parameters(), live.parameters()):
                averaged.lerp_(current, 1 - decay)

    def demo_pipeline(self):
        vae = copy.deepcopy(self.vae)
        vae.register_to_config(scaling_factor=self.state["scaling_factor"])
        return assemble_pipeline(copy.deepcopy(self.ema_unet), vae, copy.deepcopy(self.ema_text_encoder),
                                 build_scheduler())

    @torch.no_grad()
    def sample_grid(self, name: str) -> None:
        """One row per seed, one column per sample prompt, from the averaged weights (PNDM, 20 steps)."""
        pipeline = self.demo_pipeline()
        rows = []
        for seed in (0, 1):
            images = pipeline(list(SAMPLE_PROMPTS), num_inference_steps=20, guidance_scale=5.0,
                              generator=torch.Generator().manual_seed(seed), output_type="pt").images
            rows.append(images * 2 - 1)
        save_grid(torch.cat(rows), rows=2, path=self.work_dir / "samples" / name)

    # -- the result ----------------------------------------------------------------------------------------
    def export(self, output: Path) -> None:
        output.mkdir(parents=True, exist_ok=True)
        metadata = {"seed": str(self.args.seed), "vae_steps": str(self.args.vae_steps),
                    "unet_steps": str(self.args.unet_steps), "decoder_steps": str(self.args.decoder_steps)}
        modules = {"unet": self.ema_unet, "vae": self.vae, "text_encoder": self.ema_text_encoder}
        for name, module in modules.items():
            state = {key: tensor.detach().half().contiguous() for key, tensor in module.state_dict().items()
                     if tensor.is_floating_point()}
            extra = {SCALING_FACTOR_KEY: str(self.state["scaling_factor"])} if name == "vae" else {}
            save_file(state, output / WEIGHT_FILES[name], metadata={**metadata, **extra})
        seconds = {phase: round(value) for phase, value in self.state["seconds"].items()}
        print(f"wrote {', '.join(WEIGHT_FILES.values())} to {output}; training seconds {seconds}", flush=True)


def save_grid(images: torch.Tensor, rows: int, path: Path) -> None:
    """(N, 3, H, W) in [-1, 1] as a PNG grid, `rows` rows."""
    columns = math.ceil(len(images) / rows)
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    height, width = pixels.shape[1:3]
    grid = np.full((rows * height, columns * width, 3), 128, np.uint8)
    for index, picture in enumerate(pixels):
        row, column = divmod(index, columns)
        grid[row * height:(row + 1) * height, column * width:(column + 1) * width] = picture
    Image.fromarray(grid).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default="build/demo-training", help="checkpoints, losses, sample grids")
    parser.add_argument("--output", default=None, help="write the weights here when done (e.g. converter/data/demo)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="more only on an idle machine: OpenMP threads spin when the cores are shared")
    parser.add_argument("--vae-steps", type=int, default=1500)
    parser.add_argument("--vae-batch", type=int, default=16)
    parser.add_argument("--vae-lr", type=float, default=2e-3)
    parser.add_argument("--kl-weight", type=float, default=1e-6)
    parser.add_argument("--pool-size", type=int, default=4096, help="pictures encoded once for phase 2")
    parser.add_argument("--unet-steps", type=int, default=10000)
    parser.add_argument("--unet-batch", type=int, default=32)
    parser.add_argument("--unet-lr", type=float, default=5e-4)
    parser.add_argument("--ema-decay", type=float, default=0.995)
    parser.add_argument("--decoder-steps", type=int, default=3000)
    parser.add_argument("--sample-every", type=int, default=150)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    trainer = Trainer(args)
    trainer.load_checkpoint()
    if trainer.state["phase"] == VAE_PHASE:
        trainer.train_vae()
        trainer.state.update(phase=UNET_PHASE, step=0)
        trainer.save_checkpoint()
    if trainer.state["phase"] == UNET_PHASE:
        trainer.train_unet()
        trainer.state.update(phase=DECODER_PHASE, step=0)
        trainer.save_checkpoint()
    trainer.train_decoder()
    if args.output:
        trainer.export(Path(args.output))


if __name__ == "__main__":
    main()
