"""Builds ``llmprune_kernels._C`` with torch.utils.cpp_extension and ninja.

Source layout convention under ``csrc/`` (searched recursively):

* ``*.cpp``                 C++ compiled in every build (CPU paths, op schemas).
* ``*.cu``, ``*_cuda.cpp``  compiled only in a CUDA build (``LLMPRUNE_WITH_CUDA`` defined).
* ``*_cusparselt.cpp``      compiled only when cuSPARSELt headers are found too
                            (``LLMPRUNE_WITH_CUSPARSELT`` defined).
* ``cutlass_sm90/*``        compiled only when CUTLASS >= 3.6 headers are found and the arch list holds
                            9.0, which then becomes 9.0a (wgmma.sp needs it; ``LLMPRUNE_WITH_CUTLASS``).

Environment knobs:

* ``LLMPRUNE_SKIP_EXT=1``    build no extension at all (pure-Python install; reference paths).
* ``LLMPRUNE_FORCE_CUDA=1``  build the CUDA sources even if torch sees no GPU (needs a CUDA torch
                             and nvcc / CUDA_HOME).
* ``LLMPRUNE_SKIP_CUDA=1``   build the C++ CPU part only, even with a CUDA torch.
* ``LLMPRUNE_CUSPARSELT_DIR`` root holding ``include/cusparseLt.h`` and ``lib/libcusparseLt.so*``;
                             by default the ``nvidia/cusparselt`` wheel in site-packages.
* ``LLMPRUNE_CUTLASS_DIR``   CUTLASS's ``include`` folder; by default the ``nvidia-cutlass`` wheel's
                             ``cutlass_library/source/include``. ``LLMPRUNE_SKIP_CUTLASS=1`` leaves it out.
* ``TORCH_CUDA_ARCH_LIST``   as usual; defaults to "9.0" (H100) when no GPU is visible.
"""
from __future__ import annotations

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _roots(env: str, *in_site_packages: str) -> list[str]:
    """Where to look for a dependency: ``$env`` first, then ``<each sys.path entry>/<in_site_packages>``."""
    roots = [os.environ[env]] if os.environ.get(env) else []
    return roots + [os.path.join(p, *in_site_packages) for p in sys.path]


def _find_cusparselt() -> tuple[str, str, str] | None:
    """Return (include_dir, lib_dir, lib_file) of cuSPARSELt, or None."""
    for root in _roots("LLMPRUNE_CUSPARSELT_DIR", "nvidia", "cusparselt"):
        inc = os.path.join(root, "include")
        libs = sorted(glob.glob(os.path.join(root, "lib", "libcusparseLt.so*")))
        if os.path.exists(os.path.join(inc, "cusparseLt.h")) and libs:
            return inc, os.path.join(root, "lib"), os.path.basename(libs[0])
    return None


def _find_cutlass() -> str | None:
    """CUTLASS's include dir (with the sm90 sparse GEMM collective, CUTLASS >= 3.6), or None."""
    need = os.path.join("cutlass", "gemm", "collective", "sm90_sparse_mma_tma_gmma_ss_warpspecialized.hpp")
    for root in _roots("LLMPRUNE_CUTLASS_DIR", "cutlass_library", "source", "include"):
        if os.path.exists(os.path.join(root, need)):
            return root
    return None


def _sources(pattern: str, under: str = "") -> list[str]:
    found = glob.glob(os.path.join(ROOT, "csrc", "**", pattern), recursive=True)
    rel = sorted(os.path.relpath(p, ROOT) for p in found)
    if under:
        return [p for p in rel if f"/{under}/" in p]
    return [p for p in rel if "/cutlass_sm90/" not in p]


def _sm90a_arch_list() -> str | None:
    """TORCH_CUDA_ARCH_LIST with 9.0 turned into 9.0a, or None when it holds no 9.0 (no CUTLASS path)."""
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "").replace(",", ";").replace(" ", ";").split(";")
    archs = [a for a in archs if a]
    if not any(a.removesuffix("+PTX") in ("9.0", "9.0a") for a in archs):
        return None
    return ";".join("9.0a" + a[3:] if a.startswith("9.0") and not a.startswith("9.0a") else a for a in archs)


def _extensions():
    if _flag("LLMPRUNE_SKIP_EXT"):
        print("llmprune_kernels: LLMPRUNE_SKIP_EXT=1, building no extension")
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    if _flag("LLMPRUNE_FORCE_CUDA"):
        if torch.version.cuda is None or CUDA_HOME is None:
            raise RuntimeError(
                f"LLMPRUNE_FORCE_CUDA=1 but torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={CUDA_HOME!r}: "
                "a CUDA build needs a CUDA torch and the CUDA toolkit"
            )
        with_cuda = True
    if _flag("LLMPRUNE_SKIP_CUDA"):
        with_cuda = False

    cpp = [s for s in _sources("*.cpp") if not s.endswith(("_cuda.cpp", "_cusparselt.cpp"))]
    macros = []
    cxx = ["-O3", "-std=c++17"]
    nvcc = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    library_dirs, libraries, link_args = [], [], []
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            if torch.cuda.is_available():
                major, minor = torch.cuda.get_device_capability()
                os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
        cpp += _sources("*.cu") + _sources("*_cuda.cpp")
        macros.append(("LLMPRUNE_WITH_CUDA", "1"))
        found = _find_cusparselt()
        if found is not None and not _flag("LLMPRUNE_SKIP_CUSPARSELT"):
            inc, libdir, libfile = found
            cpp += _sources("*_cusparselt.cpp")
            macros.append(("LLMPRUNE_WITH_CUSPARSELT", "1"))
            include_dirs.append(inc)
            link_args += [f"-L{libdir}", f"-l:{libfile}", f"-Wl,-rpath,{libdir}"]
            print(f"llmprune_kernels: cuSPARSELt found at {libdir}/{libfile}")
        else:
            print("llmprune_kernels: cuSPARSELt not found, building without it")
        cutlass_inc = None if _flag("LLMPRUNE_SKIP_CUTLASS") else _find_cutlass()
        sm90a = _sm90a_arch_list()
        if cutlass_inc is not None and sm90a is not None:
            os.environ["TORCH_CUDA_ARCH_LIST"] = sm90a
            cpp += _sources("*.cpp", "cutlass_sm90") + _sources("*.cu", "cutlass_sm90")
            macros.append(("LLMPRUNE_WITH_CUTLASS", "1"))
            include_dirs += [cutlass_inc, os.path.join(cutlass_inc, "..", "tools", "util", "include")]
            nvcc.append("-DNDEBUG")  # device asserts are calls: they would serialise the wgmma pipeline
            print(f"llmprune_kernels: CUTLASS sm90 2:4 GEMM from {cutlass_inc} (arch list {sm90a})")
        else:
            why = "no 9.0 in TORCH_CUDA_ARCH_LIST" if cutlass_inc is not None else "CUTLASS headers not found"
            print(f"llmprune_kernels: building without the CUTLASS sm90 2:4 GEMM ({why})")
        ext = CUDAExtension(
            "llmprune_kernels._C",
            cpp,
            define_macros=macros,
            include_dirs=include_dirs,
            library_dirs=library_dirs,
            libraries=libraries,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=link_args,
        )
    else:
        ext = CppExtension(
            "llmprune_kernels._C",
            cpp,
            define_macros=macros,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx},
        )
    print(f"llmprune_kernels: building _C ({'CUDA' if with_cuda else 'CPU only'}) from {len(cpp)} sources")
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
