"""Multi-process detection and the optional TensorBoard writer of the training entry point."""

import sys
import types

from twig_jax.train.trainer import wants_distributed
from twig_jax.train.trainer import tensorboard_writer


def test_wants_distributed_detects_multi_process_environments():
    assert not wants_distributed("auto", {})
    assert not wants_distributed("auto", {"TPU_WORKER_HOSTNAMES": "localhost"})  # single-host TPU
    assert wants_distributed("auto", {"TPU_WORKER_HOSTNAMES": "h0,h1,h2,h3"})
    assert wants_distributed("auto", {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
    assert wants_distributed("on", {}) and not wants_distributed("off", {"JAX_COORDINATOR_ADDRESS": "x:1"})


def test_tensorboard_writer_used_when_installed(monkeypatch, tmp_path):
    made = []

    class FakeWriter:
        def __init__(self, log_dir):
            made.append(log_dir)

    monkeypatch.setitem(sys.modules, "tensorboardX", types.SimpleNamespace(SummaryWriter=FakeWriter))
    w = tensorboard_writer(str(tmp_path))
    assert isinstance(w, FakeWriter) and made == [str(tmp_path)]
    assert tensorboard_writer(None) is None
