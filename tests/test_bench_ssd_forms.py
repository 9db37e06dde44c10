"""The kernel benchmark's `--ssd-variants` option on the CPU: SSD forms as (variant, segments[,
pieces]) and their labels, the ones the correctness harness also uses (plugins/harness/essm_lib.py).
Timing them needs a GPU (docs/benchmarks.md)."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

HARNESS = Path(__file__).resolve().parents[1] / "plugins" / "harness"


@pytest.fixture(scope="module")
def bench():  # noqa: ANN201 - the module
    sys.path.insert(0, str(HARNESS))  # bench_kernels imports essm_lib and peers as top-level modules
    try:
        spec = importlib.util.spec_from_file_location("edgessm_bench_kernels", HARNESS / "bench_kernels.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses resolve the module's annotations through it
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("edgessm_bench_kernels", None)
        sys.path.remove(str(HARNESS))


def test_forms_parse_into_tuples(bench) -> None:  # noqa: ANN001
    assert bench.parse_ssd_variants("0,0  4,2,4\t5,3") == [(0, 0), (4, 2, 4), (5, 3)]


@pytest.mark.parametrize("text", ["4", "4,2,1,1", "4,x"])
def test_a_malformed_form_is_refused(bench, text: str) -> None:  # noqa: ANN001
    with pytest.raises(argparse.ArgumentTypeError, match="VARIANT,SEGMENTS"):
        bench.parse_ssd_variants(text)


def test_labels_follow_the_harness_names(bench) -> None:  # noqa: ANN001
    known = bench.SSD_VARIANTS
    for form, label in known.items():
        assert bench.ssd_variant_label(form) == label
    assert bench.ssd_variant_label((4, 5, 2)) == "mma/4w/S5/P2"
    assert bench.ssd_variant_label((5, 2)) == "mma/8w/S2"
    assert bench.ssd_variant_label((4, 6, 0)) == "mma/4w/S6"
    assert bench.ssd_variant_label((6, 8)) == "mma/4w/single/S8"
    assert bench.ssd_variant_label((4, 0)) == "mma/4w/Sauto"
