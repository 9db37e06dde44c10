"""plugins/harness/peers.py (the benchmark's mamba_ssm peer) on the CPU: the folder checks and import
errors a user sees before any GPU is involved. Timing the peer needs a GPU (docs/benchmarks.md)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

HARNESS = Path(__file__).resolve().parents[1] / "plugins" / "harness"


@pytest.fixture(scope="module")
def peers():  # noqa: ANN201 - the module
    spec = importlib.util.spec_from_file_location("edgessm_bench_peers", HARNESS / "peers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the module's annotations through it
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_a_folder_without_mamba_ssm_names_itself_and_the_fix(peers, tmp_path: Path) -> None:  # noqa: ANN001
    with pytest.raises(ImportError, match=rf"{tmp_path}: no mamba_ssm/ops/triton/ssd_combined.py; "
                                          r"run tools/peer_mamba_ssm.sh first"):
        peers.load_mamba_ssm(tmp_path)


def test_a_broken_peer_reports_the_import_error(peers, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    pkg = tmp_path / "mamba_ssm" / "ops" / "triton"
    pkg.mkdir(parents=True)
    for init in (tmp_path / "mamba_ssm", tmp_path / "mamba_ssm" / "ops", pkg):
        (init / "__init__.py").write_text("")
    (pkg / "ssd_combined.py").write_text("import a_module_that_is_not_there\n")
    monkeypatch.setattr(sys, "path", list(sys.path))  # load_mamba_ssm prepends the folder
    for name in [m for m in sys.modules if m == "mamba_ssm" or m.startswith("mamba_ssm.")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(ImportError, match=rf"{tmp_path}: importing mamba_ssm's Triton kernels failed: "
                                          r".*a_module_that_is_not_there"):
        peers.load_mamba_ssm(tmp_path)
