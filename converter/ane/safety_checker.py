"""The `SafetyChecker` component: diffusers' `StableDiffusionSafetyChecker` without Python control flow.

The CLIP vision tower is written out as the text encoder is, in transformers' (B, tokens, D) layout (257
tokens for ViT-L/14: small tensors, rank <= 4). The scoring follows diffusers' `forward_onnx`, with the
Swift package's contract around it:

    special_scores = cos(image, special care concepts) - their thresholds + adjustment
    concept_scores = cos(image, concepts) - their thresholds + 0.01 if any special score > 0
    has_nsfw_concepts = any concept score > 0;  filtered_images = images, or zeros when flagged

As in Apple's converter, `adjustment` shifts the special-care scores only (0 reproduces diffusers).
"""
import torch
import torch.nn.functional as F
from torch import nn

from .attention import all_heads_attention
from .layers import TOKENS_LAST, constant
from .text_encoder import ACTIVATIONS

SPECIAL_CARE_ADJUSTMENT = 0.01  # diffusers' stricter concept thresholds once a special-care concept is seen


class SafetyChecker(nn.Module):
    """(clip_input (1, 3, 224, 224), images (1, H, W, 3), adjustment (1,)) →
    (filtered_images (1, H, W, 3), has_nsfw_concepts (1, 1, 1, 1), concept_scores (1, concepts))."""

    def __init__(self, safety_checker: nn.Module):
        super().__init__()
        vision = safety_checker.vision_model
        vision = getattr(vision, "vision_model", vision)  # transformers < 5 nests it
        hidden_act = safety_checker.config.vision_config.hidden_act
        if hidden_act not in ACTIVATIONS:
            raise ValueError(f"vision tower activation {hidden_act!r} is not supported; choose from "
                             f"{', '.join(ACTIVATIONS)}")
        self.activation = ACTIVATIONS[hidden_act]
        self.class_embedding = vision.embeddings.class_embedding
        self.patch_embedding = vision.embeddings.patch_embedding
        self.position_embedding = vision.embeddings.position_embedding
        self.pre_layernorm = vision.pre_layrnorm
        self.layers = vision.encoder.layers
        self.post_layernorm = vision.post_layernorm
        self.visual_projection = safety_checker.visual_projection
        # The concepts are constants: normalized once here, in float32, then stored in the weights' dtype.
        dtype = self.visual_projection.weight.dtype
        self.register_buffer("concepts", unit_rows(safety_checker.concept_embeds).T.to(dtype))
        self.register_buffer("special_care", unit_rows(safety_checker.special_care_embeds).T.to(dtype))
        self.register_buffer("concept_thresholds", safety_checker.concept_embeds_weights.detach().to(dtype)[None])
        self.register_buffer("special_care_thresholds",
                             safety_checker.special_care_embeds_weights.detach().to(dtype)[None])

    def image_embedding(self, clip_input: torch.Tensor) -> torch.Tensor:
        """CLIP's projected image embedding (1, projection_dim): the class token after the vision tower."""
        patches = self.patch_embedding(clip_input.to(self.patch_embedding.weight.dtype))  # (1, D, h, w)
        batch, width = patches.shape[:2]
        patches = patches.reshape(batch, width, -1).transpose(1, 2)
        class_token = self.class_embedding.reshape(1, 1, width).expand(batch, 1, width)
        hidden_states = torch.cat([class_token, patches], dim=1) + self.position_embedding.weight[None]
        hidden_states = TOKENS_LAST.layer_norm(hidden_states, self.pre_layernorm)
        for layer in self.layers:
            attention = layer.self_attn
            normed = TOKENS_LAST.layer_norm(hidden_states, layer.layer_norm1)
            attended = all_heads_attention(
                attention.q_proj(normed), attention.k_proj(normed), attention.v_proj(normed),
                attention.num_heads, attention.scale,
            )
            hidden_states = hidden_states + attention.out_proj(attended)
            mlp = layer.mlp
            normed = TOKENS_LAST.layer_norm(hidden_states, layer.layer_norm2)
            hidden_states = hidden_states + mlp.fc2(self.activation(mlp.fc1(normed)))
        pooled = TOKENS_LAST.layer_norm(hidden_states[:, 0], self.post_layernorm)
        return self.visual_projection(pooled)

    def forward(self, clip_input: torch.Tensor, images: torch.Tensor, adjustment: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        embedding = self.image_embedding(clip_input)
        embedding = embedding * torch.rsqrt((embedding * embedding).sum(dim=1, keepdim=True))
        zero = constant(0.0, embedding)
        special_scores = embedding @ self.special_care - self.special_care_thresholds + adjustment.to(embedding.dtype)
        special_care = (special_scores.amax(dim=1, keepdim=True) > zero).to(embedding.dtype)
        concept_scores = (embedding @ self.concepts - self.concept_thresholds
                          + special_care * constant(SPECIAL_CARE_ADJUSTMENT, embedding))
        flagged = (concept_scores.amax(dim=1, keepdim=True) > zero).to(images.dtype).reshape(-1, 1, 1, 1)
        filtered_images = images * (constant(1.0, flagged) - flagged)
        return filtered_images, flagged, concept_scores


def unit_rows(embeddings: torch.Tensor) -> torch.Tensor:
    """Each row scaled to unit length, as diffusers' `cosine_distance` normalizes them (in float32)."""
    return F.normalize(embeddings.detach().float())
