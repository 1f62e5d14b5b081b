"""Writes the timm parity fixtures of tests/fixtures/<family>/ (run by hand; needs torch + timm).

    /path/to/torch-venv/bin/python tools/make_parity_fixtures.py vit swin ...   (default: all)

Each family has a module tools/fixtures/<family>.py with ``make(out_dir)``
returning fixture entries and ``MODEL_PATTERNS`` (registered names whose timm
parameter counts are recorded). A fixture is a small configuration of a timm
model with randomised weights:
  <family>/NAME.safetensors   the timm state dict
  <family>/NAME.npz           input x (NHWC), timm's output(s) y0, y1, ...
  <family>/fixtures.json      per fixture: the keras_vit builder, its kwargs, the weights file
  <family>/timm_param_counts.json   timm's params and num_classes for every full-size variant
The tests build the Keras model, load the weights through load_timm_weights
(the path users take) and compare.
"""

import argparse
import fnmatch
import importlib
import json
import os
import sys
import types

import numpy as np
import torch
import timm
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "tests", "fixtures")
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)


def randomise(model, seed):
    """Replaces timm's init (tiny tokens, unit norms) by values that make every weight matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.1
            leaf = name.rsplit(".", 2)
            is_norm_weight = name.endswith("weight") and len(leaf) > 1 and "norm" in leaf[-2]
            if is_norm_weight or name.endswith(("bn.weight", "gamma")):
                p.copy_(1.0 + noise)
            else:
                p.copy_(noise * (3.0 if "token" in name or "pos_embed" in name else 1.0))
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
            elif name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    return model.eval()


def run(model, x_nhwc):
    with torch.no_grad():
        out = model(torch.from_numpy(x_nhwc).permute(0, 3, 1, 2).contiguous())
    outs = out if isinstance(out, (tuple, list)) else [out]
    # Feature maps come back NCHW from torch; store them NHWC like the Keras models.
    return [o.permute(0, 2, 3, 1).numpy() if o.ndim == 4 else o.numpy() for o in outs]


def write(out_dir, name, model, keras_builder, keras_kwargs, img_size, seed, weights=None,
          **extra):
    """Saves weights (unless ``weights`` names an existing file), input and timm's output.

    Returns the index entry. ``extra`` is stored in it (e.g. load options).
    """
    rng = np.random.default_rng(seed)
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    x = rng.standard_normal((2, h, w, 3)).astype(np.float32)
    outputs = run(model, x)
    if weights is None:
        weights = f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  os.path.join(out_dir, weights))
    np.savez(os.path.join(out_dir, f"{name}.npz"), x=x,
             **{f"y{i}": o for i, o in enumerate(outputs)})
    print(f"{name}: {sum(p.numel() for p in model.parameters())} params, outputs "
          f"{[o.shape for o in outputs]}")
    return dict(builder=keras_builder, kwargs=keras_kwargs, weights=weights, **extra)


class Intermediates(torch.nn.Module):
    """timm's ``forward_intermediates`` as the forward: the block or stage maps of ``indices``
    (every one when None), NCHW, the reference for features_only (write() stores them NHWC)."""

    def __init__(self, model, indices=None):
        super().__init__()
        self.model, self.indices = model, indices

    def forward(self, x):
        return self.model.forward_intermediates(x, indices=self.indices, intermediates_only=True)


def write_with_features(out_dir, name, model, keras_builder, keras_kwargs, img_size, seed,
                        indices=None):
    """Fixture ``name`` (input seed ``seed``) and its features_only twin ``<name>_features``
    (the same weights; input seed ``seed + 1``): timm's maps of ``indices``, every one when
    None. Returns both index entries."""
    features_kwargs = dict(keras_kwargs, features_only=True)
    if indices is not None:
        features_kwargs["out_indices"] = list(indices)
    return {name: write(out_dir, name, model, keras_builder, keras_kwargs, img_size, seed),
            f"{name}_features": write(out_dir, f"{name}_features",
                                      Intermediates(model, indices).eval(), keras_builder,
                                      features_kwargs, img_size, seed + 1,
                                      weights=f"{name}.safetensors")}


def import_official(env_var, url, package, module):
    """``models/<module>.py`` of an official repository's checkout, named by ``env_var``.

    ``$env_var/models`` is imported as a package of its own, ``package``, without running
    its ``__init__`` (which imports variants and dependencies the fixtures do not need) and
    without putting the checkout on sys.path (repositories vendor old copies of timm).
    """
    repo = os.environ.get(env_var)
    if not repo or not os.path.isdir(os.path.join(repo, "models")):
        raise SystemExit(f"set {env_var} to a checkout of {url}")
    if package not in sys.modules:
        pkg = types.ModuleType(package)
        pkg.__path__ = [os.path.join(repo, "models")]
        sys.modules[package] = pkg
    return importlib.import_module(f"{package}.{module}")


def param_counts(patterns):
    """timm's parameter count and default num_classes of every registered keras_vit name
    matching ``patterns`` that timm has (built on the meta device: no memory)."""
    os.environ.setdefault("KERAS_BACKEND", "torch")  # the registry imports keras; no TF here
    import keras_vit.registry as registry

    registry._import_families()
    counts = {}
    for name in sorted(registry._MODELS):
        if not any(fnmatch.fnmatch(name, p) for p in patterns) or not timm.is_model(name):
            continue
        with torch.device("meta"):
            m = timm.create_model(name)
        counts[name] = dict(params=sum(p.numel() for p in m.parameters()),
                            num_classes=m.num_classes)
    return counts


def main():
    families = sorted(f[:-3] for f in os.listdir(os.path.join(HERE, "fixtures"))
                      if f.endswith(".py") and not f.startswith("_"))
    ap = argparse.ArgumentParser()
    ap.add_argument("families", nargs="*", choices=families + [[]], default=families)
    ap.add_argument("--no-counts", action="store_true")
    args = ap.parse_args()
    for family in args.families or families:
        module = importlib.import_module(f"fixtures.{family}")
        out_dir = os.path.join(FIXTURES, family)
        os.makedirs(out_dir, exist_ok=True)
        torch.manual_seed(0)  # each family's make() starts from the same torch RNG state
        index = module.make(out_dir)
        with open(os.path.join(out_dir, "fixtures.json"), "w") as f:
            json.dump(index, f, indent=1, sort_keys=True)
        if not args.no_counts and getattr(module, "MODEL_PATTERNS", None):
            counts = param_counts(module.MODEL_PATTERNS)
            with open(os.path.join(out_dir, "timm_param_counts.json"), "w") as f:
                json.dump(counts, f, indent=1, sort_keys=True)
            print(f"{family}: timm param counts of {len(counts)} models")


if __name__ == "__main__":
    main()
