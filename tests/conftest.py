"""Fixtures shared by test files."""

import pytest
import torch

from tiny import training_setup


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tiny models on one torch thread.

    Tiny models gain nothing from threads, and on a busy machine OpenMP spin-waiting makes them ~10× slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny α pipeline folder, 8 captioned images (two colours × four shades) and their feature cache."""
    root = tmp_path_factory.mktemp("train")
    return (root, *training_setup(root))
