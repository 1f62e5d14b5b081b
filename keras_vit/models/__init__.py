"""Model families, one file each; importing this package registers every variant.

Every module here except ``common`` (shared builders) and ``introspect`` (reading
blocks' attention out of a built model) is a family and is imported automatically, so a
new family file needs no edit of this one.
"""

import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    if _info.name not in ("common", "introspect") and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

from keras_vit.models.vit import distilled_inference_model, vision_transformer  # noqa: E402

__all__ = ["distilled_inference_model", "vision_transformer"]
