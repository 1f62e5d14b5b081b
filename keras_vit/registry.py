"""Model registry with timm-compatible names: register_model, list_models, create_model.

A name may carry timm's pretrained tag (``"vit_small_patch16_224.augreg_in1k"``):
the model is then built with that checkpoint's head and input size, and
``pretrained=True`` loads its weights from the Hugging Face Hub (``pretrained.py``).
"""

import difflib
import fnmatch

from keras_vit.pretrained import download, pretrained_names, resolve_tag, split_tag, tag_config

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
                   crop_pct=0.9, num_classes=1000, task="classification")
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


def list_pretrained(pattern="*"):
    """Sorted ``"model.tag"`` names with hub weights matching an fnmatch pattern (``"vit_s*"``)."""
    return pretrained_names(list_models(), pattern)


def get_model_config(name):
    """The default config (input size, mean, std, interpolation, crop, family) of a model.

    A tagged name gets its checkpoint's num_classes, input size and preprocessing
    (timm's pretrained config), plus ``pretrained_tag`` and ``hf_hub_id``.
    """
    _import_families()
    model, tag = split_tag(name)
    _check_name(model)
    cfg = dict(_MODELS[model][1])
    if tag is not None:
        cfg.update(tag_config(resolve_tag(model, tag, cfg["family"])))
    return cfg


def model_task(model):
    """The task of a built model: its registered variant's, else that of the task package
    (keras_vit.segmentation / keras_vit.detection) whose layers are in it (a model built from
    a builder under its own name), else "classification"."""
    if model.name in _MODELS:
        return _MODELS[model.name][1]["task"]
    for layer in model._flatten_layers():
        for task in ("segmentation", "detection"):
            if type(layer).__module__.startswith(f"keras_vit.{task}."):
                return task
    return "classification"


def _check_name(name):
    if name not in _MODELS:
        close = difflib.get_close_matches(name, list(_MODELS), n=5, cutoff=0.5)
        hint = f"; closest: {', '.join(close)}" if close else ""
        raise ValueError(f"Unknown model {name!r}{hint}. keras_vit.list_models() lists all "
                         f"{len(_MODELS)}.")


def create_model(name, pretrained=None, dtype_policy=None, **kwargs):
    """Builds a registered model, optionally with pretrained weights.

    ``name`` may carry a timm pretrained tag (``"vit_small_patch16_224.augreg_in21k"``):
    the model gets that checkpoint's num_classes and input size. ``pretrained``
    is True (timm's weights of the tag, or of timm's default tag, from the
    Hugging Face Hub) or a path to a timm/PyTorch/JAX checkpoint; either loads
    strictly. Keyword arguments (num_classes, img_size, in_chans,
    drop_path_rate, features_only, out_indices, ...) override the variant's
    and the tag's defaults; None leaves the default. A ``num_classes`` other than
    the checkpoint's gives a new, freshly initialised classifier on the pretrained
    body (timm's behaviour for fine-tuning); every other weight loads strictly.
    ``dtype_policy`` ("mixed_bfloat16", "bfloat16", ...; default the global Keras policy)
    builds every layer under that Keras dtype policy (see keras_vit.precision).
    """
    _import_families()
    model_name, tag = split_tag(name)
    _check_name(model_name)
    fn, cfg = _MODELS[model_name]
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    num_classes = kwargs.get("num_classes")
    if tag is not None or pretrained is True:
        checkpoint_cfg = tag_config(resolve_tag(model_name, tag, cfg["family"]))
        # Fetched before building, so that a missing file fails fast.
        if pretrained is True:
            pretrained = download(checkpoint_cfg["hf_hub_id"])
        kwargs = {"num_classes": checkpoint_cfg["num_classes"],
                  "img_size": checkpoint_cfg["input_size"], **kwargs}
    if dtype_policy is None:
        model = fn(**kwargs)
    else:
        from keras_vit.precision import dtype_policy_scope

        with dtype_policy_scope(dtype_policy):
            model = fn(**kwargs)
    if pretrained:
        from keras_vit.convert import load_checkpoint, load_timm_weights

        jax = str(pretrained).endswith(".npz")
        # num_classes asked for: fine-tuning, a new head where the checkpoint's has other classes.
        load_timm_weights(model, load_checkpoint(pretrained), strict=True,
                          new_classifier=num_classes is not None,
                          features_only=bool(kwargs.get("features_only")),
                          interpolation="bilinear" if jax else "bicubic", antialias=not jax)
    return model


def _import_families():
    import keras_vit.models  # noqa: F401  (registers every family)
    import keras_vit.detection  # noqa: F401
    import keras_vit.segmentation  # noqa: F401
