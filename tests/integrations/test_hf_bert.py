"""A Hugging Face BertForMaskedLM (built from a tiny config, no download) recorded through the public API."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import graftlab
from graftlab import trace
from graftlab.record.recorder import Recorder

transformers = pytest.importorskip("transformers")


def test_hf_bert_records_with_kinds(tmp_path):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = transformers.BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16)
    model = transformers.BertForMaskedLM(cfg)
    adam = torch.optim.Adam(model.parameters(), lr=1e-3)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = graftlab.Graft(adam, sgd, granularity="layer", names=model)
    ids = torch.randint(0, 60, (4, 12), generator=torch.Generator().manual_seed(1))
    labels = torch.full_like(ids, -100)
    labels[:, ::3] = ids[:, ::3]
    with Recorder(opt, tmp_path / "t", model=model, flush_every=2, metadata={"task": "hf-bert"}) as rec:
        for _ in range(3):
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            rec.log(loss=loss.detach())
    df = trace.read_trace(tmp_path / "t")
    names = [n for n, _ in model.named_parameters()]
    assert list(df.group[: len(names)]) == names and len(df) == 3 * len(names)
    meta_groups = {g["name"]: g for g in df.attrs["graftlab"]["groups"]}
    expected = {
        "bert.embeddings.word_embeddings.weight": ("embedding", None, None),
        "bert.embeddings.LayerNorm.weight": ("norm", None, None),
        "bert.encoder.layer.1.attention.self.query.weight": ("Q", None, 1),
        "bert.encoder.layer.1.attention.self.key.bias": ("K", None, 1),
        "bert.encoder.layer.0.attention.self.value.weight": ("V", None, 0),
        "bert.encoder.layer.0.attention.output.dense.weight": ("attn_out", None, 0),
        "bert.encoder.layer.0.attention.output.LayerNorm.bias": ("norm", None, 0),
        "bert.encoder.layer.1.intermediate.dense.weight": ("ffn", "fc1", 1),
        "bert.encoder.layer.1.output.dense.weight": ("ffn", "fc2", 1),
        "bert.encoder.layer.1.output.LayerNorm.weight": ("norm", None, 1),
        "cls.predictions.transform.dense.weight": ("output", None, None),
        "cls.predictions.transform.LayerNorm.weight": ("output", None, None),
    }
    for name, (kind, ffn, block) in expected.items():
        g = meta_groups[name]
        assert (g["kind"], g["ffn"], g["block"]) == (kind, ffn, block), name
    counts = trace.group_table(df.attrs["graftlab"]).kind.value_counts()
    assert counts["Q"] == counts["K"] == counts["V"] == counts["attn_out"] == 4
    assert "other" not in counts
    # every group with weights that moved has a finite ratio
    w = df[df.group.str.endswith("weight")]
    assert np.isfinite(w.ratio).all()
