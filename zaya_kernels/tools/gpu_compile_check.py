"""Compile checks of the HIP/CUDA kernels with no GPU present.

(a) Every `kernels/*.cuh` header is compiled to an object, with codegen, for AMD gfx942 (Debian's clang-19 as a HIP
    compiler, the HIP headers of libamdhip64-dev and the bitcode of rocm-device-libs), for AMD gfx950 (clang 20+,
    which knows it, with the same headers and bitcode: device code to assembly) and for NVIDIA sm_90 (nvcc).
    Headers hold templates only, so each gets a generated translation unit that defines
    ZAYA_INSTANTIATE_<STEM> (e.g. ZAYA_INSTANTIATE_RESIDUAL_RMSNORM) before including it: the header's explicit
    instantiation list behind that macro makes every kernel compile for float, half and bf16. Warnings are errors.
    The report gives per-kernel registers and spills (AMD: -Rpass-analysis=kernel-resource-usage; NVIDIA: ptxas -v).
(b) --extension: the whole torch extension (csrc/ + kernels/) built against torch's CUDA wheel in a separate venv
    ($ZAYA_CUDA_VENV, default <repo>/.cache/cuda-venv, created on first use: ~80 s, ~5.5 GB from local wheels), from
    the source distribution of a temporary copy of the repository (what `pip install` of a published sdist builds:
    a file MANIFEST.in forgets fails here), then loaded in that venv: `_C.gpu_build == "cuda"`, the launchers exist
    and the torch.ops.zaya schemas are registered.
(c) --rocm: what `pip install` on a ROCm machine runs before its compiler, with no ROCm present: setup.py's ROCm
    branch in a copy of the repository, torch made to look like a ROCm build, so that torch's own CUDAExtension
    hipifies the sources as it does there; then checks of what it wrote (no CUDA launch left, every include found,
    every hipify copy git-ignored and out of the sdist) and the hipified kernel headers compiled as in (a).

    python -m zaya_kernels.tools.gpu_compile_check [--amd] [--nvidia] [--extension] [--rocm] [--json PATH]

With none of --amd/--nvidia/--extension/--rocm, runs --amd and --nvidia. Exits nonzero when a check fails or its
toolchain is missing. Environment: ZAYA_CLANG (clang++ for HIP on gfx942), ZAYA_CLANG_GFX950 (the one for gfx950),
ZAYA_ROCM_DEVICE_LIBS (folder with ocml.bc etc.),
ZAYA_HIP_ROCM_PATH (prefix holding include/hip), ZAYA_NVCC, ZAYA_CUDA_HOME, ZAYA_CUDA_VENV.
This module only uses the standard library (it must not import torch or the extension; (b) and (c) run torch in
a subprocess).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
KERNELS_DIR = REPO_ROOT / "kernels"

AMD_ARCH = "gfx942"
# Every AMD target the package builds for. gfx950 (CDNA4, MI355X) needs clang 20 or newer: clang-19 does not know it.
AMD_ARCHS = ("gfx942", "gfx950")
_CLANG_CANDIDATES = {"gfx942": ["clang++-19", "clang-19", "/usr/lib/llvm-19/bin/clang++"],
                     "gfx950": ["clang++-22", "clang++-21", "clang++-20"]}
NVIDIA_ARCH = "sm_90"
CUDA_TORCH_VERSION = "2.14.1"
VENV_PACKAGES = [f"torch=={CUDA_TORCH_VERSION}", "setuptools>=77", "wheel", "ninja", "numpy"]

# Flags torch.utils.cpp_extension adds to every device compile: the kernels must build with them.
TORCH_HIP_DEFINES = ["-D__HIP_NO_HALF_OPERATORS__=1", "-D__HIP_NO_HALF_CONVERSIONS__=1"]
TORCH_CUDA_DEFINES = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
]

# What the extension check expects of zaya_kernels._C (the contract with zaya_kernels/ops).
EXPECTED_LAUNCHERS = [
    "residual_scale_rmsnorm_fwd",
    "residual_scale_rmsnorm_bwd",
    "rmsnorm_fwd",
    "rmsnorm_bwd",
    "residual_rmsnorm_bwd_num_partials",
    "zaya_router_decode",
    "cca_prepare_decode",
    "moe_dispatch",
    "moe_permute_rows",
    "moe_unpermute_rows",
    "moe_unpermute_rows_backward",
]
EXPECTED_OPS = ["residual_scale_rmsnorm", "residual_scale_rmsnorm_backward", "rmsnorm", "rmsnorm_backward"]


class ToolchainMissing(RuntimeError):
    """A compiler, header set or device library the check needs is not installed."""


@dataclass
class CheckResult:
    target: str  # "amd:gfx942", "nvidia:sm_90", "extension:cuda"
    name: str  # header file name, or "zaya_kernels._C"
    ok: bool
    seconds: float
    message: str = ""  # compiler output tail on failure, a summary otherwise
    kernels: dict = field(default_factory=dict)  # kernel -> {"vgpr"/"registers": n, "spill": n, ...}

    def summary(self) -> str:
        head = f"[{'PASS' if self.ok else 'FAIL'}] {self.target:<16} {self.name:<28} {self.seconds:6.1f} s"
        lines = [head]
        for kname, res in self.kernels.items():
            lines.append(f"    {kname}: " + ", ".join(f"{k}={v}" for k, v in res.items()))
        if self.message and (not self.ok or not self.kernels):
            lines.extend("    " + line for line in self.message.rstrip().splitlines()[-40:])
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Toolchain discovery
# ----------------------------------------------------------------------------------------------------------------
def hipify_output(path: Path) -> bool:
    """Whether `path` is a copy that hipify writes when the extension is built on ROCm (csrc/X.hip from X.cu,
    kernels/X_hip.cuh from X.cuh): pip builds in the source tree, so they appear there; generated, git-ignored and
    kept out of source distributions, never a source of their own."""
    return path.suffix == ".hip" or path.name.endswith("_hip.cuh")


def kernel_headers() -> list[Path]:
    return sorted(p for p in KERNELS_DIR.glob("*.cuh") if not hipify_output(p))


def instantiate_macro(header: Path) -> str:
    # a hipified X_hip.cuh keeps X.cuh's macro
    return "ZAYA_INSTANTIATE_" + re.sub(r"[^0-9A-Za-z]", "_", header.stem.removesuffix("_hip")).upper()


def translation_unit(header: Path) -> str:
    return f'// generated by zaya_kernels.tools.gpu_compile_check\n#define {instantiate_macro(header)} 1\n#include "{header.name}"\n'


def find_clang(arch: str = AMD_ARCH) -> str:
    """The clang that compiles HIP for `arch`: $ZAYA_CLANG (gfx942) / $ZAYA_CLANG_GFX950, else clang-19 for gfx942
    and clang 22, 21 or 20 for gfx950."""
    variable = "ZAYA_CLANG" if arch == "gfx942" else f"ZAYA_CLANG_{arch.upper()}"
    env = os.environ.get(variable)
    candidates = [env] if env else _CLANG_CANDIDATES.get(arch, _CLANG_CANDIDATES["gfx942"])
    for cand in candidates:
        path = shutil.which(cand) if cand else None
        if path:
            return path
    package = "clang-19 lld-19" if arch == "gfx942" else "clang-22"
    raise ToolchainMissing(f"no clang that compiles HIP for {arch} (tried {candidates}; set {variable}); "
                           f"apt install {package}")


def find_device_libs() -> Path:
    env = os.environ.get("ZAYA_ROCM_DEVICE_LIBS")
    patterns = (
        [env]
        if env
        else [
            "/usr/lib/x86_64-linux-gnu/amdgcn/bitcode",
            "/usr/lib/llvm-19/lib/clang/19/lib/amdgcn/bitcode",
            "/opt/rocm/amdgcn/bitcode",
            "/opt/rocm/lib/llvm/lib/clang/*/lib/amdgcn/bitcode",
            "/usr/lib/*/amdgcn/bitcode",
        ]
    )
    for pattern in patterns:
        for cand in sorted(glob.glob(pattern)):
            if os.path.isfile(os.path.join(cand, "ocml.bc")):
                return Path(cand)
    raise ToolchainMissing(
        f"ROCm device libraries (ocml.bc) not found in {patterns}; apt install rocm-device-libs or set ZAYA_ROCM_DEVICE_LIBS"
    )


def find_hip_rocm_path() -> Path:
    env = os.environ.get("ZAYA_HIP_ROCM_PATH")
    for cand in [env] if env else ["/usr", "/opt/rocm"]:
        if cand and os.path.isfile(os.path.join(cand, "include", "hip", "hip_runtime.h")):
            return Path(cand)
    raise ToolchainMissing("HIP headers (include/hip/hip_runtime.h) not found; apt install libamdhip64-dev or set ZAYA_HIP_ROCM_PATH")


def prepare_device_libs(dest: Path, arch: str) -> Path:
    """Copies the device bitcode into dest, adding oclc_isa_version_<arch>.bc from the nearest older one if missing."""
    src = find_device_libs()
    dest.mkdir(parents=True, exist_ok=True)
    for bc in src.glob("*.bc"):
        shutil.copy(bc, dest / bc.name)
    isa = arch[3:] if arch.startswith("gfx") else arch
    target = dest / f"oclc_isa_version_{isa}.bc"
    if not target.exists() and isa == "950":
        # CDNA4: Debian's device libraries (ROCm 5.2) stop at gfx940, the nearest ISA they know (the file only sets
        # the ISA version a few ocml paths test)
        shutil.copy(dest / "oclc_isa_version_940.bc", target)
    if not target.exists():
        # gfx942 is gfx940 with production firmware: same device-library ISA flags. Other archs: nearest of its family.
        family = [p for p in dest.glob(f"oclc_isa_version_{isa[:-1]}*.bc")]
        if not family:
            raise ToolchainMissing(f"no oclc_isa_version bitcode close to {arch} in {src}")
        shutil.copy(sorted(family)[0], target)
    return dest


def find_cuda_home() -> Path:
    for cand in [os.environ.get("ZAYA_CUDA_HOME"), os.environ.get("CUDA_HOME"), "/usr/local/cuda-13.0", "/usr/local/cuda"]:
        if cand and os.path.isfile(os.path.join(cand, "bin", "nvcc")):
            return Path(cand)
    nvcc = shutil.which("nvcc")
    if nvcc:
        return Path(os.path.realpath(nvcc)).parent.parent
    raise ToolchainMissing("CUDA toolkit (bin/nvcc) not found; set ZAYA_CUDA_HOME")


def find_nvcc() -> str:
    env = os.environ.get("ZAYA_NVCC")
    if env:
        if shutil.which(env):
            return shutil.which(env)
        raise ToolchainMissing(f"ZAYA_NVCC={env} is not an executable")
    return str(find_cuda_home() / "bin" / "nvcc")


def _run(cmd: list[str], cwd: Path | None = None, env: dict | None = None, timeout: float = 1800) -> tuple[int, str, float]:
    start = time.monotonic()
    try:
        proc = subprocess.run(
            cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout
        )
        return proc.returncode, proc.stdout, time.monotonic() - start
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return 124, out + f"\n(timed out after {timeout} s)", time.monotonic() - start


def _demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("llvm-cxxfilt-19") or shutil.which("c++filt") or shutil.which("llvm-cxxfilt")
    if not tool or not names:
        return {n: n for n in names}
    proc = subprocess.run([tool], input="\n".join(names), stdout=subprocess.PIPE, text=True)
    out = proc.stdout.splitlines()
    return {n: (d if len(out) == len(names) else n) for n, d in zip(names, out)} if len(out) == len(names) else {n: n for n in names}


def _short_kernel_name(demangled: str) -> str:
    # "void zaya::kernels::foo_kernel<float>(float const*, ...)" -> "foo_kernel<float>"
    name = demangled.split("(", 1)[0]
    name = name.replace("void ", "", 1) if name.startswith("void ") else name
    name = re.sub(r"\bzaya::(dev|kernels)::", "", name)
    name = name.replace("_Float16", "half").replace("__half", "half")
    return name.replace("bf16_t", "bf16").replace("half_t", "half")


# ----------------------------------------------------------------------------------------------------------------
# (a) per-header compiles
# ----------------------------------------------------------------------------------------------------------------
def _parse_amd_resources(output: str) -> dict:
    kernels: dict[str, dict] = {}
    current = None
    keys = {
        "VGPRs": "vgpr",
        "AGPRs": "agpr",
        "SGPRs": "sgpr",
        "VGPRs Spill": "vgpr_spill",
        "SGPRs Spill": "sgpr_spill",
        "TotalSGPRs": "sgpr",  # clang 20+
        "ScratchSize [bytes/lane]": "scratch",
        "Dynamic Stack": "dynamic_stack",  # clang 20+: True where a call's stack is unknown
        "Occupancy [waves/SIMD]": "occupancy",
        "LDS Size [bytes/block]": "lds",
    }
    for line in output.splitlines():
        m = re.search(r"remark: Function Name: (\S+)", line)
        if m:
            current = m.group(1)
            kernels[current] = {}
            continue
        m = re.search(r"remark:\s+([A-Za-z][A-Za-z /\[\]]*?): (\S+) \[-Rpass-analysis", line)
        if m and current and m.group(1) in keys:
            val = m.group(2)
            kernels[current][keys[m.group(1)]] = int(val) if val.isdigit() else val
    names = _demangle(list(kernels))
    return {_short_kernel_name(names[k]): v for k, v in kernels.items()}


def _parse_ptxas(output: str) -> dict:
    kernels: dict[str, dict] = {}
    current = None
    for line in output.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            current = m.group(1)
            kernels[current] = {}
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            kernels[current].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            kernels[current]["registers"] = int(m.group(1))
    names = _demangle(list(kernels))
    return {_short_kernel_name(names[k]): v for k, v in kernels.items()}


# clang 20+ (gfx950) against the same Debian HIP 5.2 headers and device bitcode, which it outgrew: code object v5
# (its default v6 wants ROCm 6.3's device libraries); the wavefront-size macro the old headers read (gone from clang
# 20+; CDNA is wave64); hip.bc linked in by hand (it defines the fence the old headers' __syncthreads calls, which
# this clang no longer links by itself: unresolved, the kernels would show a call and a dynamic stack that no ROCm
# build has); the device pass only, to assembly (the host pass is gfx942's, and the bitcode is device code).
def _newer_clang_flags(device_libs: Path) -> list[str]:
    return ["-mcode-object-version=5", "-D__AMDGCN_WAVEFRONT_SIZE=64", "-Xclang", "-mlink-builtin-bitcode",
            "-Xclang", str(device_libs / "hip.bc"), "--cuda-device-only", "-S"]


def amd_command(clang: str, rocm_path: Path, device_libs: Path, arch: str, src: Path, obj: Path,
                include_dir: Path = KERNELS_DIR, defines: list[str] = TORCH_HIP_DEFINES) -> list[str]:
    output = _newer_clang_flags(device_libs) if arch != "gfx942" else ["-c"]
    return [
        clang,
        "-x",
        "hip",
        f"--offload-arch={arch}",
        f"--rocm-path={rocm_path}",
        f"--rocm-device-lib-path={device_libs}",
        "-std=c++17",
        "-O3",
        "-fno-gpu-rdc",
        *defines,
        "-Wall",
        "-Wextra",
        "-Werror",
        "-Rpass-analysis=kernel-resource-usage",
        f"-I{include_dir}",
        *output,
        str(src),
        "-o",
        str(obj),
    ]


def nvidia_command(nvcc: str, arch: str, src: Path, obj: Path) -> list[str]:
    return [
        nvcc,
        "-x",
        "cu",
        f"-arch={arch}",
        "-std=c++17",
        "-O3",
        "--expt-relaxed-constexpr",
        *TORCH_CUDA_DEFINES,
        "-Werror",
        "all-warnings",
        "-Xcompiler",
        "-Wall,-Wextra",
        "-Xptxas",
        "-v",
        f"-I{KERNELS_DIR}",
        "-c",
        str(src),
        "-o",
        str(obj),
    ]


def check_amd(arch: str = AMD_ARCH, headers: list[Path] | None = None, include_dir: Path = KERNELS_DIR,
              defines: list[str] = TORCH_HIP_DEFINES) -> list[CheckResult]:
    """Compiles every kernels/*.cuh (or `headers`, found in `include_dir`) for `arch` with clang -x hip and
    `defines`. Raises ToolchainMissing without the toolchain."""
    clang = find_clang(arch)
    rocm_path = find_hip_rocm_path()
    results = []
    with tempfile.TemporaryDirectory(prefix="zaya-amd-") as tmp:
        tmp = Path(tmp)
        device_libs = prepare_device_libs(tmp / "bitcode", arch)
        for header in headers or kernel_headers():
            src = tmp / f"{header.stem}.hip"
            src.write_text(translation_unit(header))
            rc, out, secs = _run(amd_command(clang, rocm_path, device_libs, arch, src, tmp / f"{header.stem}.o",
                                             include_dir, defines))
            kernels = _parse_amd_resources(out) if rc == 0 else {}
            errors = "\n".join(line for line in out.splitlines() if "remark:" not in line)
            results.append(CheckResult(f"amd:{arch}", header.name, rc == 0, secs, errors if rc else f"{len(kernels)} kernels", kernels))
    return results


def check_nvidia(arch: str = NVIDIA_ARCH, headers: list[Path] | None = None) -> list[CheckResult]:
    """Compiles every kernels/*.cuh for `arch` with nvcc. Raises ToolchainMissing without nvcc."""
    nvcc = find_nvcc()
    results = []
    with tempfile.TemporaryDirectory(prefix="zaya-nv-") as tmp:
        tmp = Path(tmp)
        for header in headers or kernel_headers():
            src = tmp / f"{header.stem}.cu"
            src.write_text(translation_unit(header))
            rc, out, secs = _run(nvidia_command(nvcc, arch, src, tmp / f"{header.stem}.o"))
            kernels = _parse_ptxas(out) if rc == 0 else {}
            errors = "\n".join(line for line in out.splitlines() if not line.startswith("ptxas info"))
            results.append(CheckResult(f"nvidia:{arch}", header.name, rc == 0, secs, errors if rc else f"{len(kernels)} kernels", kernels))
    return results


def spills(results: list[CheckResult]) -> list[str]:
    """'target header kernel' for every kernel that spills registers (a performance problem, reported, not failed)."""
    out = []
    for res in results:
        for kname, r in res.kernels.items():
            if r.get("vgpr_spill", 0) or r.get("sgpr_spill", 0) or r.get("spill_stores", 0):
                out.append(f"{res.target} {res.name} {kname}")
    return out


# ----------------------------------------------------------------------------------------------------------------
# Host emulation: the same kernel source run on CPU threads (kernels/compat.cuh, ZAYA_HOST_EMULATION), so CPU-only CI
# checks the kernels' indexing and math, not just that they compile. Slow (a std::thread per GPU thread): tiny shapes.
# ----------------------------------------------------------------------------------------------------------------
EMULATION_DRIVER = r"""
#define ZAYA_HOST_EMULATION 1
#include "residual_rmsnorm.cuh"
using namespace zaya::kernels;
using zaya::dev::bf16_t;
using zaya::dev::half_t;

template <typename F>
static int by_dtype(int code, F&& f) {  // 0 float32, 1 float16, 2 bfloat16
  switch (code) {
    case 0: f(float{}); return 0;
    case 1: f(half_t{}); return 0;
    case 2: f(bf16_t{}); return 0;
  }
  return 1;
}

extern "C" int zaya_emu_residual_scale_rmsnorm_fwd(int dt, const void* x, const float* r, const float* hs,
    const float* hb, const float* rs, const float* rb, const float* w, float eps, int64_t N, int64_t H, float* R,
    void* y) {
  return by_dtype(dt, [&](auto tag) {
    using A = decltype(tag);
    zaya_emu_launch(N, rms_block_size(H), [&] {
      residual_scale_rmsnorm_fwd_kernel<A>((const A*)x, r, hs, hb, rs, rb, w, eps, H, R, (A*)y); });
  });
}

extern "C" int zaya_emu_residual_scale_rmsnorm_bwd(int dt, const void* dy, const float* dR, const void* x,
    const float* r, const float* hs, const float* rs, const float* w, const float* R, float eps, int64_t N,
    int64_t H, int64_t P, void* gx, float* gr, float* parts) {
  return by_dtype(dt, [&](auto tag) {
    using A = decltype(tag);
    zaya_emu_launch(P, rms_block_size(H, kRmsBwdMaxThreads), [&] {
      residual_scale_rmsnorm_bwd_kernel<A>((const A*)dy, dR, (const A*)x, r, hs, rs, w, R, eps, N, H,
                                           (N + P - 1) / P, (A*)gx, gr, parts); });
  });
}

extern "C" int zaya_emu_rmsnorm_fwd(int dti, int dto, const void* x, const float* w, float eps, int64_t N,
                                    int64_t H, void* y) {
  int rc = 1;
  by_dtype(dti, [&](auto ti) { rc = by_dtype(dto, [&](auto to) {
    using TI = decltype(ti); using TO = decltype(to);
    zaya_emu_launch(N, rms_block_size(H), [&] { rmsnorm_fwd_kernel<TI, TO>((const TI*)x, w, eps, H, (TO*)y); });
  }); });
  return rc;
}

extern "C" int zaya_emu_rmsnorm_bwd(int dti, int dto, const void* dy, const void* x, const float* w, float eps,
                                    int64_t N, int64_t H, int64_t P, void* gx, float* parts) {
  int rc = 1;
  by_dtype(dti, [&](auto ti) { rc = by_dtype(dto, [&](auto to) {
    using TI = decltype(ti); using TO = decltype(to);
    zaya_emu_launch(P, rms_block_size(H, kRmsBwdMaxThreads), [&] {
      rmsnorm_bwd_kernel<TI, TO>((const TO*)dy, (const TI*)x, w, eps, N, H, (N + P - 1) / P, (TI*)gx, parts); });
  }); });
  return rc;
}
"""


def find_host_cxx() -> str:
    for cand in [os.environ.get("ZAYA_HOST_CXX"), "g++", "clang++-19", "clang++"]:
        if cand and shutil.which(cand):
            return shutil.which(cand)
    raise ToolchainMissing("no host C++20 compiler (g++ or clang++) for the host emulation")


def host_emulation_command(src: Path, lib: Path, warp_size: int = 32) -> list[str]:
    """The host compile of a driver that includes kernels/*.cuh with ZAYA_HOST_EMULATION into a ctypes-loadable
    library, in warps of `warp_size` threads (the tests' drivers and EMULATION_DRIVER alike). Raises
    ToolchainMissing without a host C++20 compiler."""
    return [find_host_cxx(), "-std=c++20", "-O1", "-ffp-contract=off", "-fPIC", "-shared", "-pthread",
            f"-I{KERNELS_DIR}", f"-DZAYA_EMU_WARP_SIZE={warp_size}", str(src), "-o", str(lib)]


def build_host_emulation(dest: Path, warp_size: int = 32) -> Path:
    """Compiles the emulation driver, with warps of `warp_size` threads, into dest/zaya_emu.so (ctypes-loadable);
    raises RuntimeError on errors."""
    dest.mkdir(parents=True, exist_ok=True)
    src = dest / "zaya_emu.cpp"
    src.write_text(EMULATION_DRIVER)
    lib = dest / "zaya_emu.so"
    cmd = host_emulation_command(src, lib, warp_size)
    rc, out, _ = _run(cmd, timeout=600)
    if rc != 0:
        raise RuntimeError("host emulation build failed:\n" + " ".join(cmd) + "\n" + out[-6000:])
    return lib


# ----------------------------------------------------------------------------------------------------------------
# (b) the whole extension against torch's CUDA wheel
# ----------------------------------------------------------------------------------------------------------------
def default_venv() -> Path:
    return Path(os.environ.get("ZAYA_CUDA_VENV") or REPO_ROOT / ".cache" / "cuda-venv")


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def venv_ready(venv: Path) -> bool:
    py = _venv_python(venv)
    if not py.exists():
        return False
    rc, _, _ = _run([str(py), "-c", "import torch, setuptools, wheel, ninja; assert torch.version.cuda, 'cpu torch'"], timeout=300)
    return rc == 0


def ensure_cuda_venv(venv: Path | None = None, log=print) -> Path:
    """Creates (if missing) a venv with torch's CUDA wheel and the build tools; returns its python."""
    venv = venv or default_venv()
    if venv_ready(venv):
        return _venv_python(venv)
    log(f"creating {venv} with {' '.join(VENV_PACKAGES)} (~80 s, ~5.5 GB)")
    rc, out, secs = _run([sys.executable, "-m", "venv", str(venv)], timeout=600)
    if rc != 0:
        raise ToolchainMissing(f"python -m venv {venv} failed:\n{out[-4000:]}")
    rc, out, secs = _run([str(_venv_python(venv)), "-m", "pip", "install", *VENV_PACKAGES], timeout=3600)
    if rc != 0 or not venv_ready(venv):
        raise ToolchainMissing(f"pip install {' '.join(VENV_PACKAGES)} into {venv} failed:\n{out[-4000:]}")
    log(f"venv ready in {secs:.0f} s")
    return _venv_python(venv)


_LOAD_SCRIPT = r"""
import importlib.util, json, sys
import torch
so = sys.argv[1]
spec = importlib.util.spec_from_file_location("zaya_kernels._C", so)
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
launchers = json.loads(sys.argv[2]); ops = json.loads(sys.argv[3])
problems = []
if getattr(mod, "gpu_build", None) != "cuda":
    problems.append(f"_C.gpu_build is {getattr(mod, 'gpu_build', None)!r}, expected 'cuda'")
problems += [f"_C.{n} missing" for n in launchers if not hasattr(mod, n)]
for n in ops:
    try:
        getattr(torch.ops.zaya, n).default
    except (AttributeError, RuntimeError) as exc:
        problems.append(f"torch.ops.zaya.{n} not registered ({exc})")
if hasattr(mod, "residual_rmsnorm_bwd_num_partials"):
    p = mod.residual_rmsnorm_bwd_num_partials(4096, 2048)
    if not (isinstance(p, int) and p >= 1):
        problems.append(f"residual_rmsnorm_bwd_num_partials(4096, 2048) = {p!r}")
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda, "gpu_build": getattr(mod, "gpu_build", None),
                  "launchers": sorted(n for n in dir(mod) if not n.startswith("_")), "problems": problems}))
sys.exit(1 if problems else 0)
"""


def _copy_repo(dest: Path) -> None:
    build_outputs = shutil.ignore_patterns(".git", ".cache", "build", "dist", "*.egg-info", "__pycache__", "*.so",
                                           "*.o", ".venv*", ".pytest_cache", ".hypothesis")

    def ignore(folder, names):
        # hipify's copies from a ROCm build in this tree are generated too: the copy makes its own or none
        return build_outputs(folder, names) | {n for n in names if hipify_output(Path(n))}

    shutil.copytree(REPO_ROOT, dest, ignore=ignore, symlinks=True)


def _tree_files(root: Path) -> set[Path]:
    """Every file below root, relative to it."""
    return {p.relative_to(root) for p in root.rglob("*") if p.is_file()}


def unpacked_sdist(python: str, dest: Path, env: dict | None = None, source: Path | None = None) -> Path:
    """Make the source distribution of a copy of this repository (or of the tree `source`, left in place) with
    `python` (which must have torch and setuptools: setup.py imports torch) and unpack it under dest; returns the
    unpacked source tree."""
    copy = source or dest / "copy"
    if source is None:
        _copy_repo(copy)
    # setuptools' PEP 517 hook, what `python -m build --sdist --no-isolation` calls (`setup.py sdist` is deprecated)
    build_sdist = "import sys; from setuptools import build_meta; build_meta.build_sdist(sys.argv[1])"
    rc, out, _ = _run([python, "-c", build_sdist, str(dest / "dist")], cwd=copy, env=env, timeout=600)
    archives = sorted((dest / "dist").glob("*.tar.gz"))
    if rc != 0 or not archives:
        raise RuntimeError(f"building the sdist failed:\n{out[-4000:]}")
    with tarfile.open(archives[0]) as archive:
        # the "data" filter (no absolute paths, links out of the tree...) where this Python has it (3.10.12+)
        archive.extractall(dest / "sdist", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    if source is None:
        shutil.rmtree(copy, ignore_errors=True)
    (tree,) = (dest / "sdist").iterdir()
    return tree


def check_extension(venv: Path | None = None, arch_list: str = "9.0", max_jobs: int = 2, keep: bool = False, log=print) -> CheckResult:
    """Builds zaya_kernels._C against torch's CUDA wheel (from the sdist of a temporary copy of the repo) and loads
    it."""
    venv = venv or default_venv()
    cuda_home = find_cuda_home()
    py = ensure_cuda_venv(venv, log=log)
    cpath = sorted(glob.glob(str(venv / "lib" / "python3*" / "site-packages" / "nvidia" / "cu*" / "include")))
    env = dict(os.environ)
    env.update(
        CUDA_HOME=str(cuda_home),
        TORCH_CUDA_ARCH_LIST=arch_list,
        MAX_JOBS=str(max_jobs),
        PATH=f"{venv / 'bin'}{os.pathsep}{cuda_home / 'bin'}{os.pathsep}{env.get('PATH', '')}",
    )
    env.pop("ZAYA_KERNELS_CPU_ONLY", None)
    env.pop("PYTHONPATH", None)
    if cpath:  # torch's CUDA headers include cusparse.h etc. from the nvidia wheels
        env["CPATH"] = os.pathsep.join(cpath + ([env["CPATH"]] if env.get("CPATH") else []))
    tmp = Path(tempfile.mkdtemp(prefix="zaya-ext-"))
    try:
        work = unpacked_sdist(str(py), tmp, env)
        log(f"building the CUDA extension in {work} (TORCH_CUDA_ARCH_LIST={arch_list}, MAX_JOBS={max_jobs})")
        rc, out, build_secs = _run([str(py), "setup.py", "build_ext", "--inplace"], cwd=work, env=env, timeout=3600)
        if rc != 0:
            errors = [line[:400] for line in out.splitlines() if re.search(r"error|FAILED", line)]
            return CheckResult("extension:cuda", "zaya_kernels._C", False, build_secs,
                               out[-3000:] + "\n--- build failed; error lines: ---\n" + "\n".join(errors[:30]))
        sos = sorted((work / "zaya_kernels").glob("_C*.so"))
        if not sos:
            return CheckResult("extension:cuda", "zaya_kernels._C", False, build_secs, "build produced no zaya_kernels/_C*.so\n" + out[-4000:])
        rc, out2, load_secs = _run(
            [str(py), "-c", _LOAD_SCRIPT, str(sos[0]), json.dumps(EXPECTED_LAUNCHERS), json.dumps(EXPECTED_OPS)],
            cwd=tmp, env=env, timeout=600,
        )
        msg = f"build {build_secs:.0f} s, load {load_secs:.1f} s\n" + out2.strip()[-4000:]
        return CheckResult("extension:cuda", "zaya_kernels._C", rc == 0, build_secs + load_secs, msg)
    finally:
        if keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------
# (c) The ROCm build up to the compiler
# ----------------------------------------------------------------------------------------------------------------
# Runs setup.py (in the working directory) as on a ROCm machine: torch made to look like a ROCm build
# (torch.version.hip set, ROCM_HOME a stand-in folder: argv[1]), setuptools.setup replaced by a recorder. setup.py
# then takes its ROCm branch, and torch.utils.cpp_extension.CUDAExtension hipifies the sources in place, as
# `pip install` does there before hipcc runs. Prints the configured extension, and the flags torch gives every
# hipcc compile, as JSON.
_ROCM_SETUP_SCRIPT = r"""
import json, runpy, sys
from unittest import mock
import setuptools
import torch
import torch.utils.cpp_extension as cpp_extension
configured = {}
with mock.patch.object(torch.version, "hip", "7.0.0"), mock.patch.object(cpp_extension, "ROCM_HOME", sys.argv[1]), \
        mock.patch.object(cpp_extension, "IS_HIP_EXTENSION", True), \
        mock.patch.object(setuptools, "setup", lambda **kwargs: configured.update(kwargs)):
    runpy.run_path("setup.py", run_name="__main__")
(ext,) = configured["ext_modules"]
hipcc_flags = cpp_extension.COMMON_HIPCC_FLAGS + cpp_extension.COMMON_HIP_FLAGS  # what every hipcc compile gets
print("ZAYA_EXTENSION " + json.dumps({"sources": ext.sources, "extra_compile_args": ext.extra_compile_args,
                                      "hipcc_flags": hipcc_flags}))
"""
_QUOTED_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.MULTILINE)


def _rocm_build_problems(tree: Path, ext: dict, written: list[Path], sdist_files: set[str]) -> list[str]:
    """What is wrong with the extension setup.py configured for ROCm in `tree` (see check_rocm_build)."""
    problems = []
    expected = sorted(p.stem for p in [tree / "csrc" / "zaya_ops.cpp", *(tree / "csrc").glob("*.cu")])
    if sorted(Path(src).stem for src in ext["sources"]) != expected:
        problems.append(f"the ROCm extension compiles {sorted(ext['sources'])}, expected one source each of {expected}")
    for kind, flags in ext["extra_compile_args"].items():
        if "-DZAYA_WITH_GPU" not in flags:
            problems.append(f"the ROCm extension's {kind} flags lack -DZAYA_WITH_GPU: {flags}")
    # every file hipcc would read: the sources and, transitively, their quoted includes
    pending, seen = [tree / src for src in ext["sources"]], set()
    while pending:
        path = pending.pop()
        if path in seen:
            continue
        seen.add(path)
        text = path.read_text()
        if "<<<" in text:
            problems.append(f"{path.relative_to(tree)}: a CUDA launch (<<<) that hipify left as it was")
        for name in _QUOTED_INCLUDE.findall(text):
            if name.startswith("hip/"):  # hipify's own "hip/hip_runtime.h": a ROCm header, quoted
                continue
            found = [d / name for d in (path.parent, tree / "csrc", tree / "kernels") if (d / name).is_file()]
            if not found:
                problems.append(f"{path.relative_to(tree)}: #include \"{name}\" is not a file of the tree")
            else:
                pending.append(found[0])
    for rel in written:
        if not hipify_output(rel):
            problems.append(f"the ROCm configure step wrote {rel}, which is no hipify copy (csrc/*.hip, "
                            "kernels/*_hip.cuh)")
        if rel.as_posix() in sdist_files:
            problems.append(f"{rel}, written by hipify, is in the source distribution (MANIFEST.in)")
    if (REPO_ROOT / ".git").exists() and written:
        rc, out, _ = _run(["git", "check-ignore", "--no-index", "--verbose", "--non-matching",
                           *(rel.as_posix() for rel in written)], cwd=REPO_ROOT)
        not_ignored = [line.split("\t")[-1] for line in out.splitlines() if line.startswith("::")]
        if rc not in (0, 1) or not_ignored:
            problems.append(f"hipify's copies not ignored by .gitignore: {not_ignored or out[-400:]}")
    return problems


def check_rocm_build(python: str = sys.executable, arch: str = AMD_ARCH) -> list[CheckResult]:
    """What `pip install` on a ROCm machine does before hipcc runs, in a copy of the repository (_ROCM_SETUP_SCRIPT),
    and then the hipified kernel headers compiled for `arch` as in (a), with the defines torch gives hipcc.
    Checked: setup.py configures the GPU extension with every csrc/ source; hipify leaves no CUDA launch (<<<) in
    what hipcc would compile and every quoted #include there names a file of the tree; every file it writes is a
    hipify copy (`hipify_output`) that .gitignore ignores and a source distribution leaves out. The ROCm torch
    headers the launchers include are not here: the launchers are checked as text only. Raises ToolchainMissing
    without clang (the compile step)."""
    with tempfile.TemporaryDirectory(prefix="zaya-rocm-") as tmp:
        tmp = Path(tmp)
        tree = tmp / "repo"
        _copy_repo(tree)
        before = _tree_files(tree)
        (tmp / "rocm").mkdir()
        env = {k: v for k, v in os.environ.items() if k not in ("ZAYA_KERNELS_CPU_ONLY", "PYTORCH_ROCM_ARCH")}
        rc, out, secs = _run([python, "-c", _ROCM_SETUP_SCRIPT, str(tmp / "rocm")], cwd=tree, env=env, timeout=600)
        line = next((ln for ln in out.splitlines() if ln.startswith("ZAYA_EXTENSION ")), None)
        if rc != 0 or line is None or "building for ROCm gfx942;gfx950" not in out:
            return [CheckResult("rocm:configure", "setup.py", False, secs, out[-4000:])]
        written = sorted(_tree_files(tree) - before)
        sdist = unpacked_sdist(python, tmp / "sdist", env, source=tree)
        sdist_files = {p.as_posix() for p in _tree_files(sdist)}
        ext = json.loads(line.split(" ", 1)[1])
        problems = _rocm_build_problems(tree, ext, written, sdist_files)
        summary = f"{len(written)} files hipified: " + ", ".join(str(p) for p in written)
        results = [CheckResult("rocm:configure", "setup.py", not problems, secs, "\n".join(problems) or summary)]
        hipified = [tree / "kernels" / f"{h.stem}_hip.cuh" for h in kernel_headers()]
        missing = [p.name for p in hipified if not p.is_file()]
        if missing:
            results.append(CheckResult("rocm:configure", "kernels", False, 0.0, f"hipify wrote no {missing}"))
            return results
        # with torch's hipcc flags (its -D defines and -fPIC; the include paths and arch flags are the check's)
        hipcc_defines = [f for f in ext["hipcc_flags"] if f.startswith("-D") or f == "-fPIC"]
        return results + check_amd(arch, hipified, include_dir=tree / "kernels", defines=hipcc_defines)


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zaya_kernels.tools.gpu_compile_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--amd", action="store_true", help=f"compile kernels/*.cuh for {', '.join(AMD_ARCHS)} "
                        "with clang -x hip")
    parser.add_argument("--nvidia", action="store_true", help=f"compile kernels/*.cuh for {NVIDIA_ARCH} with nvcc")
    parser.add_argument("--extension", action="store_true", help="build and load the whole extension against CUDA torch")
    parser.add_argument("--rocm", action="store_true", help="configure the ROCm build (hipify) and compile its kernels")
    parser.add_argument("--amd-arch", default=None, help="only this AMD target (default: all of them with --amd, "
                        f"{AMD_ARCH} with --rocm)")
    parser.add_argument("--nvidia-arch", default=NVIDIA_ARCH)
    parser.add_argument("--venv", type=Path, default=None, help="venv for --extension (default $ZAYA_CUDA_VENV or .cache/cuda-venv)")
    parser.add_argument("--keep", action="store_true", help="keep the --extension build folder")
    parser.add_argument("--fail-on-spill", action="store_true", help="fail when a kernel spills registers")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if not (args.amd or args.nvidia or args.extension or args.rocm):
        args.amd = args.nvidia = True

    results: list[CheckResult] = []
    missing: list[str] = []
    steps = []
    if args.amd:
        for arch in [args.amd_arch] if args.amd_arch else AMD_ARCHS:
            steps.append((f"amd:{arch}", lambda arch=arch: check_amd(arch)))
    if args.nvidia:
        steps.append(("nvidia", lambda: check_nvidia(args.nvidia_arch)))
    if args.extension:
        steps.append(("extension", lambda: [check_extension(args.venv, keep=args.keep)]))
    if args.rocm:
        steps.append(("rocm", lambda: check_rocm_build(arch=args.amd_arch or AMD_ARCH)))
    for label, step in steps:
        try:
            new = step()
        except ToolchainMissing as exc:
            missing.append(f"{label}: {exc}")
            print(f"[MISSING] {label}: {exc}", flush=True)
            continue
        for res in new:
            print(res.summary(), flush=True)
        results.extend(new)

    spilled = spills(results)
    if spilled:
        print("register spills:\n  " + "\n  ".join(spilled))
    failed = [r for r in results if not r.ok]
    if args.json:
        args.json.write_text(json.dumps({"results": [asdict(r) for r in results], "missing": missing, "spills": spilled}, indent=1))
    print(f"{len(results) - len(failed)}/{len(results)} passed" + (f", {len(missing)} toolchain(s) missing" if missing else ""))
    return 1 if failed or missing or (args.fail_on_spill and spilled) else 0


if __name__ == "__main__":
    sys.exit(main())
