"""Atomic writes: build next to the destination, then rename; a failure leaves the old one."""

import contextlib
import os
import shutil
import tempfile


@contextlib.contextmanager
def atomic_path(path, directory=False):
    """Yields a temporary path beside ``path``; on success it replaces ``path`` in one rename."""
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", dir=parent)
    target = os.path.join(tmp, "out")
    try:
        yield target
        if not os.path.exists(target):
            raise RuntimeError(f"nothing was written for {path}")
        if directory and os.path.isdir(path):
            old = path + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)  # directories cannot be replaced in one step
            os.replace(target, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
