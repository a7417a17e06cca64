"""PyTorch checkpoints (`pytorch_model.bin`): indexed by replaying their pickle with stand-ins, read
through the same memory map as safetensors, and merged as their safetensors twins are."""
from __future__ import annotations

import collections
import json
import os
import pickle
import shutil
import zipfile

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import load_folder
from seme.errors import SemeError
from seme.io.safetensors_file import MappedFile
from seme.io.torch_file import read_torch_index
from seme.merge import main


def read_all(path) -> dict:
    return {name: MappedFile(path).tensor(info) for name, info in read_torch_index(str(path)).items()}


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                         b.reshape(-1).view(torch.uint8))


def state_dicts():
    g = torch.Generator().manual_seed(0)
    fused = torch.randn(12, 5, generator=g)
    embed = torch.randn(7, 3, generator=g).bfloat16()
    yield "dtypes", {str(d): torch.randn(4, 3, generator=g).to(d) for d in
                     (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int8, torch.bool)}
    yield "float8 (_rebuild_tensor_v3)", {"f8": torch.randn(6, generator=g).to(torch.float8_e4m3fn),
                                          "f8b": torch.randn(2, 2, generator=g).to(torch.float8_e5m2)}
    # q, k and v saved as views of one fused matrix: one storage, three offsets.
    yield "views of one storage", {"q": fused[:4], "k": fused[4:8], "v": fused[8:], "row": fused[5]}
    yield "tied weights", {"embed_tokens.weight": embed, "lm_head.weight": embed}
    yield "scalars, empty and parameters", collections.OrderedDict(
        scalar=torch.tensor(3.5), empty=torch.zeros(0, 4), param=torch.nn.Parameter(torch.ones(3, 1, 2)))
    yield "wrapped in state_dict", {"state_dict": {"w": torch.randn(2, 3, generator=g)}}


@pytest.mark.parametrize("case, state", list(state_dicts()), ids=[c for c, _ in state_dicts()])
def test_every_tensor_reads_as_torch_load_gives_it(tmp_path, case, state):
    torch.save(state, tmp_path / "w.bin")
    expected = torch.load(tmp_path / "w.bin", weights_only=True)
    expected = expected.get("state_dict", expected)
    got = read_all(tmp_path / "w.bin")
    assert set(got) == set(expected)
    for name in expected:
        assert same(got[name], expected[name]), name


def _rewrite(source, target, replace=None, drop=(), compress=()):
    """A copy of the zip archive `source` with entries replaced, dropped or stored deflated."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
        for info in src.infolist():
            if info.filename.endswith(drop):
                continue
            data = (replace or {}).get(info.filename.split("/", 1)[1], src.read(info))
            kind = zipfile.ZIP_DEFLATED if info.filename.endswith(compress) else zipfile.ZIP_STORED
            dst.writestr(info.filename, data, compress_type=kind)


class _Shell:
    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def hostile_pickle(marker) -> bytes:
    shell = _Shell()
    shell.marker = marker
    return pickle.dumps({"w": shell}, protocol=2)


BAD = {  # case: (make(path, plain checkpoint, marker file), message)
    "runs code": (lambda p, plain, marker: _rewrite(plain, p, replace={"data.pkl": hostile_pickle(marker)}),
                  "its pickle refers to posix.system, which a state dict does not; seme runs no pickled code"),
    "non-contiguous": (lambda p, *_: torch.save({"w": torch.ones(3, 5).t()}, p),
                       "tensor 'w' is saved as a non-contiguous view"),
    "compressed": (lambda p, plain, _: _rewrite(plain, p, compress=("data/0",)), "tensor 'w' is stored compressed"),
    "missing storage": (lambda p, plain, _: _rewrite(plain, p, drop=("data/0",)),
                        "refers to storage '0', which the archive does not hold"),
    "legacy format": (lambda p, *_: torch.save({"w": torch.ones(2)}, p, _use_new_zipfile_serialization=False),
                      "not a PyTorch zip checkpoint (a legacy or foreign format)"),
    "not a state dict": (lambda p, *_: torch.save([torch.ones(2)], p), "holds a list, not a state dict"),
    "non-tensor entry": (lambda p, *_: torch.save({"w": torch.ones(2), "step": 3}, p), "entry 'step' is not a tensor"),
    "big-endian": (lambda p, plain, _: _rewrite(plain, p, replace={"byteorder": b"big"}), "a big-endian checkpoint"),
    "corrupt pickle": (lambda p, plain, _: _rewrite(plain, p, replace={"data.pkl": b"\x80\x02}q\x00(X"}),
                       "corrupt checkpoint pickle"),
    "truncated": (lambda p, plain, _: p.write_bytes(plain.read_bytes()[:-200]), "corrupt zip archive"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_checkpoints_are_refused_in_one_line_and_run_nothing(tmp_path, case):
    plain, marker, path = tmp_path / "plain.bin", tmp_path / "ran", tmp_path / "w.bin"
    torch.save({"w": torch.ones(4, 4)}, plain)
    make, message = BAD[case]
    make(path, plain, marker)
    with pytest.raises(SemeError) as e:
        read_torch_index(str(path))
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists()


def pickled_twin(folder, target, shards: int = 1) -> str:
    """A copy of safetensors model `folder` whose weights are pytorch_model.bin (sharded: with an index)."""
    shutil.copytree(folder, target, ignore=shutil.ignore_patterns("*.safetensors*"))
    state = load_folder(folder)
    names = sorted(state)
    if shards == 1:
        torch.save(state, os.path.join(target, "pytorch_model.bin"))
        return str(target)
    weight_map = {}
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = names[i::shards]
        torch.save({n: state[n] for n in part}, os.path.join(target, file))
        weight_map.update({n: file for n in part})
    with open(os.path.join(target, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return str(target)


def merge(tmp_path, recipe, out) -> dict:
    path = tmp_path / f"{out}.yml"
    path.write_text(yaml.safe_dump(recipe))
    assert main([str(path), str(tmp_path / out)]) == 0
    return load_folder(tmp_path / out)


def test_pickled_models_merge_as_their_safetensors_twins(llama_family, tmp_path):
    twins = {"base": pickled_twin(llama_family["base"], tmp_path / "base", shards=1),
             "expert0": pickled_twin(llama_family["expert0"], tmp_path / "expert0", shards=3),
             "expert1": llama_family["expert1"]}  # a safetensors model beside pickled ones

    def ties(m):
        return {"merge_method": "ties", "base_model": m["base"], "dtype": "bfloat16",
                "models": [{"model": m[e], "parameters": {"weight": 1.0, "density": 0.4}} for e in ("expert0", "expert1")]}

    expected = merge(tmp_path, ties(llama_family), "from-safetensors")
    got = merge(tmp_path, ties(twins), "from-pickles")
    assert set(got) == set(expected)
    for name in expected:
        assert same(got[name], expected[name]), name


def test_a_pickled_adapter_applies_as_its_safetensors_twin(llama_family, tmp_path):
    from test_lora import make_adapter

    adapter, _ = make_adapter(llama_family["base"], tmp_path, seed=3)
    pickled = tmp_path / "pickled-adapter"
    shutil.copytree(adapter, pickled, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(load_file(os.path.join(adapter, "adapter_model.safetensors")), pickled / "adapter_model.bin")

    def linear(ref):
        return {"merge_method": "linear", "dtype": "float32",
                "models": [{"model": f"{ref}", "parameters": {"weight": 0.5}},
                           {"model": llama_family["expert0"], "parameters": {"weight": 0.5}}]}

    expected = merge(tmp_path, linear(f"{llama_family['base']}+{adapter}"), "from-safetensors")
    got = merge(tmp_path, linear(f"{llama_family['base']}+{pickled}"), "from-pickle")
    for name in expected:
        assert same(got[name], expected[name]), name
