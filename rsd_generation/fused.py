"""Decoder forwards with fewer, larger kernels for the fast path: fused QKV and gate/up projections.

At small batch a decode step is a chain of matrix-vector products, and small ones (the key and value projections
of a grouped-query model are an eighth of the query's) reach a fraction of the memory bandwidth. Laying out each
layer's q/k/v weights in one buffer and its gate/up weights in another turns seven products per layer into four.
The model's own parameters become views of the fused buffers, so no weight is stored twice and the model (its
`state_dict`, `save_pretrained`, a later plain `generate`) sees the same values. safetensors' `save_model` refuses
parameters that share a buffer none of them covers: `unfuse(model)` gives them their own storage again.

`fused_layout` lays a model out (once; again if its parameters were replaced, e.g. by `.to()`), or says why it
cannot; `fused_forward` runs the decoder over a static cache with the model's own weights, rotary embedding,
activation and output projections, the same math as the model's forward with an explicit 4-D mask and positions,
in fewer kernels where nothing compiles them: each residual add goes with the norm after it, the rotary embedding
rotates the queries and keys at once in place in the fused projection's output, and on CUDA those and the SiLU
product run as one Triton kernel each (`kernels`), as do one-token projections whose shape measured faster
in a Triton GEMV than in cuBLAS (`kernels.linear`). Such a GEMV takes the elementwise work around it too where
that measured faster: the RMS norm before the qkv and gate/up products, the rotary embedding and the cache writes
after qkv, the SiLU product after gate/up, and the residual add after the output and down products, so a decoder
layer at batch 1 runs as few as five kernels (`norm_project`, `add_project`; with `kernels.SKINNY`, at up to 64
tokens too).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import rotate_half

from . import kernels

RMS_NORMS = ("LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")  # weight * (x * rsqrt(mean(x²) + eps)), in float32


@dataclass
class FusedLayer:
    """One decoder layer's fused projections; `sizes`: the q, k and v widths of `qkv`'s output."""

    qkv: torch.Tensor  # qkv: [Q + K + V, H]
    qkv_bias: torch.Tensor | None  # [Q + K + V]
    gate_up: torch.Tensor  # gate_up: [2 I, H]
    gate_up_bias: torch.Tensor | None  # [2 I]
    sizes: tuple[int, int, int]


_LAYOUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def fused_layout(backbone: nn.Module) -> list[FusedLayer] | None:
    """The fused projections of every decoder layer of `backbone` (a Llama/Qwen2/Qwen3 model body), laid out on
    first use, the layers' parameters turned into views of them; None when a layer does not fit (see
    `why_not_fused`)."""
    if why_not_fused(backbone) is not None:
        return None
    layers = _LAYOUTS.get(backbone)
    if layers is None or not all(_still_views(f, layer) for f, layer in zip(layers, backbone.layers, strict=True)):
        with torch.no_grad():
            layers = [_fuse(layer) for layer in backbone.layers]
        _LAYOUTS[backbone] = layers
    return layers


def unfuse(model: nn.Module) -> None:
    """Give the fused projections of `model` (a causal LM or its body) their own storage again, for tools that
    refuse parameters sharing a buffer (safetensors' `save_model`). The next fast-path `generate` lays them out
    again."""
    backbone = getattr(model, "base_model", model)
    if _LAYOUTS.pop(backbone, None) is None:
        return
    with torch.no_grad():
        for layer in backbone.layers:
            qkv, gate_up = _groups(layer)
            for p in qkv + gate_up:
                p.weight.data = p.weight.data.clone()
                if p.bias is not None:
                    p.bias.data = p.bias.data.clone()


def why_not_fused(backbone: nn.Module) -> str | None:
    """Why `backbone`'s layers cannot be fused (None when they can)."""
    layers = getattr(backbone, "layers", None)
    if layers is None or getattr(backbone, "rotary_emb", None) is None or getattr(backbone, "norm", None) is None:
        return "not a decoder with layers, a rotary embedding and a final norm"
    devices = set()
    for i, layer in enumerate(layers):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        qkv, gate_up = _groups(layer)
        projections = qkv + gate_up
        if not all(type(p) is nn.Linear for p in projections) or not hasattr(mlp, "act_fn"):
            return f"layer {i}'s projections are not plain nn.Linear (quantized or adapted layers keep their own)"
        for group in (qkv, gate_up):
            weights = [p.weight for p in group]
            if len({(w.dtype, w.device) for w in weights}) > 1 or len({p.bias is None for p in group}) > 1:
                return f"layer {i}'s projections differ in dtype, device or bias"
            devices.add(weights[0].device)
        if any(hasattr(m, "_hf_hook") for m in (backbone, layer, attn, mlp, *projections)):
            return "the model is dispatched by accelerate (its hooks move tensors between devices)"
    if len(devices) > 1:
        return "the layers are spread over devices"
    return None


def _groups(layer: nn.Module) -> tuple[list, list]:
    """A decoder layer's projections that fuse: [q, k, v] and [gate, up] (None where a layer lacks one)."""
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    return [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj")], [
        getattr(mlp, n, None) for n in ("gate_proj", "up_proj")
    ]


def _fuse(layer: nn.Module) -> FusedLayer:
    """Lay one layer's q/k/v and gate/up weights (and biases) out in one buffer each, the parameters becoming views."""
    qkv_group, gate_up_group = _groups(layer)
    qkv, qkv_bias = _fuse_linears(qkv_group)
    gate_up, gate_up_bias = _fuse_linears(gate_up_group)
    sizes = tuple(p.out_features for p in qkv_group)
    return FusedLayer(qkv, qkv_bias, gate_up, gate_up_bias, sizes)


def _fuse_linears(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate the weights (and biases) of `linears` along their outputs; each parameter becomes a view."""
    weight = torch.cat([p.weight.data for p in linears])  # weight: [sum of outputs, H]
    bias = torch.cat([p.bias.data for p in linears]) if linears[0].bias is not None else None
    start = 0
    for p in linears:
        n = p.out_features
        p.weight.data = weight[start : start + n]
        if bias is not None:
            p.bias.data = bias[start : start + n]
        start += n
    return weight, bias


def _still_views(fused: FusedLayer, layer: nn.Module) -> bool:
    """Whether the layer's parameters still live in the fused buffers (`.to()` or a reload replaces them)."""
    qkv, gate_up = _groups(layer)
    pairs = [(fused.qkv, p.weight) for p in qkv] + [(fused.gate_up, p.weight) for p in gate_up]
    return all(w.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr() for buf, w in pairs)


def grouped_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scale: float,
                      masks: dict | None = None) -> torch.Tensor:  # fmt: skip
    """Attention of grouped-query heads without copying keys: the G query heads that share a key/value head go in
    as G x W queries of that head (the model's own forward repeats each key and value G times under a mask, which
    at batch 16 reads and writes several GB per step).

    Args:
        q (`torch.Tensor` of shape `(N, Hq, W, D)`): queries; head h reads key/value head h // G.
        keys, values (`torch.Tensor` of shape `(N, Hkv, C, D)`).
        mask (`torch.Tensor` of shape `(N, 1, W, C)`): additive.
        masks (`dict`, *optional*): a cache of the grouped masks, by G (the same for every layer of a forward).
    Returns:
        `torch.Tensor` of shape `(N, Hq, W, D)`.
    """
    N, Hq, W, D = q.shape
    G = Hq // keys.shape[1]
    if G == 1:
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)
    grouped = masks.get(G) if masks is not None else None
    if grouped is None:  # query g * W + w of a group is query w of head g: mask row w
        grouped = mask[:, :, None].expand(N, 1, G, W, mask.shape[-1]).reshape(N, 1, G * W, mask.shape[-1])
        if masks is not None:
            masks[G] = grouped
    o = F.scaled_dot_product_attention(q.reshape(N, Hq // G, G * W, D), keys, values, attn_mask=grouped, scale=scale)
    return o.view(N, Hq // G, G, W, D).reshape(N, Hq, W, D)


def fused_forward(
    backbone: nn.Module,
    layers: list[FusedLayer],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | Callable[[], torch.Tensor],
    position_ids: torch.Tensor,
    cache,
) -> torch.Tensor:
    """The decoder over a chunk: the last hidden state `(N, W, H)`.

    Args:
        backbone (`nn.Module`): the model body whose layers `layers` describes.
        input_ids (`torch.LongTensor` of shape `(N, W)`): the chunk.
        attention_mask (`torch.Tensor` of shape `(N, 1, W, C)`, or a callable building it): additive, over the
            cache's C columns (called, once, only if an attention needs it).
        position_ids (`torch.LongTensor` of shape `(N, W)`): each token's position.
        cache: a static cache with `update(keys, values, layer_idx)` returning the layer's keys and values
            `(N, H_kv, C, D)`; with `destination(layer_idx)` and `read(layer_idx)` (`fast.StaticKV`), the
            kernels write the keys and values themselves, and with `colmask` (its rows' valid columns) the
            decode-attention kernel reads them in place (no mask is built); with `rope`, cos and sin `(C, D)` by
            position, the forward looks its positions up.
    """
    x = backbone.embed_tokens(input_ids)  # x: [N, W, H]
    rope = getattr(cache, "rope", None)  # the rotary embedding by position, looked up (`fast.rope_table`)
    cos, sin = (rope[0][position_ids], rope[1][position_ids]) if rope else backbone.rotary_emb(x, position_ids)
    N, W = input_ids.shape
    fast = kernels.usable(x)  # Triton kernels for the elementwise work (else eager operations)
    masks: dict[int, torch.Tensor] = {}  # per query-group size G: the mask of G grouped queries
    colmask = getattr(cache, "colmask", None)  # its rows' valid columns, for the attention kernel to read in place
    delta = None  # what the last sublayer adds to the residual stream x, added by the next norm
    for i, (layer, f) in enumerate(zip(backbone.layers, layers, strict=True)):
        attn = layer.self_attn
        D, (Q, K, _) = attn.head_dim, f.sizes
        o = None  # o: [N, W, Hq * D], the attention's output
        if fast and not hasattr(attn, "q_norm") and hasattr(cache, "destination") and cos.dtype == x.dtype:
            # one kernel (the qkv GEMV's epilogue, or its own) rotates the queries and writes the rotated keys and
            # the values to the cache
            k_buf, v_buf, rows, cols = cache.destination(i)
            rotary = (cos, sin, Q // D, k_buf, v_buf, rows, cols)
            q, x = norm_project(layer.input_layernorm, x, delta, f.qkv, f.qkv_bias, fast, rotary=rotary)
            # attention reading the cache and its column mask in place, up to the chunk's end
            if colmask is not None and kernels.attention_fits(q, k_buf):
                o = kernels.decode_attention(q, k_buf, v_buf, rows, colmask, cols, attn.scaling)
            else:
                keys, values = cache.read(i)  # keys: [N, Hkv, C, D]
        else:
            qkv, x = norm_project(layer.input_layernorm, x, delta, f.qkv, f.qkv_bias, fast)  # qkv: [N, W, Q + K + V]
            if hasattr(attn, "q_norm"):  # Qwen3: per-head norms before the rotary embedding
                q = rms_norm(attn.q_norm, qkv[..., :Q].view(N, W, -1, D))  # q: [N, W, Hq, D]
                k = rms_norm(attn.k_norm, qkv[..., Q : Q + K].view(N, W, -1, D))
                q, k = rotate(q, cos, sin), rotate(k, cos, sin)
            else:  # queries and keys rotated together
                qk = rotate(qkv[..., : Q + K].unflatten(-1, (-1, D)), cos, sin)  # qk: [N, W, Hq + Hkv, D]
                q, k = qk.split((Q // D, K // D), 2)
            v = qkv[..., Q + K :].unflatten(-1, (-1, D))  # v: [N, W, Hkv, D]
            keys, values = cache.update(k.transpose(1, 2), v.transpose(1, 2), i)  # keys: [N, Hkv, C, D]
        if o is None:
            attention_mask = attention_mask() if callable(attention_mask) else attention_mask  # built once
            o = grouped_attention(q.transpose(1, 2), keys, values, attention_mask, attn.scaling, masks)  # [N, Hq, W, D]
            o = o.transpose(1, 2).reshape(N, W, -1)
        x, delta = add_project(attn.o_proj, o, x, fast)
        mlp = layer.mlp
        a, x = norm_project(layer.post_attention_layernorm, x, delta, f.gate_up, f.gate_up_bias, fast, mlp.act_fn)
        x, delta = add_project(mlp.down_proj, a, x, fast)  # a: [N, W, I], act_fn(gate) * up
    return add_norm(backbone.norm, x, delta, fast)[0]


def project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, fast: bool) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, by `kernels.linear` when `fast` (the GEMV where it measured faster)."""
    return kernels.linear(x, weight, bias) if fast else F.linear(x, weight, bias)


def linear(module: nn.Module, x: torch.Tensor, fast: bool) -> torch.Tensor:
    """`module(x)`, through `project` when it is a plain `nn.Linear` (a quantized or adapted one runs its own)."""
    if plain_linear(module):
        return project(x, module.weight, module.bias, fast)
    return module(x)


def plain_linear(module: nn.Module) -> bool:
    """Whether `module` is an `nn.Linear` without hooks (whose product `project` may compute)."""
    return type(module) is nn.Linear and not module._forward_hooks and not module._forward_pre_hooks


def norm_project(
    norm: nn.Module,
    x: torch.Tensor,
    delta: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    fast: bool,
    act_fn: nn.Module | None = None,
    rotary: tuple | None = None,
) -> tuple[torch.Tensor, ...]:
    """`(F.linear(norm(x + delta), weight, bias), x + delta)`; with `act_fn`, `weight` is a fused gate/up and the
    first result `act_fn(gate) * up`; with `rotary` (`kernels.rotary_into_cache_`'s arguments after the heads, and
    `fast`), `weight` is a fused qkv whose rotated keys and values go to the cache, and the first result the rotated
    query heads `(N, W, Hq, D)`. Where `fast` allows the GEMV, it was chosen for this product and
    `kernels.GEMV_FUSION` is on, the GEMV takes in the RMS norm (with nothing to add, `delta` None), the SiLU
    product and the rotary embedding, each where it measured faster so (`kernels.fusion_pays`)."""
    config = kernels.gemv_config(x, weight, bias) if fast and kernels.GEMV_FUSION else None
    norm_inside = config is not None and delta is None and _rms_norm_kernel(norm, x)
    norm_inside = norm_inside and kernels.fusion_pays("norm", x, weight, bias, config)
    gated = config is not None and act_fn is not None and _silu_kernel(act_fn)
    gated = gated and kernels.fusion_pays("gated", x, weight, bias, config)
    heads = None if rotary is None else (rotary[2], rotary[3].shape[-1])  # (query heads, head size)
    rope = config is not None and rotary is not None and kernels.fusion_pays("rotary", x, weight, bias, config, heads)
    h, x = (x, x) if norm_inside else add_norm(norm, x, delta, fast)
    if norm_inside or gated or rope:
        inside = (norm.weight, norm.variance_epsilon) if norm_inside else None
        y = kernels.gemv(h, weight, bias, config, norm=inside, gated=gated, rotary=rotary if rope else None)
    else:
        y = project(h, weight, bias, fast)
    if rotary is not None:
        y = y.unflatten(-1, (-1, heads[1]))  # y: [N, W, Hq, D] (rotated inside), or [N, W, Hq + 2 Hkv, D]
        return (y if rope else kernels.rotary_into_cache_(y, *rotary)), x
    return y if gated or act_fn is None else activate(act_fn, y, fast), x


def add_project(module: nn.Module, a: torch.Tensor, x: torch.Tensor, fast: bool) -> tuple[torch.Tensor, ...]:
    """The residual stream `x` and what `module` adds to it from `a`: `(x + module(a), None)` by one GEMV where
    `fast` allows it, it was chosen for this product and `kernels.GEMV_FUSION` is on (the sum in its epilogue, for
    the next norm to run inside its GEMV); else `(x, module(a))`, for the next norm's kernel to add."""
    if fast and kernels.GEMV_FUSION and plain_linear(module):
        config = kernels.gemv_config(a, module.weight, module.bias)
        if config is not None:
            return kernels.gemv(a, module.weight, module.bias, config, residual=x), None
    return x, linear(module, a, fast)


def add_norm(norm: nn.Module, x: torch.Tensor, delta: torch.Tensor | None, fast: bool) -> tuple[torch.Tensor, ...]:
    """`(norm(x + delta), x + delta)` (`delta` None: nothing added), in one kernel when `fast` allows it."""
    if fast and _rms_norm_kernel(norm, x):
        return kernels.add_rms_norm(x, norm.weight, norm.variance_epsilon, delta)
    x = x if delta is None else x + delta
    return rms_norm(norm, x), x


def rotate(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotary embedding of heads `qk` `(N, W, Hqk, D)` at `cos`, `sin` `(N, W, D)`."""
    cos, sin = cos[:, :, None], sin[:, :, None]  # over heads: [N, W, 1, D]
    return qk * cos + rotate_half(qk) * sin


def activate(act_fn: nn.Module, gate_up: torch.Tensor, fast: bool) -> torch.Tensor:
    """`act_fn(gate) * up` from the fused `gate_up` `(..., 2 I)`; SiLU in one kernel when `fast`."""
    if fast and _silu_kernel(act_fn):
        return kernels.silu_mul(gate_up)
    gate, up = gate_up.chunk(2, -1)
    return act_fn(gate) * up


def _rms_norm_kernel(norm: nn.Module, x: torch.Tensor) -> bool:
    """Whether the kernels may compute `norm` of `x` (an RMS norm of `RMS_NORMS` with a weight of x's dtype)."""
    return type(norm).__name__ in RMS_NORMS and norm.weight.dtype == x.dtype


def _silu_kernel(act_fn: nn.Module) -> bool:
    """Whether `act_fn` is the SiLU the kernels compute."""
    return type(act_fn).__name__ in ("SiLUActivation", "SiLU")


def rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`norm(x)` for the RMS norms of `RMS_NORMS` through `F.rms_norm` (in float32, as they compute), others as
    they are."""
    if type(norm).__name__ not in RMS_NORMS:
        return norm(x)
    return norm.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=norm.variance_epsilon).to(x.dtype)
