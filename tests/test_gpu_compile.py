"""Ahead-of-time compile checks of the HIP/CUDA kernels (no GPU needed): zaya_kernels.tools.gpu_compile_check.

- every kernels/*.cuh instantiated and compiled for AMD gfx942 (clang-19 -x hip + rocm-device-libs) and gfx950
  (clang 20+, device code) and NVIDIA sm_90 (nvcc), warnings as errors;
- the source distribution holds every file a GPU build compiles (MANIFEST.in);
- the whole extension built from that sdist against torch's CUDA wheel in a separate venv and loaded (slow: minutes;
  the venv is created once at $ZAYA_CUDA_VENV, default .cache/cuda-venv, and reused);
- the ROCm build configured as `pip install` does it on a ROCm machine (setup.py's ROCm branch, torch's own hipify)
  and its hipified kernels compiled for gfx942.

A missing toolchain skips with the reason, unless ZAYA_REQUIRE_TOOLCHAINS=1 (CI), where it fails.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

# Loaded by path, not through `import zaya_kernels` (which needs the built extension): the tool is stdlib-only and
# these checks must run even when the package's extension is stale or missing.
_TOOL = Path(__file__).resolve().parent.parent / "zaya_kernels" / "tools" / "gpu_compile_check.py"
_spec = importlib.util.spec_from_file_location("zaya_gpu_compile_check", _TOOL)
gcc = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = gcc  # dataclasses look their module up
_spec.loader.exec_module(gcc)

pytestmark = pytest.mark.toolchain

REQUIRE = os.environ.get("ZAYA_REQUIRE_TOOLCHAINS", "0") == "1"


def _missing(exc: Exception):
    if REQUIRE:
        pytest.fail(f"toolchain missing and ZAYA_REQUIRE_TOOLCHAINS=1: {exc}")
    pytest.skip(f"toolchain missing: {exc}")


def _assert_all_pass(results):
    assert results, "no kernels/*.cuh headers were compiled"
    failed = [r for r in results if not r.ok]
    assert not failed, "\n\n".join(r.summary() for r in failed)


def test_every_header_has_an_instantiation_macro():
    # The check only generates code for kernels the header instantiates behind ZAYA_INSTANTIATE_<STEM>.
    for header in gcc.kernel_headers():
        assert gcc.instantiate_macro(header) in header.read_text(), (
            f"{header.name} has no `#if defined({gcc.instantiate_macro(header)})` explicit instantiation list"
        )


@pytest.mark.parametrize("arch", gcc.AMD_ARCHS)
def test_kernels_compile_for_amd(arch):
    """gfx942 with clang-19 (objects), gfx950 with clang 20+ (device assembly: see gcc._newer_clang_flags)."""
    try:
        results = gcc.check_amd(arch)
    except gcc.ToolchainMissing as exc:
        _missing(exc)
    _assert_all_pass(results)
    # Codegen happened: the resource report names every instantiated kernel.
    rr = [r for r in results if r.name == "residual_rmsnorm.cuh"]
    assert rr and any("residual_scale_rmsnorm_bwd_kernel<bf16>" in k for k in rr[0].kernels), rr[0].summary()
    assert sum(len(r.kernels) for r in results) >= 60, [r.summary() for r in results]
    for res in results:
        for kname, info in res.kernels.items():
            assert info.get("scratch", 0) == 0, f"{res.name} {kname} spills VGPRs to scratch memory: {info}"
            # an unresolved call (a stack of unknown size) would make every number above meaningless
            assert info.get("dynamic_stack", "False") == "False", f"{res.name} {kname} calls out: {info}"


def test_kernels_compile_for_nvidia_sm90():
    try:
        results = gcc.check_nvidia("sm_90")
    except gcc.ToolchainMissing as exc:
        _missing(exc)
    _assert_all_pass(results)
    rr = [r for r in results if r.name == "residual_rmsnorm.cuh"]
    assert rr and len(rr[0].kernels) >= 10, rr[0].summary()
    for res in results:  # ptxas -v: no register spilled to local memory
        for kname, info in res.kernels.items():
            assert info.get("spill_stores", 0) == 0 and info.get("spill_loads", 0) == 0, (
                f"{res.name} {kname} spills registers on sm_90: {info}")


def test_sdist_holds_every_file_the_gpu_build_needs(tmp_path):
    """`pip install` of a published source distribution builds the GPU extension from it alone: every file of csrc/
    and kernels/ and every package file must be in it, whichever machine made it (here CPU torch, whose setup.py
    configures the CPU-only extension: setuptools by itself adds csrc/zaya_ops.cpp and no header). No toolchain
    needed; the slow test below builds the CUDA extension from such an sdist."""
    tree = gcc.unpacked_sdist(sys.executable, tmp_path)
    root = gcc.REPO_ROOT
    needed = [p for folder in ("csrc", "kernels") for p in (root / folder).rglob("*")
              if p.is_file() and p.suffix in (".cpp", ".cu", ".h", ".cuh") and not gcc.hipify_output(p)]
    needed += [p for p in (root / "zaya_kernels").rglob("*") if p.suffix in (".py", ".json")]
    missing = sorted(str(p.relative_to(root)) for p in needed if not (tree / p.relative_to(root)).is_file())
    assert len(needed) >= 40 and not missing, f"missing from the sdist: {missing}"


@pytest.mark.slow
def test_cuda_extension_builds_and_loads():
    try:
        gcc.find_cuda_home()
        result = gcc.check_extension()
    except gcc.ToolchainMissing as exc:
        _missing(exc)
    assert result.ok, result.summary()


def test_rocm_build_hipifies_every_source_and_its_kernels_compile_for_gfx942():
    """`pip install` on a ROCm machine, up to its compiler: setup.py's ROCm branch with torch's own hipify (in a copy
    of the repository), then the hipified kernel headers compiled for gfx942 (gcc.check_rocm_build)."""
    try:
        results = gcc.check_rocm_build()
    except gcc.ToolchainMissing as exc:
        _missing(exc)
    _assert_all_pass(results)
    configure, *compiled = results
    assert configure.target == "rocm:configure" and "csrc/cca.hip" in configure.message, configure.summary()
    assert [r.name for r in compiled] == [f"{h.stem}_hip.cuh" for h in gcc.kernel_headers()]
    assert sum(len(r.kernels) for r in compiled) >= 20, [r.summary() for r in compiled]
    for res in compiled:
        for kname, info in res.kernels.items():
            assert info.get("scratch", 0) == 0, f"{res.name} {kname} spills VGPRs to scratch memory: {info}"


def test_rocm_build_check_names_what_hipify_got_wrong(tmp_path):
    """The checks behind the test above, on a made-up tree where each one must fire (no toolchain needed)."""
    (tmp_path / "csrc").mkdir()
    (tmp_path / "kernels").mkdir()
    for name in ("zaya_ops.cpp", "a.cu", "b.cu"):
        (tmp_path / "csrc" / name).write_text("")
    (tmp_path / "csrc" / "a.hip").write_text('#include "hip/hip_runtime.h"\n#include "k_hip.cuh"\n'
                                              'void f() { k<<<1, 1>>>(); }\n')
    (tmp_path / "kernels" / "k_hip.cuh").write_text('#include "gone.cuh"\n')
    ext = {"sources": ["csrc/zaya_ops.cpp", "csrc/a.hip"], "extra_compile_args": {"cxx": ["-O3"],
                                                                                 "nvcc": ["-DZAYA_WITH_GPU"]}}
    written = [Path("csrc/a.hip"), Path("kernels/k_hip.cuh"), Path("csrc/notes.txt")]
    problems = gcc._rocm_build_problems(tmp_path, ext, written, sdist_files={"kernels/k_hip.cuh"})
    expected = ["compiles", "cxx flags lack -DZAYA_WITH_GPU", "csrc/a.hip: a CUDA launch",
                'kernels/k_hip.cuh: #include "gone.cuh"', "wrote csrc/notes.txt",
                "kernels/k_hip.cuh, written by hipify, is in the source distribution"]
    for phrase in expected:
        assert sum(phrase in p for p in problems) == 1, (phrase, problems)
    # csrc/notes.txt is no hipify copy, and .gitignore does not ignore it (where this is a git checkout)
    assert len(problems) == len(expected) + (gcc.REPO_ROOT / ".git").exists(), problems
    assert gcc.hipify_output(Path("csrc/a.hip")) and gcc.hipify_output(Path("kernels/k_hip.cuh"))
    assert not gcc.hipify_output(Path("kernels/k.cuh")) and not gcc.hipify_output(Path("csrc/a.cu"))
    assert gcc.instantiate_macro(Path("cca_hip.cuh")) == gcc.instantiate_macro(Path("cca.cuh"))
    assert gcc.instantiate_macro(Path("cca.cuh")) == "ZAYA_INSTANTIATE_CCA"


# ---------------------------------------------------------------------------------------------------------------
# The HIP/CUDA kernels run on CPU threads (kernels/compat.cuh ZAYA_HOST_EMULATION): their indexing and math, checked
# on machines with no GPU. Small shapes (a std::thread per GPU thread), chosen to hit the register-cached columns,
# the re-read tail (H > 8 * block) of both kernels, odd H and more rows than row groups.
# ---------------------------------------------------------------------------------------------------------------
import ctypes  # noqa: E402

import torch  # noqa: E402

from helpers import EMULATED_WARP_SIZES, assert_close  # noqa: E402

_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
EPS = 1e-5


@pytest.fixture(scope="module", params=EMULATED_WARP_SIZES, ids=lambda w: f"warp{w}")
def emu(request, tmp_path_factory):
    try:
        lib = gcc.build_host_emulation(tmp_path_factory.mktemp(f"emu{request.param}"), request.param)
    except gcc.ToolchainMissing as exc:
        _missing(exc)
    return ctypes.CDLL(str(lib))


def _p(t):
    return ctypes.c_void_p(t.data_ptr()) if t is not None else ctypes.c_void_p(0)


def _emu_inputs(N, H, dtype, with_residual):
    g = torch.Generator().manual_seed(N * 1000 + H)
    x = (torch.randn(N, H, generator=g) * 2).to(dtype)
    r = torch.randn(N, H, generator=g) * 3 if with_residual else None
    hs, hb = torch.randn(H, generator=g) * 0.5 + 1, torch.randn(H, generator=g) * 0.1
    rs, rb = (torch.randn(H, generator=g) * 0.5 + 1, torch.randn(H, generator=g) * 0.1) if with_residual else (None, None)
    w = (torch.randn(H, generator=g) * 0.3 + 1).to(torch.bfloat16).float()
    return x, r, hs, hb, rs, rb, w


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("N,H,P,with_residual", [(3, 1, 2, True), (5, 67, 2, False), (3, 2047, 2, True), (2, 8200, 1, True)])
def test_residual_rmsnorm_kernels_emulated(emu, dtype, N, H, P, with_residual):
    x, r, hs, hb, rs, rb, w = _emu_inputs(N, H, dtype, with_residual)
    R, y = torch.empty(N, H), torch.empty(N, H, dtype=dtype)
    rc = emu.zaya_emu_residual_scale_rmsnorm_fwd(
        _CODES[dtype], _p(x), _p(r), _p(hs), _p(hb), _p(rs), _p(rb), _p(w), ctypes.c_float(EPS),
        ctypes.c_int64(N), ctypes.c_int64(H), _p(R), _p(y))
    assert rc == 0
    R_ref = (x.float() + hb) * hs + ((r + rb) * rs if r is not None else 0)
    assert torch.equal(R, R_ref)
    xr = R_ref.to(dtype).double()
    rstd = torch.rsqrt(xr.pow(2).mean(-1, keepdim=True) + EPS)
    assert_close(y, w.double() * (xr * rstd).to(dtype).double(), dtype=dtype, reduction=H, what="normed")

    dy = torch.randn(N, H, generator=torch.Generator().manual_seed(7)).to(dtype)
    dR = torch.randn(N, H) if with_residual else None
    gx, gr, parts = torch.empty(N, H, dtype=dtype), (torch.empty(N, H) if with_residual else None), torch.zeros(P, 4, H)
    rc = emu.zaya_emu_residual_scale_rmsnorm_bwd(
        _CODES[dtype], _p(dy), _p(dR), _p(x), _p(r), _p(hs), _p(rs), _p(w), _p(R), ctypes.c_float(EPS),
        ctypes.c_int64(N), ctypes.c_int64(H), ctypes.c_int64(P), _p(gx), _p(gr), _p(parts))
    assert rc == 0
    nh = xr * rstd
    dn = dy.double() * w.double()
    g = rstd * (dn - nh * (dn * nh).mean(-1, keepdim=True)) + (dR.double() if dR is not None else 0)
    scale = 4 * (dn.abs() * rstd).max().item()
    assert_close(gx, g * hs.double(), dtype=dtype, reduction=H, scale=scale * 2, what="grad_branch")
    if with_residual:
        assert_close(gr, g * rs.double(), dtype=torch.float32, reduction=H, scale=scale * 2, what="grad_residual")
    nhat = (xr.float() * rstd.float()).to(dtype).double()
    tot = parts.sum(0).double()
    assert_close(tot[0], g.sum(0), dtype=torch.float32, reduction=N * H, scale=scale * N, what="sum g")
    assert_close(tot[1], (g * x.double()).sum(0), dtype=torch.float32, reduction=N * H, scale=scale * N * 8, what="sum g*x")
    if with_residual:
        assert_close(tot[2], (g * r.double()).sum(0), dtype=torch.float32, reduction=N * H, scale=scale * N * 12, what="sum g*r")
    else:
        assert not tot[2].any()
    assert_close(tot[3], (dy.double() * nhat).sum(0), dtype=dtype, reduction=N, scale=float(N), what="grad norm_weight")


@pytest.mark.parametrize("in_dtype,out_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float16), (torch.float32, torch.float32)])
@pytest.mark.parametrize("N,H,P", [(3, 5, 3), (3, 2047, 2), (2, 8200, 2)])
def test_rmsnorm_kernels_emulated(emu, in_dtype, out_dtype, N, H, P):
    g = torch.Generator().manual_seed(H)
    x = (torch.randn(N, H, generator=g) * 3).to(in_dtype)
    w = (torch.randn(H, generator=g) * 0.3 + 1).to(torch.bfloat16).float()
    y = torch.empty(N, H, dtype=out_dtype)
    assert emu.zaya_emu_rmsnorm_fwd(_CODES[in_dtype], _CODES[out_dtype], _p(x), _p(w), ctypes.c_float(EPS),
                                    ctypes.c_int64(N), ctypes.c_int64(H), _p(y)) == 0
    xr = x.to(out_dtype).double()
    rstd = torch.rsqrt(xr.pow(2).mean(-1, keepdim=True) + EPS)
    assert_close(y, w.double() * (xr * rstd).to(out_dtype).double(), dtype=out_dtype, reduction=H, what="rmsnorm")
    dy = torch.randn(N, H, generator=g).to(out_dtype)
    gx, parts = torch.empty_like(x), torch.zeros(P, 1, H)
    assert emu.zaya_emu_rmsnorm_bwd(_CODES[in_dtype], _CODES[out_dtype], _p(dy), _p(x), _p(w), ctypes.c_float(EPS),
                                    ctypes.c_int64(N), ctypes.c_int64(H), ctypes.c_int64(P), _p(gx), _p(parts)) == 0
    nh = xr * rstd
    dn = dy.double() * w.double()
    gx_ref = rstd * (dn - nh * (dn * nh).mean(-1, keepdim=True))
    assert_close(gx, gx_ref, dtype=in_dtype, reduction=H, scale=4 * (dn.abs() * rstd).max().item(), what="grad_x")
    nhat = (xr.float() * rstd.float()).to(out_dtype).double()
    assert_close(parts.sum((0, 1)).double(), (dy.double() * nhat).sum(0), dtype=out_dtype, reduction=N, scale=float(N), what="grad weight")
