"""Pretrained weights by timm name: ``"model.tag"`` -> timm's Hugging Face Hub repository.

``pretrained_tags.json`` (written by ``tools/pretrained_tags.py`` from timm's
pretrained configs, so timm is not needed here) lists, for every registered
model that timm has, its tags, timm's default tag, and per tag the hub
repository and the checkpoint's head and preprocessing. The weights are
timm's state dict as ``model.safetensors`` in that repository, fetched once
by ``huggingface_hub`` into its standard cache (``HF_HOME`` / ``HF_HUB_CACHE``;
``HF_HUB_OFFLINE=1`` reads the cache only).
"""

import fnmatch
import functools
import json
import os

_TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrained_tags.json")


@functools.lru_cache(maxsize=None)
def _table():
    with open(_TABLE_PATH) as f:
        return json.load(f)


def split_tag(name):
    """``"vit_small_patch16_224.augreg_in1k"`` -> ``("vit_small_patch16_224", "augreg_in1k")``;
    the tag is None when the name has none."""
    model, _, tag = name.partition(".")
    return model, tag or None


def pretrained_names(models, pattern="*"):
    """The resolvable ``"model.tag"`` names of ``models`` matching an fnmatch pattern, sorted."""
    entries = _table()["models"]
    names = (f"{m}.{tag}" for m in models if m in entries for tag in entries[m]["tags"])
    return sorted(n for n in names if fnmatch.fnmatch(n, pattern))


def resolve_tag(model, tag, family):
    """timm's pretrained config of ``model.tag`` (timm's default tag when ``tag`` is None).

    Returns the tag's entry (hf_hub_id, num_classes, input_size, mean, std,
    crop_pct, interpolation, license) with ``tag`` added; a model timm does
    not have, an unknown tag, or one whose weights are not in a timm hub
    repository raises a ValueError that says so.
    """
    table = _table()
    entry = table["models"].get(model)
    if entry is None:
        raise ValueError(
            f"{model!r} has no pretrained weights on the Hugging Face Hub through timm (timm "
            f"{table['timm_version']} does not have it): load the official checkpoint file with "
            f"create_model({model!r}, pretrained=PATH); the docstring of "
            f"keras_vit.models.{family} names the official code it mirrors.")
    tag = tag or entry["default_tag"]
    if tag in entry["tags"]:
        return dict(entry["tags"][tag], tag=tag)
    known = ", ".join(entry["tags"]) or "none"
    if tag in entry["unresolvable"]:
        raise ValueError(f"timm's {model}.{tag} cannot be fetched by name: "
                         f"{entry['unresolvable'][tag]}. Tags with hub weights: {known}.")
    raise ValueError(f"Unknown pretrained tag {tag!r} for {model!r}; tags with hub weights: "
                     f"{known}.")


def tag_config(hub_cfg):
    """A tag's entry as the keys of ``get_model_config`` (tuples where the registry has them)."""
    size = hub_cfg["input_size"]
    return dict(input_size=tuple(size) if isinstance(size, list) else size,
                num_classes=hub_cfg["num_classes"], mean=tuple(hub_cfg["mean"]),
                std=tuple(hub_cfg["std"]), crop_pct=hub_cfg["crop_pct"],
                interpolation=hub_cfg["interpolation"], pretrained_tag=hub_cfg["tag"],
                hf_hub_id=hub_cfg["hf_hub_id"])


def download(repo_id):
    """The local path of a hub repository's ``model.safetensors``, downloaded once to the cache."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

    filename = _table()["hub_filename"]
    try:
        return hf_hub_download(repo_id, filename, library_name="keras-vit")
    except (EntryNotFoundError, HfHubHTTPError) as e:
        if constants.HF_HUB_OFFLINE:
            where = (f"it is not in the Hugging Face cache {constants.HF_HUB_CACHE} and "
                     "HF_HUB_OFFLINE is set")
        else:
            where = f"{type(e).__name__}: {str(e).rstrip('.')}"
        raise FileNotFoundError(
            f"Cannot get {filename} of the Hugging Face Hub repository {repo_id}: {where}. "
            "Download it once with network access, or pass pretrained=PATH to a local "
            "checkpoint file.") from e
