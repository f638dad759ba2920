"""Build of lowbit's compiled modules. Never imports torch (DESIGN.md contract 6).

- lowbit._C        CPU kernels: pybind11 + OpenMP, AVX-512/AVX2/scalar chosen at run time.
- lowbit._C_cuda   every csrc/cuda/*.cu compiled by nvcc for sm_80 and sm_90 (+ compute_90 PTX),
                   linked with static cudart. Built when nvcc is found; LOWBIT_CUDA=1 requires
                   it, LOWBIT_CUDA=0 skips it.
- lowbit._C_sim    test-only: the same .cu kernels compiled as C++ for the CPU (csrc/sim/).
                   Built only with LOWBIT_SIM=1 (the Makefile's test build sets it).
"""
import glob
import os
import shutil
import subprocess

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext
from setuptools import setup

ParallelCompile("LOWBIT_BUILD_JOBS", default=0).install()

# -fno-math-errno: sqrtf needs no errno, so loops use vsqrtps (IEEE sqrt either way); with
# errno each lane would be a scalar sqrt plus a check. -fno-trapping-math: no code here reads
# floating-point exception flags, and without it gcc will not evaluate a float operation the
# source guards by a select (e.g. fp16 subnormal widening), so such loops stay scalar. Neither
# flag changes a rounded result (-ffp-contract=off keeps products and sums separately rounded).
HOST_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math",
              "-fvisibility=hidden", "-std=c++17", "-Wall", "-Wextra"]
INCLUDES = ["csrc/include", "csrc"]
CUDA_ARCHS = os.environ.get("LOWBIT_CUDA_ARCHS", "80;90").split(";")


def find_cuda_home():
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


def want_cuda(cuda_home):
    flag = os.environ.get("LOWBIT_CUDA", "auto")
    if flag == "0":
        return False
    if flag == "1" and cuda_home is None:
        raise RuntimeError("LOWBIT_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME to the "
                           "directory holding bin/nvcc")
    return cuda_home is not None


class BuildExt(build_ext):
    """Compiles csrc/cuda/*.cu with nvcc into objects linked into lowbit._C_cuda."""

    def build_extension(self, ext):
        if ext.name == "lowbit._C_cuda":
            ext.extra_objects = self._compile_cuda(ext)
        super().build_extension(ext)

    def _compile_cuda(self, ext):
        cuda_home = ext.cuda_home
        nvcc = os.path.join(cuda_home, "bin", "nvcc")
        out_dir = os.path.join(self.build_temp, "cuda")
        os.makedirs(out_dir, exist_ok=True)
        gencode = []
        for arch in CUDA_ARCHS:
            gencode.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
        gencode.append(f"-gencode=arch=compute_{CUDA_ARCHS[-1]},code=compute_{CUDA_ARCHS[-1]}")
        objects = []
        for src in sorted(glob.glob("csrc/cuda/*.cu")):
            obj = os.path.join(out_dir, os.path.basename(src) + ".o")
            cmd = [nvcc, "-c", src, "-o", obj, "-O3", "-std=c++17", "--threads", "0",
                   "-Werror", "all-warnings", "-Xcompiler", "-fPIC,-fvisibility=hidden",
                   *[f"-I{d}" for d in INCLUDES], *gencode]
            if os.environ.get("LOWBIT_PTXAS_VERBOSE") == "1":
                cmd.append("-Xptxas=-v")
            print(" ".join(cmd), flush=True)
            subprocess.check_call(cmd)
            objects.append(obj)
        return objects


def extensions():
    exts = [Pybind11Extension(
        "lowbit._C",
        sources=["csrc/bindings.cpp", "csrc/cpu/dispatch.cpp", "csrc/cpu/isa_avx512.cpp",
                 "csrc/cpu/isa_avx2.cpp", "csrc/cpu/isa_scalar.cpp"],
        include_dirs=INCLUDES, extra_compile_args=HOST_FLAGS, extra_link_args=["-fopenmp"],
        cxx_std=17)]
    cuda_home = find_cuda_home()
    if want_cuda(cuda_home) and glob.glob("csrc/cuda/*.cu"):
        ext = Pybind11Extension(
            "lowbit._C_cuda", sources=["csrc/bindings_cuda.cpp"],
            include_dirs=INCLUDES + [os.path.join(cuda_home, "include")],
            extra_compile_args=HOST_FLAGS,
            library_dirs=[os.path.join(cuda_home, "lib64")],
            extra_link_args=["-lcudart_static", "-ldl", "-lrt", "-lpthread", "-fopenmp"],
            cxx_std=17)
        ext.cuda_home = cuda_home
        exts.append(ext)
    if os.environ.get("LOWBIT_SIM") == "1" and glob.glob("csrc/sim/*.cpp"):
        exts.append(Pybind11Extension(
            "lowbit._C_sim", sources=sorted(glob.glob("csrc/sim/*.cpp")),
            include_dirs=INCLUDES, extra_compile_args=HOST_FLAGS + ["-DLOWBIT_CUDA_SIM"],
            extra_link_args=["-fopenmp"], cxx_std=17))
    return exts


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
