"""sotu_delta.torch, and a merged model loaded by transformers. torch is not in `make test`'s
venv (PyPI's torch brings its CUDA libraries, about 5.5 GB): there these tests print why they
are skipped; `make test-torch` runs them in a venv of their own."""

from __future__ import annotations

import json

import numpy as np
import pytest

import sotu_delta
from conftest import FIX, cli, read_tensors

torch = pytest.importorskip(
    "torch", reason="torch is not installed here (make test-torch runs these tests with it)"
)
import sotu_delta.torch as sdt  # noqa: E402  (imports torch)

BASE = FIX / "base-bf16.safetensors"


def raw_bytes(t):
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("method,dtype", [("sum", None), ("ties", None), ("tsv", "f32")])
def test_load_merged_is_the_cli_file(tmp_path, deltas, method, dtype):
    args = ["--method", method] + (["--dtype", dtype] if dtype else [])
    cli("merge", "--base", BASE, *deltas, "-o", tmp_path / "m.safetensors", "-q", *args)
    want, _ = read_tensors(tmp_path / "m.safetensors")
    got = sdt.load_merged(BASE, deltas, method=method, dtype=dtype)
    assert sorted(got) == sorted(want)
    names = {"BF16": torch.bfloat16, "F32": torch.float32, "I64": torch.int64, "F16": torch.float16}
    for name, (st, shape, raw) in want.items():
        t = got[name]
        assert isinstance(t, torch.Tensor) and t.dtype == names[st], (name, t.dtype, st)
        assert tuple(t.shape) == shape
        assert raw_bytes(t) == raw, name


def test_extract_from_a_torch_state_dict(tmp_path):
    tuned = FIX / "task3-bf16.safetensors"
    tensors, _ = read_tensors(tuned)
    state = {}
    for name, (dtype, shape, raw) in tensors.items():
        bits = torch.from_numpy(np.frombuffer(raw, dtype=np.uint8).copy())
        dt = {"BF16": torch.bfloat16, "F32": torch.float32, "I64": torch.int64}[dtype]
        state[name] = bits.view(dt).reshape(shape)
    sotu_delta.extract(BASE, state, tmp_path / "mem.safetensors", slot="2/3", quiet=True)
    cli("extract", "--base", BASE, "--tuned", tuned, "--slot", "2/3", "-o", tmp_path / "file.safetensors", "-q")
    assert (tmp_path / "mem.safetensors").read_bytes() == (tmp_path / "file.safetensors").read_bytes()


def test_a_merged_model_loads_with_from_pretrained_and_runs(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed here")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=48, max_position_embeddings=32,
    )
    base_model = transformers.BertModel(config).eval()
    base_model.save_pretrained(tmp_path / "base")
    deltas = []
    for k in range(2):
        tuned = transformers.BertModel(config).eval()
        tuned.load_state_dict(base_model.state_dict())
        with torch.no_grad():
            for p in tuned.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        d = tmp_path / f"task{k}.delta.safetensors"
        # A model fine-tuned in this process, extracted from its state dict.
        sotu_delta.extract(tmp_path / "base", tuned.state_dict(), d, slot=f"{k}/2", quiet=True)
        deltas.append(d)

    sotu_delta.merge(tmp_path / "base", deltas, tmp_path / "merged", quiet=True)
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["hidden_size"] == 32
    merged = transformers.AutoModel.from_pretrained(tmp_path / "merged").eval()
    in_memory = sdt.load_merged(tmp_path / "base", deltas)
    again = transformers.BertModel(config).eval()
    again.load_state_dict(in_memory)

    ids = torch.tensor([[1, 5, 9, 3, 2]])
    with torch.no_grad():
        a = merged(input_ids=ids).last_hidden_state
        b = again(input_ids=ids).last_hidden_state
        c = base_model(input_ids=ids).last_hidden_state
    assert a.shape == (1, 5, 32) and torch.isfinite(a).all()
    assert torch.equal(a, b), "from_pretrained and load_merged give different models"
    assert not torch.equal(a, c), "the merge changed nothing"
    for name, t in merged.state_dict().items():
        if name in in_memory:
            assert torch.equal(t, in_memory[name]), name
