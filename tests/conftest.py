import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("DS_ACCELERATOR", "cpu")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ci_conformance(tmp_path_factory):
    """The CI conformance slice and the mutation suite, one launch of 2 gloo ranks for both
    (tests/conformance_cases.py)."""
    from conformance_cases import launch

    return launch(str(tmp_path_factory.mktemp("conformance") / "progress.jsonl"))
