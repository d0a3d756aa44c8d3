"""Smaller weights: palettes (palettize.py). What the command line offers is here, without the libraries."""

# the text encoders', Unets' and ControlNets' weights; the VAE's stay float16
QUANTIZED_KINDS = ("text_encoder", "unet", "controlled_unet", "controlnet")
NBITS_CHOICES = (1, 2, 4, 6, 8)  # what constexpr_lut_to_dense supports on macOS 13 / iOS 16
