"""Model surgery: fold norms, untie embeddings, absorb R1 / R2 / R4.

Row-vector convention (``nn.Linear``: ``y = x @ W.T``). With the residual
stream rotated as ``h' = h @ R1``:

* embeddings: ``E' = E @ R1``;
* linears that read the residual (q, k, v, gate, up, lm_head): ``W' = W @ R1``;
* linears that write it (o_proj, down_proj): ``W' = R1.T @ W`` (bias ``b @ R1``).

R2 (head_dim x head_dim, one per layer) rotates every V head
(``W_v[h]' = R2.T @ W_v[h]``) and, transposed, every head slice of the
o_proj input (``W_o[:, h]' = W_o[:, h] @ R2``). R4 is the online Hadamard
on the down_proj input: ``W_down' = W_down @ H4`` while the runtime applies
``z @ H4`` (``H4`` block-diagonal with block ``r4_size``). R3 (Q and K after
RoPE) has nothing to absorb; ``spinquant_offline.fake_quant`` applies it.

:func:`rotated_weights` is the one place that maps (weights, R1, R2s) to
rotated weights: rotation learning differentiates through it and
:func:`absorb_rotations` writes its result into the model.
"""

from __future__ import annotations

import torch
from torch import nn

from spinquant_kernels.format import Rotation
from spinquant_kernels.hadamard import hadamard_transform_ref, random_hadamard_matrix

from .model import SUPPORTED_ARCHITECTURES

READ_ATTN = ("q_proj", "k_proj", "v_proj")
READ_MLP = ("gate_proj", "up_proj")


def check_supported(model: nn.Module) -> None:
    """Raise unless ``model`` is a Llama-structured causal LM this module can rotate."""
    arch = type(model).__name__
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unsupported architecture {arch}; SpinQuant surgery supports "
                         f"{list(SUPPORTED_ARCHITECTURES)}")
    cfg = model.config
    if getattr(cfg, "hidden_act", "silu") not in ("silu", "swish"):
        raise ValueError(f"unsupported MLP activation {cfg.hidden_act!r}; expected silu")
    for layer in model.model.layers:
        for name in ("input_layernorm", "post_attention_layernorm"):
            if not hasattr(layer, name):
                raise ValueError(f"layer has no {name}: not a Llama-structured decoder layer")


def head_dim(model: nn.Module) -> int:
    cfg = model.config
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


# ----------------------------------------------------------------------------
# norm folding
# ----------------------------------------------------------------------------
@torch.no_grad()
def fuse_norms(model: nn.Module) -> None:
    """Untie the embeddings and fold every RMSNorm gain into its readers (in place).

    After this the norm gains are 1 and the model computes the same function.
    """
    check_supported(model)
    emb = model.model.embed_tokens.weight
    if model.lm_head.weight.data_ptr() == emb.data_ptr():
        model.lm_head.weight = nn.Parameter(emb.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False

    def fold(norm: nn.Module, readers: list[nn.Linear]) -> None:
        g = norm.weight.double()
        for lin in readers:
            lin.weight.copy_((lin.weight.double() * g[None, :]).to(lin.weight.dtype))
        norm.weight.fill_(1.0)

    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        fold(layer.input_layernorm, [getattr(attn, n) for n in READ_ATTN])
        fold(layer.post_attention_layernorm, [getattr(mlp, n) for n in READ_MLP])
    fold(model.model.norm, [model.lm_head])


# ----------------------------------------------------------------------------
# rotations
# ----------------------------------------------------------------------------
def init_rotations(model: nn.Module, rotation: Rotation | str, generator: torch.Generator | None = None,
                   dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Initial ``(R1 (H, H), [R2 (hd, hd)] * layers)``: identity or random Hadamard."""
    rotation = Rotation(rotation)
    H, hd, L = model.config.hidden_size, head_dim(model), len(model.model.layers)
    if rotation == Rotation.NONE:
        return torch.eye(H, dtype=dtype), [torch.eye(hd, dtype=dtype) for _ in range(L)]
    R1 = random_hadamard_matrix(H, generator=generator, dtype=dtype)
    R2s = [random_hadamard_matrix(hd, generator=generator, dtype=dtype) for _ in range(L)]
    return R1, R2s


def rotation_targets(model: nn.Module) -> list[str]:
    """Names of the parameters :func:`rotated_weights` produces."""
    names = ["model.embed_tokens.weight", "lm_head.weight"]
    for i, layer in enumerate(model.model.layers):
        p = f"model.layers.{i}"
        for n in READ_ATTN + ("o_proj",):
            names.append(f"{p}.self_attn.{n}.weight")
            if getattr(layer.self_attn, n).bias is not None and n in ("v_proj", "o_proj"):
                names.append(f"{p}.self_attn.{n}.bias")
        for n in READ_MLP + ("down_proj",):
            names.append(f"{p}.mlp.{n}.weight")
    return names


def rotated_weights(model: nn.Module, base: dict[str, torch.Tensor], R1: torch.Tensor,
                    R2s: list[torch.Tensor], r4_size: int = 0) -> dict[str, torch.Tensor]:
    """Rotated copies of the parameters named by :func:`rotation_targets`.

    ``base`` maps those names to the norm-folded, unrotated weights. Computed
    in ``R1``'s dtype; differentiable in ``R1`` and ``R2s``.
    """
    dt = R1.dtype
    cfg = model.config
    hd = head_dim(model)
    nkv, nh = cfg.num_key_value_heads, cfg.num_attention_heads
    out: dict[str, torch.Tensor] = {}

    def w(name: str) -> torch.Tensor:
        return base[name].to(dt)

    out["model.embed_tokens.weight"] = w("model.embed_tokens.weight") @ R1
    out["lm_head.weight"] = w("lm_head.weight") @ R1
    for i, R2 in enumerate(R2s):
        p = f"model.layers.{i}"
        R2 = R2.to(dt)
        for n in ("q_proj", "k_proj"):
            out[f"{p}.self_attn.{n}.weight"] = w(f"{p}.self_attn.{n}.weight") @ R1
        wv = (w(f"{p}.self_attn.v_proj.weight") @ R1).reshape(nkv, hd, -1)
        out[f"{p}.self_attn.v_proj.weight"] = torch.einsum("ji,hjk->hik", R2, wv).reshape(nkv * hd, -1)
        if f"{p}.self_attn.v_proj.bias" in base:
            bv = w(f"{p}.self_attn.v_proj.bias").reshape(nkv, hd)
            out[f"{p}.self_attn.v_proj.bias"] = (bv @ R2).reshape(-1)
        wo = w(f"{p}.self_attn.o_proj.weight").reshape(-1, nh, hd)
        wo = torch.einsum("knj,ji->kni", wo, R2).reshape(-1, nh * hd)
        out[f"{p}.self_attn.o_proj.weight"] = R1.T @ wo
        if f"{p}.self_attn.o_proj.bias" in base:
            out[f"{p}.self_attn.o_proj.bias"] = w(f"{p}.self_attn.o_proj.bias") @ R1
        for n in READ_MLP:
            out[f"{p}.mlp.{n}.weight"] = w(f"{p}.mlp.{n}.weight") @ R1
        wd = w(f"{p}.mlp.down_proj.weight")
        if r4_size:
            wd = hadamard_transform_ref(wd, r4_size)
        out[f"{p}.mlp.down_proj.weight"] = R1.T @ wd
    return out


def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of the parameters that :func:`rotated_weights` reads."""
    params = dict(model.named_parameters())
    return {n: params[n].detach().clone() for n in rotation_targets(model)}


@torch.no_grad()
def absorb_rotations(model: nn.Module, R1: torch.Tensor, R2s: list[torch.Tensor],
                     r4_size: int = 0) -> None:
    """Write the rotated weights into ``model`` (in place, computed in float64).

    The model must have been through :func:`fuse_norms`. With ``r4_size`` the
    down_proj input must get the online Hadamard at run time.
    """
    if len(R2s) != len(model.model.layers):
        raise ValueError(f"need one R2 per layer: {len(model.model.layers)} layers, got {len(R2s)}")
    H, hd = model.config.hidden_size, head_dim(model)
    if tuple(R1.shape) != (H, H):
        raise ValueError(f"R1 must be ({H}, {H}), got {tuple(R1.shape)}")
    for R2 in R2s:
        if tuple(R2.shape) != (hd, hd):
            raise ValueError(f"R2 must be ({hd}, {hd}), got {tuple(R2.shape)}")
    if r4_size and model.config.intermediate_size % r4_size:
        raise ValueError(f"r4_size {r4_size} must divide intermediate_size {model.config.intermediate_size}")
    params = dict(model.named_parameters())
    dev = model.model.embed_tokens.weight.device
    new = rotated_weights(model, base_weights(model), R1.to(dev, torch.float64),
                          [r.to(dev, torch.float64) for r in R2s], r4_size)
    for name, t in new.items():
        params[name].copy_(t.to(params[name].dtype))
