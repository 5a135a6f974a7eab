"""The Resampler of InstantID: a perceiver that turns a 512-d face embedding into 16 tokens.

The module tree mirrors the checkpoint's ``image_proj`` keys exactly (``latents``, ``proj_in``,
``proj_out``, ``norm_out``, ``layers.N.0.{norm1,norm2,to_q,to_kv,to_out}``,
``layers.N.1.{0,1,3}``), so a checkpoint state dict loads with ``strict=True`` and no renaming.
Published InstantID: width 1280, depth 4, 20 heads of 64, feed-forward x4, 16 queries,
input 512 (the insightface embedding), output = the UNet's cross-attention width.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DIM_HEAD = 64
"""Width of one attention head; the checkpoint does not record it, every published one uses 64."""


class PerceiverAttention(nn.Module):
    """Latents attend to the concatenation of (normalised) input features and themselves."""

    def __init__(self, dim: int, heads: int, dim_head: int = DIM_HEAD) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, features: Tensor, latents: Tensor) -> Tensor:
        features = self.norm1(features)
        latents = self.norm2(latents)
        batch, n_latents, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat((features, latents), dim=1)).chunk(2, dim=-1)
        q, k, v = (t.reshape(batch, t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(batch, n_latents, -1))


def feed_forward(dim: int, mult: int) -> nn.Sequential:
    """LayerNorm, Linear(dim, dim*mult), GELU, Linear(dim*mult, dim); keys 0, 1, 3 as in the checkpoint."""
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, dim * mult, bias=False),
        nn.GELU(),
        nn.Linear(dim * mult, dim, bias=False),
    )


class Resampler(nn.Module):
    """Perceiver resampler: ``forward(embeds [B, 512] or [B, N, 512]) -> tokens [B, num_queries, output_dim]``."""

    def __init__(
        self,
        *,
        dim: int = 1280,
        depth: int = 4,
        heads: int = 20,
        num_queries: int = 16,
        embedding_dim: int = 512,
        output_dim: int = 2048,
        ff_mult: int = 4,
    ) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.output_dim = output_dim
        self.latents = nn.Parameter(torch.empty(1, num_queries, dim))
        if not self.latents.is_meta:  # drawing on the meta device would import torch's Python decompositions
            nn.init.normal_(self.latents, std=dim**-0.5)
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, heads), feed_forward(dim, ff_mult)]) for _ in range(depth)
        )

    @staticmethod
    def config_from_state_dict(sd: Mapping[str, Tensor]) -> dict[str, int]:
        """The constructor arguments that ``sd``'s shapes imply. Raises ``KeyError`` for a missing key."""
        _, num_queries, dim = sd["latents"].shape
        depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
        return {
            "dim": dim,
            "depth": depth,
            "heads": sd["layers.0.0.to_q.weight"].shape[0] // DIM_HEAD,
            "num_queries": num_queries,
            "embedding_dim": sd["proj_in.weight"].shape[1],
            "output_dim": sd["proj_out.weight"].shape[0],
            "ff_mult": sd["layers.0.1.1.weight"].shape[0] // dim,
        }

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Tensor]) -> Resampler:
        """A Resampler whose parameters *are* the tensors of ``sd`` (shared, not copied).

        The dimensions are inferred from the shapes. Raises ``KeyError`` for a missing key and
        ``RuntimeError`` (from ``load_state_dict``) for unexpected keys or shapes.
        """
        with torch.device("meta"):
            module = cls(**cls.config_from_state_dict(sd))
        module.load_state_dict(dict(sd), strict=True, assign=True)
        return module.eval()

    def forward(self, embeds: Tensor) -> Tensor:
        if embeds.ndim not in (2, 3) or embeds.shape[-1] != self.embedding_dim:
            raise ValueError(
                f"expected face embeddings of shape [B, {self.embedding_dim}] or [B, N, {self.embedding_dim}], "
                f"got {list(embeds.shape)}"
            )
        if embeds.ndim == 2:
            embeds = embeds.unsqueeze(1)
        features = self.proj_in(embeds)
        latents = self.latents.expand(embeds.shape[0], -1, -1)
        for block in self.layers:
            attention, ff = block[0], block[1]  # type: ignore[index]
            latents = attention(features, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))
