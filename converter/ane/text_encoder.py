"""The text encoder components: transformers' `CLIPTextModel` (or `CLIPTextModelWithProjection`) with
explicit (eager) attention.

It keeps transformers' (B, 77, D) layout for every attention implementation, as Apple's packages do:
77 tokens make small tensors, and every tensor stays at rank <= 4 (the scores are (1, heads, 77, 77)).
Writing the forward pass out spares the conversion transformers' attention dispatch and mask builders.
"""
import torch
import torch.nn.functional as F
from torch import nn

from .attention import all_heads_attention
from .layers import TOKENS_LAST, constant

ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(constant(1.702, x) * x),
    "gelu": F.gelu,
}


class TextEncoder(nn.Module):
    """(input_ids as float (1, 77),) → (hidden states (1, 77, D), pooled_outputs (1, P), *deeper hidden states).

    The hidden states are the last layer's after the final layer norm (`hidden_layer=-1`, SD) or an earlier
    layer's output as transformers' `hidden_states[hidden_layer]` holds it (SDXL takes -2); the pooled output
    is the end token's final hidden state, through the text projection when `projected` (SDXL's `text_embeds`).
    `skipped_layers` are further `hidden_states` indices, output as they are (clip skip's layers).
    """

    def __init__(self, text_encoder: nn.Module, hidden_layer: int = -1, projected: bool = False,
                 skipped_layers: tuple[int, ...] = ()):
        super().__init__()
        text_model = getattr(text_encoder, "text_model", text_encoder)  # transformers < 5 nests it
        self.token_embedding = text_model.embeddings.token_embedding
        self.position_embedding = text_model.embeddings.position_embedding
        self.layers = text_model.encoder.layers
        self.final_layer_norm = text_model.final_layer_norm
        self.eos_token_id = text_encoder.config.eos_token_id
        self.hidden_layer = hidden_layer
        self.skipped_layers = skipped_layers
        if any(-layer > len(self.layers) for layer in skipped_layers):
            raise ValueError(f"the text encoder has {len(self.layers)} layers, fewer than clip skip needs")
        self.text_projection = text_encoder.text_projection if projected else None
        hidden_act = text_encoder.config.hidden_act
        if hidden_act not in ACTIVATIONS:
            raise ValueError(f"text encoder activation {hidden_act!r} is not supported; choose from "
                             f"{', '.join(ACTIVATIONS)}")
        self.activation = ACTIVATIONS[hidden_act]

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        token_ids = input_ids.to(torch.int32)
        length = token_ids.shape[1]
        hidden_states = self.token_embedding(token_ids) + self.position_embedding.weight[:length]
        causal_mask = torch.full((length, length), -1e4, dtype=hidden_states.dtype).triu(1)
        layer_outputs = [hidden_states]
        for layer in self.layers:
            attention = layer.self_attn
            normed = TOKENS_LAST.layer_norm(hidden_states, layer.layer_norm1)
            attended = all_heads_attention(
                attention.q_proj(normed), attention.k_proj(normed), attention.v_proj(normed),
                attention.num_heads, attention.scale, causal_mask,
            )
            hidden_states = hidden_states + attention.out_proj(attended)
            mlp = layer.mlp
            normed = TOKENS_LAST.layer_norm(hidden_states, layer.layer_norm2)
            hidden_states = hidden_states + mlp.fc2(self.activation(mlp.fc1(normed)))
            layer_outputs.append(hidden_states)
        last_hidden_state = TOKENS_LAST.layer_norm(hidden_states, self.final_layer_norm)
        # transformers' pooling: configs with the legacy eos id 2 take the highest token id (CLIP's end token).
        end_positions = (token_ids if self.eos_token_id == 2 else (token_ids == self.eos_token_id).int()).argmax(dim=-1)
        pooled = last_hidden_state[torch.arange(last_hidden_state.shape[0]), end_positions]
        if self.text_projection is not None:
            pooled = self.text_projection(pooled)
        hidden = last_hidden_state if self.hidden_layer == -1 else layer_outputs[self.hidden_layer]
        return (hidden, pooled, *(layer_outputs[layer] for layer in self.skipped_layers))
