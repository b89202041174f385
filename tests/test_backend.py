"""The one backend selector: requests, availability, reference-only ops, and saying what ran."""
import pytest
import torch

import zaya_kernels
from zaya_kernels import backend
from zaya_kernels.ops import new_balance_state


def test_context_manager_nests_and_restores(monkeypatch):
    monkeypatch.delenv("ZAYA_KERNELS_BACKEND", raising=False)
    assert backend.requested_backend() == "auto"
    with zaya_kernels.use_backend("reference"):
        with zaya_kernels.use_backend("triton"):
            assert backend.requested_backend() == "triton"
        assert backend.requested_backend() == "reference"
    assert backend.requested_backend() == "auto"
    with pytest.raises(ValueError, match="unknown zaya_kernels backend"):
        with zaya_kernels.use_backend("rocm"):
            pass


def test_reference_only_op_runs_under_any_request_and_says_so():
    counts_bias = torch.zeros(5)
    state, step = new_balance_state(5)
    with zaya_kernels.use_backend("triton"):
        zaya_kernels.ops.router_balance_update(torch.tensor([0, 1, 1, 4], dtype=torch.int32), counts_bias, state, step)
    assert zaya_kernels.last_backend("router_balance_update") == "reference"
    assert int(step) == 1


def test_log_names_the_backend_once(monkeypatch, capsys):
    monkeypatch.setenv("ZAYA_KERNELS_LOG", "1")
    monkeypatch.setattr(backend, "_logged", set())  # forget what this worker logged before
    x, w = torch.ones(2, 8), torch.ones(8)
    with zaya_kernels.use_backend("reference"):
        torch.ops.zaya.rmsnorm(x, w, 1e-5, None)
        torch.ops.zaya.rmsnorm(x, w, 1e-5, None)
    err = capsys.readouterr().err
    assert err.count("[zaya_kernels] rmsnorm: reference backend on cpu") == 1  # once per combination


def test_auto_on_cpu_is_the_reference():
    with zaya_kernels.use_backend("auto"):
        assert backend.select("rmsnorm", "cpu", ("reference", "triton", "hip"), ("hip", "triton")) == "reference"
    with pytest.raises(backend.BackendUnavailableError, match="no GPU backend"):
        with zaya_kernels.use_backend("auto"):
            backend.select("some_op", "cuda", ("reference",), ())


@pytest.mark.parametrize("hip, arch, expected", [(None, "NVIDIA H200", "sm_90"), ("6.4", "gfx942:sramecc+:xnack-",
                                                  "gfx942"), ("6.4", "gfx950", "gfx950"), ("6.4", "", "gfx942")])
def test_device_target_reads_the_vendor_from_the_torch_build(monkeypatch, hip, arch, expected):
    """Every Triton family picks its launch table through one device_target: CUDA builds of torch fill gcnArchName
    with the device name, so an H200 must get sm_90 (the MoE once read that field and took the gfx942 table)."""
    pytest.importorskip("triton")
    from types import SimpleNamespace

    from zaya_kernels.triton import _target, attention, moe

    monkeypatch.setattr(torch.version, "hip", hip)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(gcnArchName=arch))
    monkeypatch.setattr(_target, "_TARGETS", {})  # nothing remembered from earlier tests (restored after)
    assert _target.device_target(torch.device("cuda", 0)) == expected
    assert attention.device_target is moe.device_target is _target.device_target
    monkeypatch.setattr(_target, "_TARGETS", {})
    assert _target.device_target(torch.device("cpu")) == "interpreter"
