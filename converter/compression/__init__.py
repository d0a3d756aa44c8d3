"""Smaller weights: palettes (palettize.py). What the command line offers is here, without the libraries."""

QUANTIZED_KINDS = ("text_encoder", "unet")  # the text encoders' and Unet's weights; the VAE's stay float16
NBITS_CHOICES = (1, 2, 4, 6, 8)  # what constexpr_lut_to_dense supports on macOS 13 / iOS 16
