import pytest
from train_runs import make_shards


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Byte-tokenizer shards of the sample text (train_runs.make_shards), made once per test module."""
    return make_shards(tmp_path_factory.mktemp("shards"))
