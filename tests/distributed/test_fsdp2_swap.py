"""accelerate's FSDP2 preparation swaps the Graft's tensors for DTensor shards after it was built."""
from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch

from tests import procs

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_fsdp2_switch_of_a_graft_built_before_fully_shard_steps_as_one_built_after():
    pytest.importorskip("accelerate")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = procs.run([sys.executable, "-m", "tests.distributed.fsdp2_swap_worker", port], seconds=600, cwd=ROOT,
                     env={**os.environ, "OMP_NUM_THREADS": "1"})
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["names_kept"] and out["sharded"]
    assert out["weights_diff"] == 0.0 and out["stats_diff"] == 0.0
    assert out["min_moved"] > 0  # every swapped-in shard stepped
