"""`kernels/` ships as `reattention_kernels`, never as a top-level `kernels` package."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import reattention_kernels

ROOT = Path(__file__).resolve().parents[1]


def test_import_name_maps_to_the_kernels_folder():
    assert Path(reattention_kernels.__file__).resolve() == ROOT / "kernels" / "__init__.py"


def test_built_wheel_installs_reattention_kernels_and_no_kernels_package(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
    )
    wheel = next(tmp_path.glob("reattention-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "reattention_kernels/__init__.py" in names
    assert "reattention_kernels/reference/topk.py" in names
    packages = ("reattention_core", "reattention_kernels", "reattention_integrations")
    assert {f"{p}/py.typed" for p in packages} <= set(names)  # PEP 561 markers
    assert not any(n.startswith("kernels/") for n in names)
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)], check=True
    )
    probe = (
        "import importlib.util, reattention_kernels, reattention_core;"
        "print(reattention_kernels.__file__);"
        "spec = importlib.util.find_spec('kernels');"
        "print(spec.origin if spec else None)"
    )
    env = dict(os.environ, PYTHONPATH=str(target))
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
    )
    ours, kernels_origin = out.stdout.split()
    assert Path(ours).is_relative_to(target)
    # `kernels` is either absent or Hugging Face's package, never our folder
    assert kernels_origin == "None" or not Path(kernels_origin).is_relative_to(ROOT)
    assert kernels_origin == "None" or not Path(kernels_origin).is_relative_to(target)


def test_a_checkout_on_sys_path_never_imports_the_folder_as_kernels(tmp_path):
    """With a checkout's root on ``sys.path`` (``python -m pytest`` puts it there), ``import kernels`` gives
    Hugging Face's package where one is installed (transformers 5.25 requires it), submodules included, and
    otherwise an empty module that transformers takes for no package (it imports what ``find_spec`` finds).
    ``-S``: no site-packages, so no real hub package."""
    hub = tmp_path / "hub" / "kernels"
    hub.mkdir(parents=True)
    (hub / "__init__.py").write_text("WHO = 'hub'\n")
    (hub / "layer.py").write_text("WHO = 'hub.layer'\n")

    def probe(code: str, *path: Path) -> subprocess.CompletedProcess:
        head = f"import sys; sys.path[:0] = {[str(p) for p in path]!r}; "
        cmd = [sys.executable, "-S", "-c", head + code]
        return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, check=False)

    found = probe("import kernels, kernels.layer; print(kernels.WHO, kernels.layer.WHO, kernels.__file__)", ROOT,
                  hub.parent)  # fmt: skip
    assert found.returncode == 0, found.stderr
    who, layer, origin = found.stdout.split()
    assert (who, layer) == ("hub", "hub.layer") and Path(origin).is_relative_to(hub)
    missing = probe("import kernels; print(getattr(kernels, '__file__', None), hasattr(kernels, '__path__'), "
                    "sorted(n for n in vars(kernels) if not n.startswith('__')))", ROOT)  # fmt: skip
    assert missing.returncode == 0, missing.stderr
    assert missing.stdout.split() == ["None", "False", "[]"]  # no file, no submodules, none of our ops
    # transformers, in this environment (with or without the hub package), imports and sees no folder of ours
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from transformers import LlamaConfig; "
            "from transformers.utils import is_kernels_available; import kernels; "
            "print(is_kernels_available(), getattr(kernels, '__file__', None))")  # fmt: skip
    seen = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=False)
    assert seen.returncode == 0, seen.stderr[-2000:]
    available, origin = seen.stdout.split()
    assert (available, origin) == ("False", "None") or not Path(origin).is_relative_to(ROOT)


def test_importing_the_engine_and_adapters_imports_neither_dynamo_nor_triton():
    """``torch._dynamo`` (which imports triton) loads only when compiled layers are used: triton read at import would
    fix ``TRITON_INTERPRET`` before the kernel tests set it, and costs every process start-up time."""
    code = (
        "import sys, reattention_core, reattention_core.engine, reattention_core.hf, reattention_integrations\n"
        "from reattention_core import ReAttentionEngine\n"
        "bad = [m for m in ('torch._dynamo', 'triton') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
