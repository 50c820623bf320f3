"""Layer-kind rules: graftlab's BERT, Hugging Face BERT/GPT-2 names, torchvision-style ResNets."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from graftlab.errors import GraftlabError
from graftlab.kinds import GroupKind, classify, classify_model, classify_names, group_kind

BERT_OWN = {
    "embeddings.word.weight": ("embedding", None, None),
    "embeddings.position.weight": ("embedding", None, None),
    "embeddings.token_type.weight": ("embedding", None, None),
    "embeddings.norm.weight": ("norm", None, None),
    "blocks.0.attn.query.weight": ("Q", None, 0),
    "blocks.1.attn.key.bias": ("K", None, 1),
    "blocks.2.attn.value.weight": ("V", None, 2),
    "blocks.2.attn.out.bias": ("attn_out", None, 2),
    "blocks.0.attn_norm.weight": ("norm", None, 0),
    "blocks.0.ffn.fc1.weight": ("ffn", "fc1", 0),
    "blocks.11.ffn.fc2.bias": ("ffn", "fc2", 11),
    "blocks.0.ffn_norm.bias": ("norm", None, 0),
    "head.transform.weight": ("output", None, None),
    "head.norm.weight": ("output", None, None),  # the paper counts the MLM head's LayerNorm as "softmax"
    "head.decoder.bias": ("output", None, None),
}

HF_BERT = {
    "bert.embeddings.word_embeddings.weight": ("embedding", None, None),
    "bert.embeddings.position_embeddings.weight": ("embedding", None, None),
    "bert.embeddings.token_type_embeddings.weight": ("embedding", None, None),
    "bert.embeddings.LayerNorm.bias": ("norm", None, None),
    "bert.encoder.layer.0.attention.self.query.weight": ("Q", None, 0),
    "bert.encoder.layer.0.attention.self.key.bias": ("K", None, 0),
    "bert.encoder.layer.23.attention.self.value.weight": ("V", None, 23),
    "bert.encoder.layer.1.attention.output.dense.weight": ("attn_out", None, 1),
    "bert.encoder.layer.1.attention.output.LayerNorm.weight": ("norm", None, 1),
    "bert.encoder.layer.1.intermediate.dense.weight": ("ffn", "fc1", 1),
    "bert.encoder.layer.1.output.dense.bias": ("ffn", "fc2", 1),
    "bert.encoder.layer.1.output.LayerNorm.weight": ("norm", None, 1),
    "cls.predictions.bias": ("output", None, None),
    "cls.predictions.transform.dense.weight": ("output", None, None),
    "cls.predictions.transform.LayerNorm.weight": ("output", None, None),
    "bert.pooler.dense.weight": ("output", None, None),
}

GPT2 = {
    "transformer.wte.weight": ("embedding", None, None),
    "transformer.wpe.weight": ("embedding", None, None),
    "transformer.h.0.ln_1.weight": ("norm", None, 0),
    "transformer.h.0.attn.c_attn.weight": ("other", None, 0),  # fused QKV: cannot be split per kind
    "transformer.h.0.attn.c_proj.bias": ("attn_out", None, 0),
    "transformer.h.5.ln_2.bias": ("norm", None, 5),
    "transformer.h.5.mlp.c_fc.weight": ("ffn", "fc1", 5),
    "transformer.h.5.mlp.c_proj.weight": ("ffn", "fc2", 5),
    "transformer.ln_f.weight": ("norm", None, None),
    "lm_head.weight": ("output", None, None),
}

RESNET = {
    "conv1.weight": ("conv", None, None),
    "bn1.weight": ("norm", None, None),
    "bn1.bias": ("norm", None, None),
    "layer1.0.conv1.weight": ("conv", None, None),
    "layer1.0.bn2.bias": ("norm", None, None),
    "layer3.0.downsample.0.weight": ("conv", None, None),
    "layer3.0.downsample.1.weight": ("norm", None, None),
    "fc.weight": ("output", None, None),
    "fc.bias": ("output", None, None),
}

OTHERS = {
    "model.layers.3.self_attn.q_proj.weight": ("Q", None, 3),
    "model.layers.3.self_attn.o_proj.weight": ("attn_out", None, 3),
    "model.layers.3.mlp.gate_proj.weight": ("ffn", "fc1", 3),
    "model.layers.3.mlp.down_proj.weight": ("ffn", "fc2", 3),
    "model.layers.3.input_layernorm.weight": ("norm", None, 3),
    "encoder.layers.1.self_attn.in_proj_weight": ("other", None, 1),
    "encoder.layers.1.self_attn.out_proj.bias": ("attn_out", None, 1),
    "encoder.layers.1.linear2.weight": ("ffn", "fc2", 1),
    "encoder.block.0.layer.1.DenseReluDense.wo.weight": ("ffn", "fc2", 0),
    "something.weird.weight": ("other", None, None),
}


@pytest.mark.parametrize(
    "table", [BERT_OWN, HF_BERT, GPT2, RESNET, OTHERS], ids=["graftlab-bert", "hf-bert", "gpt2", "resnet", "others"]
)
def test_name_rules(table):
    for name, expected in table.items():
        got = classify(name)
        assert (got.kind, got.ffn, got.block) == expected, name


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, down: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out)) if down else None


class TinyResNet(nn.Module):
    """torchvision's ResNet naming (conv1, bn1, layer{i}.{j}.*, downsample, fc) on a hand-built tree."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 7, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.layer1 = nn.Sequential(BasicBlock(4, 4, False), BasicBlock(4, 4, False))
        self.layer2 = nn.Sequential(BasicBlock(4, 8, True), BasicBlock(8, 8, False))
        self.fc = nn.Linear(8, 10)


def test_resnet_module_tree_uses_types_and_names():
    model = TinyResNet()
    kinds = classify_model(model)
    assert list(kinds) == [n for n, _ in model.named_parameters()]
    for name, k in kinds.items():
        if ".bn" in name or name.startswith("bn") or "downsample.1" in name:
            assert k.kind == "norm", name
        elif "conv" in name or "downsample.0" in name:
            assert k.kind == "conv", name
        else:
            assert name.startswith("fc") and k.kind == "output", name
        assert k.block is None


def test_module_types_beat_names():
    model = nn.Module()
    model.proj = nn.Embedding(5, 3)  # named like a linear layer, but an embedding
    model.blocks = nn.ModuleList([nn.Module()])
    model.blocks[0].mix = nn.Conv1d(3, 3, 1)
    model.blocks[0].scale = nn.GroupNorm(1, 3)
    kinds = classify_model(model)
    assert kinds["proj.weight"] == GroupKind("embedding")
    assert kinds["blocks.0.mix.weight"] == GroupKind("conv", None, 0)
    assert kinds["blocks.0.scale.bias"] == GroupKind("norm", None, 0)


def test_graftlab_bert_model_kinds():
    bert = pytest.importorskip("graftlab.tasks.bert")
    cfg = bert.BertConfig(vocab_size=50, hidden=16, layers=2, heads=2, intermediate=32, seq_len=8)
    model = bert.BertMLM(cfg)
    kinds = classify_model(model)
    assert list(kinds) == [n for n, _ in model.named_parameters()]
    for name, k in kinds.items():
        if name in BERT_OWN:
            assert (k.kind, k.ffn, k.block) == BERT_OWN[name], name
        assert k.kind != "other", name
    counts = {kind: sum(k.kind == kind for k in kinds.values()) for kind in ("Q", "K", "V", "attn_out")}
    assert counts == {"Q": 4, "K": 4, "V": 4, "attn_out": 4}  # weight + bias in each of 2 blocks


def test_overrides_dict_and_callable():
    names = ["blocks.0.attn.query.weight", "proj.weight", "blocks.1.ffn.fc1.weight"]
    got = classify_names(names, {"proj.weight": "output", "blocks.0.attn.query.weight": "K"})
    assert got["proj.weight"] == GroupKind("output")
    assert got["blocks.0.attn.query.weight"] == GroupKind("K", None, 0)  # block still from the rules
    assert got["blocks.1.ffn.fc1.weight"] == GroupKind("ffn", "fc1", 1)
    got = classify_names(names, lambda n: "fc2" if n.endswith("fc1.weight") else None)
    assert got["blocks.1.ffn.fc1.weight"] == GroupKind("ffn", "fc2", 1)
    assert got["proj.weight"] == GroupKind("other")
    with pytest.raises(GraftlabError, match="unknown kind 'softmax'"):
        classify_names(names, {"proj.weight": "softmax"})
    with pytest.raises(GraftlabError, match="kind override must be a kind name or GroupKind"):
        classify_names(names, {"proj.weight": 3})
    with pytest.raises(GraftlabError, match="ffn must be"):
        GroupKind("ffn", "fc3")


def test_group_kind_of_members():
    assert group_kind([GroupKind("Q", None, 1), GroupKind("Q", None, 1)]) == GroupKind("Q", None, 1)
    assert group_kind([GroupKind("Q", None, 1), GroupKind("K", None, 1)]) == GroupKind("other", None, 1)
    assert group_kind([GroupKind("ffn", "fc1", 0), GroupKind("ffn", "fc2", 1)]) == GroupKind("ffn", None, None)
    assert group_kind([]) == GroupKind("other")
