"""A merged sentence-transformers folder loads in sentence-transformers' own loader (issue #13).

    SOTU_BIN=target/release/sotu-delta python -m pytest -q tests/reference/test_sentence_transformers.py

A tiny BERT sentence-transformer (Transformer, Pooling, Dense, Normalize modules) is built and
saved by the library itself; a fine-tune of it is its weights plus noise, the Dense layer's
(`2_Dense/model.safetensors`, a weight file in a subfolder, docs/FORMAT.md section 15) too; the
binary extracts a delta and merges it into a folder, which `SentenceTransformer(folder)` must
load and encode with, exactly as the fine-tune does. Before issue #13 the merged folder lacked
`1_Pooling/` and failed to load (`Pooling.__init__() missing ... 'embedding_dimension'`), and
the Dense layer stayed the base's.

sentence-transformers (and torch) are not in `make test`'s venv: where they are not installed the
test says so and is skipped.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sotu_bin import run  # noqa: E402


def test_merged_folder_loads_in_sentence_transformers(tmp_path, capsys):
    try:
        import torch
        from safetensors.torch import load_file, save_file
        from sentence_transformers import SentenceTransformer, models
        from transformers import BertConfig, BertModel, BertTokenizer
    except ImportError as e:
        with capsys.disabled():
            print(f"\nSKIPPED test_merged_folder_loads_in_sentence_transformers: {e} "
                  "(sentence-transformers and torch are not part of make test's venv)")
        pytest.skip(f"sentence-transformers not installed: {e}")
    torch.manual_seed(0)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "merge", "delta"]
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizer(str(bert / "vocab.txt")).save_pretrained(bert)
    config = BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=32, max_position_embeddings=32)
    BertModel(config).save_pretrained(bert, safe_serialization=True)
    word = models.Transformer(str(bert))
    modules = [word, models.Pooling(16), models.Dense(16, 8), models.Normalize()]
    base = tmp_path / "base"
    SentenceTransformer(modules=modules).save(str(base))
    tuned = tmp_path / "tuned"
    SentenceTransformer(str(base)).save(str(tuned))
    for file in ("model.safetensors", "2_Dense/model.safetensors"):
        weights = load_file(tuned / file)
        save_file({k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
                   for k, v in weights.items()}, tuned / file, metadata={"format": "pt"})

    run("extract", "--base", base, "--tuned", tuned, "--density", "1", "-o", tmp_path / "d.st")
    merged = tmp_path / "merged"
    proc = run("merge", "--base", base, tmp_path / "d.st", "-o", merged)
    assert "2_Dense" not in proc.stderr  # merged, not copied from the base
    model = SentenceTransformer(str(merged))
    got = model.encode(["hello world", "merge delta"])
    want = SentenceTransformer(str(tuned)).encode(["hello world", "merge delta"])
    assert got.shape == (2, 8)
    # Density 1: the merge is the fine-tune itself, to the bit.
    assert (got == want).all()
