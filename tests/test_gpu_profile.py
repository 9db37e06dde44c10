"""edgessm.runtime.gpu_profile on the CPU: the kernel names and the table it prints (profiling itself
needs a CUDA device: docs/benchmarks.md)."""

from __future__ import annotations

from edgessm.runtime.gpu_profile import KernelTime, format_kernel_times, short_kernel_name


def test_kernel_names_lose_namespaces_return_type_and_arguments() -> None:
    name = ("void essm::(anonymous namespace)::ssd_mma_kernel<__half, __half, 128, 1, true>"
            "(essm::(anonymous namespace)::SsdArgs, int, bool, essm::(anonymous namespace)::SegSplit)")
    assert short_kernel_name(name) == "ssd_mma_kernel<__half, __half, 128, 1, true>"
    assert short_kernel_name("void essm::copy_kernel(float*, int)") == "copy_kernel"
    assert short_kernel_name("triton_gemv_0d1d2d") == "triton_gemv_0d1d2d"  # Triton names have no arguments


def test_items_name_time_and_repeated_launches() -> None:
    rows = [KernelTime("gemv", 12.34, 3.0), KernelTime("norm", 1.0, 1.0), KernelTime("copy", 0.5, 1.0)]
    assert format_kernel_times(rows) == "gemv: 12.3 us (x3), norm: 1.0 us, copy: 0.5 us"
    assert format_kernel_times(rows, top=1) == "gemv: 12.3 us (x3)"
