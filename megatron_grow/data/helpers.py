"""Make sure Megatron-Core's compiled dataset index helpers can be imported.

``GPTDataset`` and ``BlendedDataset`` build their sample and blending indices with
``megatron.core.datasets.helpers_cpp``, a pybind11 extension compiled from
``megatron/core/datasets/helpers.cpp``. The binary megatron-core wheels on PyPI ship it
prebuilt (``helpers_cpp.<python-tag>.so``), so normally there is nothing to do. Installs
built from the source distribution (or on a platform without a wheel) lack it, and MCore's
own ``compile_helpers()`` runs ``make`` against a Makefile the package does not contain.

``ensure_dataset_helpers()`` imports the extension and, only if that fails, compiles
``helpers.cpp`` with the system C++ compiler and pybind11's headers (``pip install
pybind11``): into the installed package directory when it is writable, otherwise into
``$XDG_CACHE_HOME/megatron_grow/mcore_helpers/<megatron-core version>/``, from where it is
loaded under its package name. The build writes to a temporary file and renames it, so
ranks that race do not see half-written libraries. It takes about 15 CPU seconds, once.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from importlib.metadata import version
from types import ModuleType

from megatron_grow.errors import DataError

HELPERS_MODULE = "megatron.core.datasets.helpers_cpp"


def _mcore_datasets_dir() -> str:
    spec = importlib.util.find_spec("megatron.core.datasets")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("megatron-core is not installed (no megatron.core.datasets package)")
    return list(spec.submodule_search_locations)[0]


def _cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "megatron_grow", "mcore_helpers", version("megatron-core"))


def compile_dataset_helpers(output_dir: str) -> str:
    """Compile MCore's ``helpers.cpp`` into ``output_dir``; returns the path of the extension."""
    source = os.path.join(_mcore_datasets_dir(), "helpers.cpp")
    if not os.path.isfile(source):
        raise DataError(f"cannot compile MCore's dataset helpers: {source} is missing")
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not compiler:
        raise DataError("MCore's dataset helpers (megatron.core.datasets.helpers_cpp) are not built and no C++ "
                        "compiler was found; install g++ (apt-get install g++) or a megatron-core binary wheel")
    try:
        import pybind11  # lazy: optional, needed only to compile (its absence is the DataError below)
    except ImportError:
        raise DataError("MCore's dataset helpers (megatron.core.datasets.helpers_cpp) are not built; compiling "
                        "them needs pybind11: pip install pybind11") from None
    os.makedirs(output_dir, exist_ok=True)
    target = os.path.join(output_dir, "helpers_cpp" + sysconfig.get_config_var("EXT_SUFFIX"))
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=output_dir)
    os.close(fd)
    command = [compiler, "-O3", "-Wall", "-shared", "-std=c++17", "-fPIC",
               f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}", source, "-o", tmp]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        os.remove(tmp)
        raise DataError(f"compiling MCore's dataset helpers failed ({' '.join(command)}):\n{result.stderr[-2000:]}")
    os.replace(tmp, target)
    return target


def _load_from(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(HELPERS_MODULE, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[HELPERS_MODULE] = module
    return module


def ensure_dataset_helpers(verbose: bool = True) -> ModuleType:
    """Import ``megatron.core.datasets.helpers_cpp``, compiling it first if it is missing."""
    try:
        return importlib.import_module(HELPERS_MODULE)
    except ImportError:
        pass
    cached = os.path.join(_cache_dir(), "helpers_cpp" + sysconfig.get_config_var("EXT_SUFFIX"))
    if os.path.isfile(cached):
        return _load_from(cached)
    package_dir = _mcore_datasets_dir()
    output_dir = package_dir if os.access(package_dir, os.W_OK) else _cache_dir()
    if verbose:
        print(f"megatron-grow: compiling MCore's dataset helpers ({HELPERS_MODULE}) into {output_dir}; "
              "this happens once", file=sys.stderr, flush=True)
    path = compile_dataset_helpers(output_dir)
    importlib.invalidate_caches()
    if output_dir == package_dir:
        return importlib.import_module(HELPERS_MODULE)
    return _load_from(path)
