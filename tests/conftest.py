import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def micro_world(tmp_path_factory):
    """The synth "micro" world (seed 0), built (``samples`` with splits), in a folder named
    ``micro``; generated once per test session. Shared: read it, copy it before changing it."""
    from onemall_pl.data.build import build
    from onemall_pl.data.synth import generate

    out = tmp_path_factory.mktemp("world") / "micro"
    generate(out, "micro", seed=0)
    build(dataset=out)
    return out


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
