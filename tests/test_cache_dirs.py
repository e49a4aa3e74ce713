"""The suite caches nothing in the user's home (tests/conftest.py points every cache at a session folder)."""

import os
import subprocess
import sys
from pathlib import Path

from conftest import SESSION_CACHE

from spectralds.io import cache_dir


def test_every_cache_the_suite_uses_is_in_the_session_folder():
    import datasets.config
    import huggingface_hub.constants
    import matplotlib

    caches = {
        "spectralds": cache_dir(),
        "datasets": datasets.config.HF_DATASETS_CACHE,
        "hub": huggingface_hub.constants.HF_HUB_CACHE,
        "modules": huggingface_hub.constants.HF_HOME,
        "matplotlib": matplotlib.get_cachedir(),
        "matplotlib config": matplotlib.get_configdir(),
    }
    outside = {name: str(path) for name, path in caches.items() if not str(path).startswith(SESSION_CACHE)}
    assert outside == {}


def test_child_processes_inherit_the_session_caches():
    code = "import torch.hub, spectralds.io as io; print(torch.hub.get_dir()); print(io.cache_dir())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert done.returncode == 0, done.stderr
    assert all(line.startswith(SESSION_CACHE) for line in done.stdout.splitlines())


def test_the_cache_dir_follows_spectralds_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("SPECTRALDS_CACHE_DIR", str(tmp_path / "ours"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "ours"
    monkeypatch.delenv("SPECTRALDS_CACHE_DIR")
    assert cache_dir() == tmp_path / "xdg" / "spectralds"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "spectralds"
