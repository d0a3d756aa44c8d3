"""coreml-sd converter: diffusers Stable Diffusion models to Neural-Engine-ready Core ML packages."""

__version__ = "0.1.0"
