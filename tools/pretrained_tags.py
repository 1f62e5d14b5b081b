"""Writes keras_vit/pretrained_tags.json, timm's pretrained tags of the models keras_vit registers.

    /path/to/torch-venv/bin/python tools/pretrained_tags.py [--project-python .venv/bin/python]

Run by hand with timm installed (the package reads the JSON and never imports
timm). The registered names come from the project's own interpreter
(``--project-python``, which has TensorFlow), since the timm environment need
not have it. For each registered model that timm knows, every pretrained tag
in timm's order (the first is timm's default) with what keras_vit needs:
the Hugging Face Hub repository and the preprocessing / head of the
checkpoint (timm's ``pretrained_cfg``). A tag is resolvable when its weights
are in one of timm's own hub repositories (``timm/<model>.<tag>``), which hold
timm's state dict as ``model.safetensors``; other tags are listed under
``unresolvable`` with the reason.
"""

import argparse
import json
import os
import subprocess

import timm
from timm.models import get_arch_pretrained_cfgs, get_pretrained_cfg, is_model

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OUT = os.path.join(ROOT, "keras_vit", "pretrained_tags.json")
LIST_MODELS = "import json, keras_vit; print(json.dumps(keras_vit.list_models()))"


def registered_models(project_python):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run([project_python, "-c", LIST_MODELS], cwd=ROOT, env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def unresolvable_reason(cfg):
    if not cfg.hf_hub_id:
        return "no Hugging Face Hub repository (" + ("only a download URL" if cfg.url
                                                   else "timm has no weights") + ")"
    if not cfg.hf_hub_id.startswith("timm/"):
        return f"hub repository {cfg.hf_hub_id} is not one of timm's"
    if cfg.hf_hub_filename:
        return f"hub file {cfg.hf_hub_filename} is not timm's model.safetensors"
    return None


def tag_entry(cfg):
    _, height, width = cfg.input_size
    return dict(hf_hub_id=cfg.hf_hub_id, num_classes=cfg.num_classes,
                input_size=height if height == width else [height, width],
                mean=list(cfg.mean), std=list(cfg.std), crop_pct=cfg.crop_pct,
                interpolation=cfg.interpolation, license=cfg.license)


def model_entry(name):
    tags, unresolvable = {}, {}
    for full_name, cfg in get_arch_pretrained_cfgs(name).items():
        tag = full_name.partition(".")[2]
        reason = unresolvable_reason(cfg)
        if reason:
            unresolvable[tag] = reason
        else:
            tags[tag] = tag_entry(cfg)
    return dict(default_tag=get_pretrained_cfg(name).tag, tags=tags, unresolvable=unresolvable)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--project-python", default=os.path.join(ROOT, ".venv", "bin", "python"))
    parser.add_argument("--out", default=OUT)
    args = parser.parse_args()
    names = registered_models(args.project_python)
    models = {n: model_entry(n) for n in names if is_model(n)}
    table = dict(timm_version=timm.__version__, hub_filename="model.safetensors", models=models)
    with open(args.out, "w") as f:
        json.dump(table, f, indent=1, sort_keys=True)
        f.write("\n")
    resolvable = sum(len(m["tags"]) for m in models.values())
    print(f"{args.out}: {len(models)} of {len(names)} registered models in timm "
          f"{timm.__version__}, {resolvable} resolvable tags; not in timm: "
          f"{', '.join(n for n in names if n not in models)}")


if __name__ == "__main__":
    main()
