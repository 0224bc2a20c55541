"""SAM's mask decoder with its attention projections folded onto the prompt tokens.

Why: on CPU a click or a box costs one decoder pass (bench/NOTES.md: 35-66 ms on two cores,
the floor of every click, of "16 boxes" and of the everything mode's 1024 points). Most of
that pass is ten linear projections of the 4096 image tokens (64x64 embedding, 256 -> 128
channels), although each attention has only ~7 prompt tokens on its other side. Linear maps
commute with the attention's sums, so each projection of the image side can move onto the
few tokens instead:

* tokens -> image (the image tokens are keys and values): ``q · (W_k x + b_k)`` is
  ``(q W_k) · x`` plus a term that is constant along the softmax axis (it cancels), and
  ``softmax · (W_v x + b_v)`` is ``W_v (softmax · x) + b_v`` because softmax rows sum to 1.
* image -> tokens (the image tokens are queries): ``(W_q x + b_q) · k`` is
  ``x · (W_q^T k) + b_q · k``, and the output projection of ``Σ p v`` is ``Σ p (W_o v)``.

Each projection of 4096 x 256 x 128 becomes a product of the 4096 x 256 image side with
heads x tokens (8 x 7 = 56) columns: ~2.3x fewer multiply-adds in the transformer. The layer
norms, MLPs, the upscaling convolutions and the hypernetwork heads are the model's own
modules, called as transformers calls them, and outputs equal ``SamModel.forward`` within
floating-point reassociation (tested against it on the tiny and the real-size config).

Only plain SAM (``SamModel``: ViT-B/L/H, SlimSAM) takes this path; SAM-HQ, SAM 2 and the
SAM 3 tracker have other decoders and run through their model's forward.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import SamModel


def _heads(attention: nn.Module) -> tuple[int, int]:
    """(heads, channels per head) of a transformers ``SamAttention``."""
    heads = int(attention.num_attention_heads)
    return heads, int(attention.internal_dim) // heads


def tokens_to_image(attention: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``attention(query=tokens, key=image, value=image)`` without projecting the image side.

    query (n, T, C) prompt tokens; key, value (b, N, C) image tokens, b = 1 (shared by every
    prompt set) or n. Returns (n, T, C), the attention's output after ``out_proj``.
    """
    heads, head_dim = _heads(attention)
    n, tokens, channels = query.shape
    q = attention.q_proj(query).reshape(n, tokens, heads, head_dim)
    w_k = attention.k_proj.weight.reshape(heads, head_dim, channels)
    # (n, H, T, C): each head's query seen through k_proj; k_proj's bias adds a constant per
    # query row, which softmax removes
    folded = torch.einsum("nthd,hdc->nhtc", q, w_k.to(q.dtype)) * attention.scaling
    # b = 1: one image side for all prompt sets, so every head of every prompt is one GEMM
    scores = folded.reshape(key.shape[0], -1, channels) @ key.transpose(1, 2)
    mixed = (scores.softmax(dim=-1) @ value).reshape(n, heads, tokens, channels)
    w_v = attention.v_proj.weight.reshape(heads, head_dim, channels)
    out = torch.einsum("nhtc,hdc->nthd", mixed, w_v.to(mixed.dtype)).reshape(n, tokens, heads * head_dim)
    return attention.out_proj(out + attention.v_proj.bias.to(out.dtype))


def image_to_tokens(attention: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``attention(query=image, key=tokens, value=tokens)`` without projecting the image side.

    query (b, N, C) image tokens, b = 1 or n; key, value (n, T, C) prompt tokens. Returns
    (n, N, C), the attention's output after ``out_proj``.
    """
    heads, head_dim = _heads(attention)
    n, tokens, channels = key.shape
    k = attention.k_proj(key).reshape(n, tokens, heads, head_dim)
    v = attention.v_proj(value).reshape(n, tokens, heads, head_dim)
    w_q = attention.q_proj.weight.reshape(heads, head_dim, channels)
    # scores[n, i, h, t] = x_i · (W_q,h^T k_t) + b_q,h · k_t
    project_in = torch.einsum("nthd,hdc->ncht", k, w_q.to(k.dtype)).reshape(n, channels, heads * tokens)
    offset = torch.einsum("nthd,hd->nht", k, attention.q_proj.bias.reshape(heads, head_dim).to(k.dtype))
    scores = (query @ (project_in * attention.scaling)).reshape(-1, query.shape[1], heads, tokens)
    scores = scores + (offset * attention.scaling).reshape(n, 1, heads, tokens)
    probs = scores.softmax(dim=-1).reshape(n, -1, heads * tokens)
    # out_proj applied to each token's values before mixing: (n, H*T, C)
    w_o = attention.out_proj.weight.reshape(channels, heads, head_dim)
    project_out = torch.einsum("nthd,chd->nhtc", v, w_o.to(v.dtype)).reshape(n, heads * tokens, channels)
    return probs @ project_out + attention.out_proj.bias


def _attend(attention: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The model's own attention among the (n, T, C) prompt tokens (nothing to fold: all sides
    are a handful of tokens), in its (batch, point batch, tokens, C) layout."""
    return attention(query=query[:, None], key=key[:, None], value=value[:, None])[0][:, 0]


class FoldedSamDecoder(nn.Module):
    """Prompt encoder + mask decoder of a ``SamModel``, with the folded attentions above.

    Holds no weights of its own: it reads the model's modules at every call, so it follows
    the model's device and any later weight change. The image-wide positional encoding
    (a function of the weights only) is computed once. A module so that forward hooks
    (bench/) time one decoder call as they time the model's own forward.
    """

    def __init__(self, model: SamModel) -> None:
        super().__init__()
        self.model = model
        self._positional: torch.Tensor | None = None

    def _image_positional(self) -> torch.Tensor:
        """(1, N, C) positional encoding of the 64x64 embedding grid."""
        if self._positional is None:
            grid = self.model.get_image_wide_positional_embeddings()
            # contiguous (N, C): adds on the transposed (C, N) view run at strided speed
            self._positional = grid.flatten(2).transpose(1, 2).contiguous()
        return self._positional

    def forward(
        self,
        image_embeddings: torch.Tensor,
        input_points: torch.Tensor | None = None,
        input_labels: torch.Tensor | None = None,
        input_boxes: torch.Tensor | None = None,
        input_masks: torch.Tensor | None = None,
        multimask_output: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Same inputs as ``SamModel.forward`` with ``image_embeddings`` of shape (1, C, h, w)
        shared by the n prompt sets (points (n, 1, k, 2), labels (n, 1, k), boxes (n, 1, 4),
        masks (n, 1, 256, 256)). Returns (iou_scores (n, 1, m), pred_masks (n, 1, m, 256, 256)),
        the layout of ``SamImageSegmentationOutput``."""
        sparse, dense = self.model.prompt_encoder(
            input_points=input_points, input_labels=input_labels, input_boxes=input_boxes, input_masks=input_masks
        )
        decoder = self.model.mask_decoder
        n = sparse.shape[0]
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.expand(n, -1, -1), sparse[:, 0].to(output_tokens.dtype)], dim=1)
        _, channels, height, width = image_embeddings.shape
        if dense.shape[0] == 1 or input_masks is None:  # no mask prompt: one image side for all
            dense = dense[:1]
        image = (image_embeddings + dense).flatten(2).transpose(1, 2).contiguous()  # (1 or n, N, C)
        positional = self._image_positional()

        # the transformer and the heads in float32 even under autocast: their token-side linears act
        # on ~7 rows, where casting each weight to bfloat16 costs more than the product it feeds;
        # the upscaling convolutions below, the bulk of the arithmetic, follow the caller's autocast
        with torch.autocast(image.device.type, enabled=False):
            queries, keys = tokens, image
            for index, layer in enumerate(decoder.transformer.layers):
                if index == 0:  # skip_first_layer_pe
                    queries = _attend(layer.self_attn, queries, queries, queries)
                else:
                    query = queries + tokens
                    queries = queries + _attend(layer.self_attn, query, query, queries)
                queries = layer.layer_norm1(queries)
                positioned_keys = keys + positional
                queries = layer.layer_norm2(
                    queries + tokens_to_image(layer.cross_attn_token_to_image, queries + tokens, positioned_keys, keys)
                )
                queries = layer.layer_norm3(queries + layer.mlp(queries))
                keys = layer.layer_norm4(
                    keys + image_to_tokens(layer.cross_attn_image_to_token, positioned_keys, queries + tokens, queries)
                )
            transformer = decoder.transformer
            queries = transformer.layer_norm_final_attn(
                queries
                + tokens_to_image(transformer.final_attn_token_to_image, queries + tokens, keys + positional, keys)
            )
            mask_tokens = queries[:, 1 : 1 + decoder.num_mask_tokens]
            hyper_in = torch.stack(
                [mlp(mask_tokens[:, i]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], dim=1
            )
            iou = decoder.iou_prediction_head(queries[:, 0])

        if keys.shape[0] != n:  # a decoder with no layers never made the image side per prompt
            keys = keys.expand(n, -1, -1)
        grid = keys.transpose(1, 2).reshape(n, channels, height, width)
        upscaled = decoder.activation(decoder.upscale_layer_norm(decoder.upscale_conv1(grid)))
        upscaled = decoder.activation(decoder.upscale_conv2(upscaled))
        _, up_channels, up_h, up_w = upscaled.shape
        masks = (hyper_in.to(upscaled.dtype) @ upscaled.reshape(n, up_channels, up_h * up_w)).reshape(n, -1, up_h, up_w)
        chosen = slice(1, None) if multimask_output else slice(0, 1)
        return iou[:, None, chosen], masks[:, None, chosen]
