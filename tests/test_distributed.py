"""torchrun with 2 gloo processes on CPU: each rank writes its share of the shards; the result is
bit-identical to a single-process merge."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import yaml

from seme.distributed import assign
from seme.merge import main


def test_shards_are_balanced_by_bytes():
    assert assign([10, 1, 1, 8, 2], 2) == [0, 0, 1, 1, 1]  # loads 11 and 11
    assert assign([5, 5, 5, 5], 4) == [0, 1, 2, 3]
    assert assign([3], 2) == [0]


@pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")),
                    reason="torchrun not installed")
@pytest.mark.parametrize("stages", [1, 2])
def test_two_gloo_ranks_give_the_single_process_bytes(llama_family, tmp_path, stages):
    recipe = tmp_path / "recipe.yml"
    ties = {"merge_method": "ties", "base_model": llama_family["base"], "parameters": {"weight": 1.0, "density": 0.4},
            "models": [{"model": llama_family[f"expert{i}"]} for i in range(3)]}
    if stages == 1:
        recipe.write_text(yaml.safe_dump(ties))
    else:  # a multi-stage recipe: the ranks merge each stage together, in turn. The final one is
        # SeMe's, whose report holds every tensor's statistics, whichever rank merged it.
        final = {"merge_method": "seme", "base_model": "first",
                 "models": [{"model": llama_family["expert0"]}, {"model": llama_family["expert1"]}]}
        recipe.write_text(yaml.safe_dump({"name": "first", **ties}) + "---\n" + yaml.safe_dump(final))
    single = tmp_path / "single" / "out"
    assert main([str(recipe), str(single), "--out-shard-size", "40KB"]) == 0
    multi = tmp_path / "multi" / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(29517 + stages), "-m", "seme.merge", str(recipe), str(multi), "--out-shard-size", "40KB"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("seme: merged") == stages  # said once, by rank 0
    files = sorted(os.listdir(single))
    assert files == sorted(os.listdir(multi)) and len([f for f in files if f.endswith(".safetensors")]) > 2
    for f in files:  # SeMe's report names its pivot, the first stage's folder beside each output
        expected = (single / f).read_bytes().replace(str(single).encode(), str(multi).encode())
        assert expected == (multi / f).read_bytes(), f
