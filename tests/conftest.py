import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("DS_ACCELERATOR", "cpu")


import pytest  # noqa: E402


@pytest.fixture
def one_thread():
    """In-process forwards on one thread: on a shared 2-core machine two spinning OpenMP
    threads make each forward many times slower under load (launch/tool_setup.py). Files of
    in-process model tests use it for every test: ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ci_conformance(tmp_path_factory):
    """The CI conformance slice and the mutation suite, one launch of 2 gloo ranks for both
    (tests/conformance_cases.py)."""
    from conformance_cases import launch

    return launch(str(tmp_path_factory.mktemp("conformance") / "progress.jsonl"))
