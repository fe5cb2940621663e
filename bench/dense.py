"""A MobileLLM-Pro-shaped dense model: the paper's baseline, for the benchmark.

MobileMoE's speed claims compare MobileMoE-S with the dense MobileLLM-Pro
(facebook/MobileLLM-Pro) at comparable INT4 weight memory (docs/architecture.md section 4).
This file gives that baseline in MLX with the same conventions and the same
kernels as `model/mobilemoe.py`: the mlx-lm model protocol (``Model(args)``,
``model(inputs, cache) -> logits``, ``layers``, ``make_cache``), the same
attention (GQA, RoPE, QK-norm without scale), SwiGLU, tied embeddings, INT4
group-32 weights through ``nn.quantize``.

Local:global attention is 3:1 (docs/architecture.md section 4, the contract here): three
layers attend over a 512-token sliding window, the fourth over the whole
context (layers 3, 7, ..., 27 global: 7 global / 23 local of 30). Local layers
keep their keys and values in mlx-lm's ``RotatingKVCache`` (512 slots), so
their cache, their attention cost and their memory stop growing past 512
tokens. A third-party copy of MobileLLM-Pro's config suggests a different
placement: global attention at layer 0, every 4th layer and the last (9 global
/ 21 local). Neither is confirmed against the released model; a config's
``layer_types`` list (one "sliding_attention" or "full_attention" per layer)
overrides the default pattern, so either can be benchmarked.

Only the shape matters for speed and memory; the weights are random unless a
checkpoint is converted for it (no converter is provided). Heads 20 / KV 4 and
the 202,048-token vocabulary are estimates (about 1.08B params; docs/architecture.md section 4).

Shape legend: B = batch, L = tokens, D = hidden, H = heads, Hkv = KV heads,
F = FFN width, W = sliding window.
"""

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import BaseModelArgs, create_attention_mask
from mlx_lm.models.cache import KVCache, RotatingKVCache

from mobilemoe_mlx.model.mobilemoe import MLP, Attention

LOCAL, GLOBAL = "sliding_attention", "full_attention"


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "mobilellm_pro"
    vocab_size: int = 202048  # Llama-4 tokenizer (estimate, docs/architecture.md section 4)
    hidden_size: int = 1280
    intermediate_size: int = 6144  # SwiGLU width
    num_hidden_layers: int = 30
    num_attention_heads: int = 20  # estimate, docs/architecture.md section 4
    num_key_value_heads: int = 4  # estimate, docs/architecture.md section 4
    head_dim: int = 64
    sliding_window: int = 512
    # Every `global_every`-th layer attends globally; the others are local (3:1).
    global_every: int = 4
    layer_types: Optional[List[str]] = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: Optional[Dict[str, Any]] = None
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = True

    def __post_init__(self):
        if self.layer_types is None:
            self.layer_types = [
                GLOBAL if (i + 1) % self.global_every == 0 else LOCAL
                for i in range(self.num_hidden_layers)
            ]
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError("layer_types must list every layer")


def pro_config() -> Dict[str, Any]:
    """The MobileLLM-Pro shape of docs/architecture.md section 4 as a config dict."""
    args = ModelArgs()
    return {
        "model_type": args.model_type,
        "vocab_size": args.vocab_size,
        "hidden_size": args.hidden_size,
        "intermediate_size": args.intermediate_size,
        "num_hidden_layers": args.num_hidden_layers,
        "num_attention_heads": args.num_attention_heads,
        "num_key_value_heads": args.num_key_value_heads,
        "head_dim": args.head_dim,
        "sliding_window": args.sliding_window,
        "layer_types": list(args.layer_types),
        "rms_norm_eps": args.rms_norm_eps,
        "rope_theta": args.rope_theta,
        "max_position_embeddings": args.max_position_embeddings,
        "tie_word_embeddings": True,
    }


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_type: str):
        super().__init__()
        self.is_local = layer_type == LOCAL
        # The MoE model's attention module: same projections, RoPE, QK-norm.
        self.self_attn = Attention(args)
        self.mlp = MLP(args.hidden_size, args.intermediate_size)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x, mask=None, cache=None):
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class DenseModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.window = args.sliding_window
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args, t) for t in args.layer_types]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, inputs: mx.array, cache=None) -> mx.array:
        h = self.embed_tokens(inputs)
        if cache is None:
            cache = [None] * len(self.layers)
        # One mask per attention kind, built from the first cache of that kind.
        first = {}
        for layer, c in zip(self.layers, cache):
            first.setdefault(layer.is_local, c)
        masks = {
            local: create_attention_mask(h, c, window_size=self.window if local else None)
            for local, c in first.items()
        }
        for layer, c in zip(self.layers, cache):
            h = layer(h, masks[layer.is_local], c)
        return self.norm(h)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = DenseModel(args)

    def __call__(self, inputs: mx.array, cache=None) -> mx.array:
        return self.model.embed_tokens.as_linear(self.model(inputs, cache))

    @property
    def layers(self):
        return self.model.layers

    def fuse_projections(self) -> None:
        """Stack q/k/v and gate/up of a model quantized in memory, as
        model.Model.fuse_projections does (bit-identical)."""
        for layer in self.layers:
            layer.self_attn.fuse_projections()
            layer.mlp.fuse_projections()

    def make_cache(self):
        """A rotating 512-slot cache for each local layer, a full one for each global."""
        return [
            RotatingKVCache(max_size=self.args.sliding_window) if layer.is_local else KVCache()
            for layer in self.layers
        ]
