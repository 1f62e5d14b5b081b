"""Reading checkpoints from disk: safetensors, JAX .npz (original ViT), PyTorch .pth/.bin."""

import os

import numpy as np


def load_checkpoint(path):
    """A checkpoint file as a timm-layout state dict of numpy arrays.

    .safetensors: read directly. .npz: the original ViT / AugReg JAX
    checkpoints, converted to timm's layout. .pth/.pt/.bin: only when torch is
    importable, read with ``weights_only=True`` (no pickled code runs).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".safetensors":
        from safetensors.numpy import load_file

        return load_file(path)
    if ext == ".npz":
        from keras_vit.convert.vit import jax_npz_to_timm

        with np.load(path) as data:
            return jax_npz_to_timm({k: data[k] for k in data.files})
    if ext in (".pth", ".pt", ".bin"):
        try:
            import torch
        except ImportError as e:
            raise ImportError(f"reading {path!r} needs torch; convert it to .safetensors, or "
                              "pip install torch") from e
        sd = torch.load(path, map_location="cpu", weights_only=True)
        for nest in ("model", "state_dict", "model_ema"):
            if isinstance(sd, dict) and nest in sd and isinstance(sd[nest], dict):
                sd = sd[nest]
                break
        return {k: v.float().numpy() for k, v in sd.items() if hasattr(v, "numpy")}
    raise ValueError(f"unsupported checkpoint format {ext!r} for {path!r}; expected .safetensors, "
                     ".npz, .pth, .pt or .bin")
