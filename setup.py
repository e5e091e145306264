"""Builds mmkernels._C against the torch already installed (pip install --no-build-isolation .).

CPU kernels always build. CUDA kernels build when nvcc and a CUDA build of torch are present;
MMKERNELS_FORCE_CUDA=1 insists on them (an error if impossible), MMKERNELS_FORCE_CUDA=0 skips
them. MMKERNELS_CUDA_ARCHS (default "80;90") picks the targets.
"""
import glob
import importlib.util
import os
import platform
import shutil


def _find_cuda_home():
    """torch guesses CUDA_HOME from the nvcc on PATH; on our machines that is a wrapper script in
    /usr/local/bin, so the guess (/usr/local) has no libcudart. Take the first candidate that
    really is a toolkit."""
    if "CUDA_HOME" in os.environ or "CUDA_PATH" in os.environ:
        return
    nvcc = shutil.which("nvcc")
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    for home in candidates + ["/usr/local/cuda"]:
        if os.path.exists(os.path.join(home, "bin", "nvcc")) and glob.glob(f"{home}/lib*/libcudart.so*"):
            os.environ["CUDA_HOME"] = home
            return


_find_cuda_home()

import torch  # noqa: E402  (after CUDA_HOME is set)
from setuptools import find_packages, setup  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

VERSION = "0.1.0"
ROOT = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    force = os.environ.get("MMKERNELS_FORCE_CUDA")
    possible = CUDA_HOME is not None and torch.version.cuda is not None
    if force == "1" and not possible:
        raise RuntimeError(
            "MMKERNELS_FORCE_CUDA=1 needs nvcc and a CUDA build of torch; got "
            f"CUDA_HOME={CUDA_HOME}, torch.version.cuda={torch.version.cuda}"
        )
    return possible if force is None else force == "1"


def cuda_archs() -> list[str]:
    archs = [a.strip() for a in os.environ.get("MMKERNELS_CUDA_ARCHS", "80;90").split(";") if a.strip()]
    if not all(a.isdigit() for a in archs):
        raise RuntimeError(f"MMKERNELS_CUDA_ARCHS must be like '80;90', got {archs}")
    return archs


def cuda_library_headers() -> list[str]:
    """torch's CUDA headers include cuSPARSE/cuBLAS headers that a bare toolkit (ours has only
    nvcc and the runtime) may lack; the nvidia-* wheels that came with torch carry them."""
    if os.path.exists(os.path.join(CUDA_HOME, "include", "cusparse.h")):
        return []
    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations) if spec else []
    found = sorted({os.path.dirname(p) for r in roots for p in glob.glob(f"{r}/**/include/cusparse.h", recursive=True)})
    if not found:
        raise RuntimeError(f"cusparse.h is neither in {CUDA_HOME}/include nor in an nvidia-* wheel")
    return found


def isa_flags() -> dict[str, list[str]]:
    """The compiler flags of each instruction set the CPU kernels (csrc/cpu/) are built for, as
    ATen builds its own (csrc/isa.h). Elsewhere than x86-64 only the baseline."""
    def named(isa):
        return [f"-DCPU_CAPABILITY={isa}", f"-DCPU_CAPABILITY_{isa}"]
    if platform.machine() not in ("x86_64", "AMD64"):
        return {"DEFAULT": named("DEFAULT")}
    return {"DEFAULT": named("DEFAULT"),
            "AVX2": ["-mavx2", "-mfma", "-mf16c", *named("AVX2")],
            "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c", *named("AVX512")]}


class BuildWithIsas(BuildExtension):
    """torch's BuildExtension, which compiles every source once with the same flags; the CPU
    kernels are compiled here first, once per instruction set, each into its own folder, and
    linked after the other objects (so that an inline function compiled into several copies
    resolves to the baseline one, which runs on any CPU)."""

    def build_extension(self, ext):
        cxx = ext.extra_compile_args["cxx"] if isinstance(ext.extra_compile_args, dict) else ext.extra_compile_args
        objects = []
        for isa, flags in isa_flags().items():
            objects += self.compiler.compile(
                ext.isa_sources, output_dir=os.path.join(self.build_temp, "isa", isa), macros=ext.define_macros,
                include_dirs=ext.include_dirs, extra_postargs={"cxx": [*cxx, *flags], "nvcc": []}, depends=ext.depends)
        ext.extra_objects = [*objects, *ext.extra_objects]
        super().build_extension(ext)


def listed_sources(suffix: str) -> list[str]:
    """csrc/sources.txt, the one list of sources CMake reads too."""
    with open(os.path.join(ROOT, "csrc", "sources.txt")) as f:
        lines = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    return [f"csrc/{line}" for line in lines if line.endswith(suffix)]


def extension():
    cpp = listed_sources(".cpp")
    isa_sources = [f for f in cpp if f.startswith("csrc/cpu/")]
    sources = ["csrc/module.cpp", *(f for f in cpp if f not in isa_sources)]
    torch_version = torch.__version__.split("+")[0]
    macros = [("MMKERNELS_VERSION", f'"{VERSION}"'), ("MMKERNELS_TORCH_VERSION", torch_version)]
    # -fopenmp: at::parallel_for is header code that parallelises with `#pragma omp parallel`;
    # without the flag the pragma is ignored and every CPU kernel runs on one thread. The
    # OpenMP runtime it links is the libgomp that torch itself loads.
    cxx = ["-O3", "-fopenmp"]  # the C++ standard is the one cpp_extension picks for torch
    link = ["-fopenmp"]
    if not want_cuda():
        ext = CppExtension("mmkernels._C", sources, define_macros=macros, extra_compile_args={"cxx": cxx},
                           extra_link_args=link)
        ext.isa_sources = isa_sources
        return ext
    archs = cuda_archs()
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    # and the PTX of the newest, which the driver compiles for GPUs newer than every cubin
    gencode.append(f"-gencode=arch=compute_{max(archs, key=int)},code=compute_{max(archs, key=int)}")
    macros += [("MMKERNELS_WITH_CUDA", None), ("MMKERNELS_CUDA_VERSION", torch.version.cuda)]
    cxx.append("-DMMKERNELS_CUDA_ARCHS=" + ",".join(archs))  # nvcc would split this at the comma
    # The arch list goes to nvcc through our own flags; an empty TORCH_CUDA_ARCH_LIST would make
    # torch probe for a GPU, which our build machines do not have.
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(f"{a[:-1]}.{a[-1]}" for a in archs)
    nvcc = ["-O3", "--use_fast_math", "-lineinfo", *gencode]
    ext = CUDAExtension(
        "mmkernels._C",
        sources + listed_sources(".cu"),
        define_macros=macros,
        include_dirs=cuda_library_headers(),
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        extra_link_args=link,
    )
    ext.isa_sources = isa_sources
    return ext


setup(
    name="mmkernels",
    version=VERSION,
    packages=find_packages(include=["mmkernels", "mmkernels.*"]),
    package_data={"mmkernels": ["py.typed"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildWithIsas.with_options(use_ninja=True)},
    entry_points={"console_scripts": ["mmkernels=mmkernels.cli:main"]},
    python_requires=">=3.11",
)
