"""ViT / DeiT: the original JAX (.npz) checkpoint layout -> timm's state-dict layout.

The Keras side needs no mapping of its own: ViT layers are named as timm's
modules, so ``core.load_timm_weights`` takes the converted dict.
"""

import numpy as np


def _find_prefix(w):
    for prefix in ("", "opt/target/", "params/"):
        if f"{prefix}embedding/kernel" in w:
            return prefix
    raise ValueError("not a ViT JAX checkpoint: no 'embedding/kernel' key (looked under '', "
                     "'opt/target/', 'params/')")


def jax_npz_to_timm(w):
    """Original ViT / AugReg .npz arrays -> a timm ``VisionTransformer`` state dict (numpy).

    As timm's ``_load_weights``: q/k/v kernels (D, H, d) fused into qkv,
    the attention output (H, d, D) flattened, Dense kernels transposed to
    torch's (out, in). Load it with ``load_timm_weights(...,
    interpolation="bilinear", antialias=False)`` to resample its position
    embedding as timm's ``_load_weights`` does.
    """
    p = _find_prefix(w)
    sd = {}

    def linear(dst, src):
        sd[f"{dst}.weight"] = np.asarray(w[f"{src}/kernel"]).T
        sd[f"{dst}.bias"] = np.asarray(w[f"{src}/bias"])

    def norm(dst, src):
        sd[f"{dst}.weight"] = np.asarray(w[f"{src}/scale"])
        sd[f"{dst}.bias"] = np.asarray(w[f"{src}/bias"])

    sd["patch_embed.proj.weight"] = np.transpose(w[f"{p}embedding/kernel"], (3, 2, 0, 1))
    sd["patch_embed.proj.bias"] = np.asarray(w[f"{p}embedding/bias"])
    if f"{p}cls" in w:
        sd["cls_token"] = np.asarray(w[f"{p}cls"])
    sd["pos_embed"] = np.asarray(w[f"{p}Transformer/posembed_input/pos_embedding"])
    norm("norm", f"{p}Transformer/encoder_norm")
    if f"{p}head/kernel" in w:
        linear("head", f"{p}head")
    if f"{p}pre_logits/kernel" in w:
        linear("pre_logits.fc", f"{p}pre_logits")
    i = 0
    while f"{p}Transformer/encoderblock_{i}/LayerNorm_0/scale" in w:
        b, t = f"{p}Transformer/encoderblock_{i}/", f"blocks.{i}."
        mha = b + "MultiHeadDotProductAttention_1/"
        norm(t + "norm1", b + "LayerNorm_0")
        norm(t + "norm2", b + "LayerNorm_2")
        sd[t + "attn.qkv.weight"] = np.concatenate(
            [np.asarray(w[f"{mha}{n}/kernel"]).reshape(w[f"{mha}{n}/kernel"].shape[0], -1).T
             for n in ("query", "key", "value")])
        sd[t + "attn.qkv.bias"] = np.concatenate(
            [np.asarray(w[f"{mha}{n}/bias"]).reshape(-1) for n in ("query", "key", "value")])
        out = np.asarray(w[f"{mha}out/kernel"])
        sd[t + "attn.proj.weight"] = out.reshape(-1, out.shape[-1]).T
        sd[t + "attn.proj.bias"] = np.asarray(w[f"{mha}out/bias"])
        linear(t + "mlp.fc1", b + "MlpBlock_3/Dense_0")
        linear(t + "mlp.fc2", b + "MlpBlock_3/Dense_1")
        i += 1
    return sd

