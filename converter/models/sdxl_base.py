"""SDXL base 1.0's architecture as data (stabilityai/stable-diffusion-xl-base-1.0's configs, with the defaults it
relies on spelled out), for the full-size benchmarks, which build it with random weights since no weights are
downloaded. Its Unet has 2.57 B parameters.
"""
from .sd_v1_4 import SD_VAE_CONFIG

SDXL_UNET_CONFIG = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32, act_fn="silu", downsample_padding=1,
    flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1, norm_eps=1e-5, upcast_attention=False,
)
SDXL_VAE_CONFIG = dict(SD_VAE_CONFIG, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
# openai/clip-vit-large-patch14 and laion's OpenCLIP ViT-bigG/14 text models, as SDXL's configs have them.
SDXL_TEXT_ENCODER_CONFIG = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, layer_norm_eps=1e-5,
    bos_token_id=0, eos_token_id=2, pad_token_id=1,
)
SDXL_TEXT_ENCODER_2_CONFIG = dict(
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    max_position_embeddings=77, hidden_act="gelu", projection_dim=1280, layer_norm_eps=1e-5,
    bos_token_id=0, eos_token_id=2, pad_token_id=1,
)
