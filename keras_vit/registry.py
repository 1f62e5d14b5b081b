"""Model registry with timm-compatible names: register_model, list_models, create_model."""

import difflib
import fnmatch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)

_MODELS = {}


def register_model(fn=None, *, default_cfg=None):
    """Registers a builder under its function name; ``default_cfg`` holds its preprocessing."""

    def wrap(f):
        if f.__name__ in _MODELS:
            raise ValueError(f"model {f.__name__!r} is registered twice")
        cfg = dict(input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bicubic",
                   crop_pct=0.9, num_classes=1000)
        cfg.update(default_cfg or {})
        cfg["family"] = f.__module__.rsplit(".", 1)[-1]
        _MODELS[f.__name__] = (f, cfg)
        return f

    return wrap(fn) if fn is not None else wrap


def register_variant(name, build, module, default_cfg=None, **defaults):
    """Registers ``name`` as ``build(name=name, **defaults)``; call-time kwargs override defaults."""

    def builder(**kwargs):
        return build(name=name, **{**defaults, **kwargs})

    builder.__name__ = builder.__qualname__ = name
    builder.__module__ = module
    builder.__doc__ = f"``{name}``: " + ", ".join(f"{k}={v}" for k, v in defaults.items())
    default_cfg = dict(default_cfg or {})
    default_cfg.setdefault("num_classes", defaults.get("num_classes", 1000))
    return register_model(builder, default_cfg=default_cfg)


def list_models(pattern="*"):
    """Sorted registered names matching an fnmatch pattern (``"swin*"``)."""
    _import_families()
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def get_model_config(name):
    """The default config (input size, mean, std, interpolation, crop, family) of a model."""
    _import_families()
    _check_name(name)
    return dict(_MODELS[name][1])


def _check_name(name):
    if name not in _MODELS:
        close = difflib.get_close_matches(name, list(_MODELS), n=5, cutoff=0.5)
        hint = f"; closest: {', '.join(close)}" if close else ""
        raise ValueError(f"Unknown model {name!r}{hint}. keras_vit.list_models() lists all "
                         f"{len(_MODELS)}.")


def create_model(name, pretrained=None, **kwargs):
    """Builds a registered model; ``pretrained`` is a path to a timm/PyTorch/JAX checkpoint.

    Keyword arguments (num_classes, img_size, in_chans, drop_path_rate,
    features_only, out_indices, ...) override the variant's defaults; None
    leaves the default.
    """
    _import_families()
    _check_name(name)
    fn, _ = _MODELS[name]
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    model = fn(**kwargs)
    if pretrained:
        from keras_vit.convert import load_checkpoint, load_timm_weights

        jax = str(pretrained).endswith(".npz")
        load_timm_weights(model, load_checkpoint(pretrained), strict=True,
                          interpolation="bilinear" if jax else "bicubic", antialias=not jax)
    return model


def _import_families():
    import keras_vit.models  # noqa: F401  (registers every family)
