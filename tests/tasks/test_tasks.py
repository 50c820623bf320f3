"""Built-in tasks: data readers, model structure, masking, batches and evaluation."""
import gzip
import json

import numpy as np
import pytest
import torch

from graftlab.errors import GraftlabError
from graftlab.tasks import get_task
from graftlab.kinds import classify
from graftlab.tasks.bert import BertConfig, BertMLM, mask_tokens
from graftlab.tasks.gpt import GPT, GPTConfig, next_token_rows
from graftlab.tasks.images import FASHION_MNIST_DIR, load_npz, read_idx
from graftlab.tasks.resnet import PreActResNet18
from graftlab.tasks.text import SPECIAL_TOKENS, load_kjv, split_documents, train_tokenizer

torch.set_num_threads(1)
EVAL = 32  # held-out examples per evaluation in these tests


@pytest.fixture(scope="module")
def bert():
    return get_task("bert", size="tiny", batch_size=8, seed=0, device="cpu", eval_size=EVAL)


@pytest.fixture(scope="module")
def gpt():
    return get_task("gpt", size="tiny", batch_size=8, seed=0, device="cpu", eval_size=EVAL)


@pytest.fixture(scope="module")
def resnet():
    return get_task("resnet", size="tiny", batch_size=8, seed=0, device="cpu", eval_size=EVAL)


# --- data -------------------------------------------------------------------------------------------

def write_idx(path, array, code):
    header = bytes([0, 0, code, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    with (gzip.open(path, "wb") if str(path).endswith(".gz") else open(path, "wb")) as fh:
        fh.write(data)


def test_read_idx_round_trip(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a-idx3-ubyte.gz", a, 0x08)
    assert np.array_equal(read_idx(tmp_path / "a-idx3-ubyte.gz"), a)
    f = np.array([1.5, -2.0, 3.25], dtype=np.float32)
    write_idx(tmp_path / "f-idx1", f, 0x0D)
    assert np.array_equal(read_idx(tmp_path / "f-idx1"), f)


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(GraftlabError, match="magic"):
        read_idx(tmp_path / "bad")
    write_idx(tmp_path / "short", np.zeros((4, 2), np.uint8), 0x08)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-1])
    with pytest.raises(GraftlabError, match="data bytes"):
        read_idx(tmp_path / "short")


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="Fashion-MNIST not installed")
def test_fashion_mnist_headers():
    raw = gzip.open(FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").read(8)
    assert raw[:4] == b"\x00\x00\x08\x01" and int.from_bytes(raw[4:], "big") == 10000
    labels = read_idx(FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz")
    assert labels.shape == (10000,) and set(np.unique(labels)) == set(range(10))
    images = read_idx(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8


def test_npz_user_data(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.integers(0, 255, (60, 12, 12, 3), dtype=np.uint8), y=np.arange(60) % 3)
    d = load_npz(tmp_path / "d.npz")
    assert d.x_train.shape == (50, 3, 12, 12) and d.x_test.shape == (10, 3, 12, 12) and d.classes == 3
    task = get_task("resnet", data=tmp_path / "d.npz", batch_size=4, seed=0, device="cpu")
    x, y = next(task.train_batches())
    assert x.shape == (4, 3, 12, 12) and task.model(x).shape == (4, 3)
    np.savez(tmp_path / "e.npz", images=np.zeros((3, 4, 4)))
    with pytest.raises(GraftlabError, match="x_train"):
        get_task("resnet", data=tmp_path / "e.npz", device="cpu")


def test_kjv_corpus_and_split():
    corpus = load_kjv()
    assert len(corpus.documents) == 1189 and 780_000 < corpus.words < 800_000
    assert corpus.documents[0].startswith("In the beginning God created the heaven and the earth.")
    train, held = split_documents(corpus)
    assert len(held) == 1189 // 20 and len(train) + len(held) == 1189
    assert not set(train) & set(held)


def test_tokenizer_is_deterministic():
    docs = list(load_kjv().documents[:40])
    a, b = train_tokenizer(docs, 300), train_tokenizer(docs, 300)
    assert a.encode("In the beginning").ids == b.encode("In the beginning").ids
    assert a.get_vocab() == b.get_vocab()
    assert [a.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))


def test_user_text_folder(tmp_path):
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    for i in range(2):
        paras = [" ".join(rng.choice(words, 200)) for _ in range(30)]
        (tmp_path / f"part{i}.txt").write_text("\n\n".join(paras))
    task = get_task("bert", data=tmp_path, batch_size=4, seed=0, device="cpu", eval_size=8)
    info = task.info()
    assert info["documents"] == 60 and info["source"] == str(tmp_path.resolve())
    assert torch.isfinite(task.loss(task.model, next(task.train_batches())))


def _block_shapes(blocks: int, hidden: int, ffn: int) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the transformer blocks bert and gpt share (separate Q, K, V, out)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(blocks):
        for part in ("query", "key", "value", "out"):
            shapes[f"blocks.{i}.attn.{part}.weight"] = (hidden, hidden)
            shapes[f"blocks.{i}.attn.{part}.bias"] = (hidden,)
        for norm in ("attn_norm", "ffn_norm"):
            shapes[f"blocks.{i}.{norm}.weight"] = (hidden,)
            shapes[f"blocks.{i}.{norm}.bias"] = (hidden,)
        shapes.update({f"blocks.{i}.ffn.fc1.weight": (ffn, hidden), f"blocks.{i}.ffn.fc1.bias": (ffn,),
                       f"blocks.{i}.ffn.fc2.weight": (hidden, ffn), f"blocks.{i}.ffn.fc2.bias": (hidden,)})
    return shapes


# --- models -----------------------------------------------------------------------------------------

def test_bert_parameter_names_and_shapes():
    cfg = BertConfig(vocab_size=50, hidden=16, layers=2, heads=2, intermediate=32, seq_len=10)
    shapes = {n: tuple(p.shape) for n, p in BertMLM(cfg).named_parameters()}
    expected = {
        "embeddings.word.weight": (50, 16), "embeddings.position.weight": (10, 16),
        "embeddings.token_type.weight": (2, 16), "embeddings.norm.weight": (16,), "embeddings.norm.bias": (16,),
        "head.transform.weight": (16, 16), "head.transform.bias": (16,), "head.norm.weight": (16,),
        "head.norm.bias": (16,), "head.decoder.weight": (50, 16), "head.decoder.bias": (50,),
    }
    expected.update(_block_shapes(blocks=2, hidden=16, ffn=32))
    assert shapes == expected


def test_bert_is_post_layernorm_and_outputs_only_at_positions():
    cfg = BertConfig(vocab_size=50, hidden=16, layers=1, heads=2, intermediate=32, seq_len=10)
    model = BertMLM(cfg).eval()
    ids = torch.randint(5, 50, (3, 10))
    pos = torch.tensor([[1, 4], [2, 3], [8, 1]])
    full, picked = model(ids), model(ids, pos)
    assert picked.shape == (3, 2, 50)
    assert torch.allclose(picked, full.gather(1, pos[..., None].expand(-1, -1, 50)), atol=1e-6)
    # Post-LN: every block output is LayerNorm-ed (zero mean over features at init).
    h = model.blocks[0](model.embeddings(ids))
    assert h.mean(-1).abs().max() < 1e-5


def test_masking_is_bert_15_percent_80_10_10():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (400, 66))
    ids[:, 0], ids[:, -1] = 2, 3
    b = mask_tokens(ids, 1000, gen)
    k = round(0.15 * 64)
    assert b["positions"].shape == (400, k) and b["labels"].shape == (400, k)
    assert b["positions"].min() >= 1 and b["positions"].max() <= 64
    assert torch.equal(b["labels"], ids.gather(1, b["positions"]))
    new = b["input_ids"].gather(1, b["positions"])
    masked = (new == SPECIAL_TOKENS.index("[MASK]")).float().mean().item()
    kept = (new == b["labels"]).float().mean().item()
    assert 0.77 < masked < 0.83 and 0.08 < kept < 0.12
    unchanged = torch.ones_like(ids, dtype=torch.bool).scatter_(1, b["positions"], False)
    assert torch.equal(b["input_ids"][unchanged], ids[unchanged])


def test_resnet18_layout():
    model = PreActResNet18(width=4, in_channels=1, classes=10)
    names = [n for n, _ in model.named_parameters()]
    convs = [n for n in names if "conv" in n or "shortcut" in n]
    assert len(convs) == 1 + 4 * 2 * 2 + 3  # stem, 16 block convs, 3 projections
    assert {n.split(".")[0] for n in names} == {"conv1", "layer1", "layer2", "layer3", "layer4", "bn", "fc"}
    assert "layer2.0.shortcut.weight" in names and "layer1.0.shortcut.weight" not in names
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert dict(model.named_parameters())["layer4.1.conv2.weight"].shape == (32, 32, 3, 3)


# --- tasks ------------------------------------------------------------------------------------------

def test_bert_task(bert):
    info = bert.info()
    json.dumps(info)
    assert info["dataset"].startswith("King James") and info["vocab_size"] == 2000
    assert bert.steps_per_epoch == info["train_sequences"] // 8 and bert.default_schedule == "poly"
    batch = next(bert.train_batches())
    assert batch["input_ids"].shape == (8, 64) and batch["labels"].shape == (8, 9)
    loss = bert.loss(bert.model, batch)
    assert abs(loss.item() - np.log(2000)) < 0.5  # near-uniform predictions at initialisation
    ev = bert.evaluate(bert.model)
    assert set(ev) >= {"loss", "accuracy"} and abs(ev["loss"] - np.log(2000)) < 0.5
    assert ev == bert.evaluate(bert.model)  # a fixed evaluation set


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="Fashion-MNIST not installed")
def test_resnet_task(resnet):
    info = resnet.info()
    json.dumps(info)
    assert (info["train_images"], info["heldout_images"], info["classes"]) == (60000, 10000, 10)
    assert info["licence"].startswith("MIT") and resnet.default_schedule == "step"
    x, y = next(resnet.train_batches())
    assert x.shape == (8, 1, 28, 28) and x.dtype == torch.float32 and y.shape == (8,)
    ev = resnet.evaluate(resnet.model)
    assert 0 <= ev["accuracy"] <= 1 and ev["accuracy"] * EVAL == round(ev["accuracy"] * EVAL)


def test_batches_are_seeded(bert):
    a = next(bert.train_batches())
    b = next(bert.train_batches())
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = get_task("bert", batch_size=8, seed=1, device="cpu", eval_size=8)
    assert not torch.equal(next(other.train_batches())["input_ids"], a["input_ids"])
    same = get_task("bert", batch_size=8, seed=0, device="cpu", eval_size=8)
    assert all(torch.equal(p, q) for p, q in zip(same.model.parameters(), bert.model.parameters()))


@pytest.mark.parametrize(
    "kwargs,match",
    [({"name": "gpt2"}, "unknown task"), ({"name": "gpt", "size": "huge"}, "unknown size"), ({"name": "bert", "size": "huge"}, "unknown size"),
     ({"name": "bert", "data": "/no/such/path"}, "^data '/no/such/path' does not exist$"), ({"name": "resnet", "batch_size": 0}, "batch size"),
     ({"name": "bert", "device": "tpu"}, "unknown device")],
)
def test_bad_task_arguments(kwargs, match):
    name = kwargs.pop("name")
    with pytest.raises(GraftlabError, match=match):
        get_task(name, **kwargs)


# --- gpt ----------------------------------------------------------------------------------------------

def test_gpt_parameter_names_and_clean_kinds():
    cfg = GPTConfig(vocab_size=50, hidden=16, layers=2, heads=2, intermediate=32, seq_len=10)
    model = GPT(cfg)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    expected = {"embeddings.word.weight": (50, 16), "embeddings.position.weight": (10, 16),
                "final_norm.weight": (16,), "final_norm.bias": (16,), "head.decoder.weight": (50, 16)}
    expected.update(_block_shapes(blocks=2, hidden=16, ffn=32))
    assert shapes == expected
    want = {"query": "Q", "key": "K", "value": "V", "out": "attn_out", "fc1": "ffn", "fc2": "ffn",
            "attn_norm": "norm", "ffn_norm": "norm", "word": "embedding", "position": "embedding",
            "final_norm": "norm", "decoder": "output"}
    modules = dict(model.named_modules())
    for name in shapes:
        k = classify(name, modules[name.rsplit(".", 1)[0]])
        assert k.kind == want[name.split(".")[-2]], name
        assert k.block == (int(name.split(".")[1]) if name.startswith("blocks.") else None), name
        if k.kind == "ffn":
            assert k.ffn == name.split(".")[-2], name


def test_gpt_is_causal_and_pre_layernorm():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=50, hidden=16, layers=2, heads=2, intermediate=32, seq_len=10)
    model = GPT(cfg).eval()
    ids = torch.randint(0, 50, (3, 10))
    changed = ids.clone()
    changed[:, 6] = (ids[:, 6] + 1) % 50
    a, b = model(ids), model(changed)
    assert a.shape == (3, 10, 50)
    assert torch.allclose(a[:, :6], b[:, :6], atol=1e-6)  # earlier positions never see later tokens
    assert not torch.allclose(a[:, 6:], b[:, 6:])
    # pre-LN: with zero residual branches a block is the identity (nothing normalises the stream)
    block = model.blocks[0]
    for layer in (block.attn.out, block.ffn.fc2):
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)
    x = torch.randn(2, 5, 16) * 3
    assert torch.equal(block(x), x)
    with pytest.raises(GraftlabError, match="longer"):
        model(torch.zeros(1, 11, dtype=torch.long))


def test_next_token_rows():
    rows = torch.tensor([[2, 10, 11, 12, 3], [2, 13, 14, 15, 3]])
    assert next_token_rows(rows).tolist() == [[10, 11, 12], [13, 14, 15]]


def test_gpt_task_batches_loss_and_float64_evaluation(gpt):
    info = gpt.info()
    json.dumps(info)
    assert info["dataset"].startswith("King James") and info["vocab_size"] == 2000 and info["autocast"] is None
    assert gpt.steps_per_epoch == info["train_sequences"] // 8 and gpt.default_schedule == "poly"
    # the rows are the contiguous token stream: consecutive rows continue each other, no [CLS]/[SEP]
    assert 900_000 < info["train_tokens"] < 1_100_000
    batch = next(gpt.train_batches())
    assert batch.shape == (8, 33) and batch.dtype == torch.long
    assert not ((batch == 2) | (batch == 3)).any()
    loss = gpt.loss(gpt.model, batch)
    assert abs(loss.item() - np.log(2000)) < 0.5
    ev = gpt.evaluate(gpt.model)
    # float64 reference: mean next-token cross-entropy and top-1 over every held-out position
    rows = torch.cat(gpt.eval_batches())
    assert rows.shape == (EVAL, 33)
    with torch.no_grad():
        logits = gpt.model(rows[:, :-1]).double()
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten()).item()
    acc = (logits.argmax(-1) == rows[:, 1:]).double().mean().item()
    assert ev["loss"] == pytest.approx(ref, rel=1e-5) and ev["accuracy"] == pytest.approx(acc, abs=1e-12)
    assert ev == gpt.evaluate(gpt.model)


def test_gpt_trains(gpt):
    task = get_task("gpt", size="tiny", batch_size=16, seed=1, device="cpu", eval_size=EVAL)
    before = task.evaluate(task.model)["loss"]
    opt = torch.optim.Adam(task.model.parameters(), lr=3e-3)
    batches = task.train_batches()
    for _ in range(30):
        loss = task.loss(task.model, next(batches))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert task.evaluate(task.model)["loss"] < before - 1.0
