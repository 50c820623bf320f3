"""``granularity="vocab"`` finds the word embedding by its module type (``nn.Embedding``), whatever
its name, and the output layer as the last ``nn.Linear`` onto the vocabulary outside the blocks;
a model without one gets an error saying what was looked for."""
import pytest
import torch
from torch import nn

from graftlab import Graft
from graftlab.errors import GraftlabError

V = 11


class Plain(nn.Module):
    """A language model whose modules carry none of the usual names."""

    def __init__(self, tie: bool = False):
        super().__init__()
        self.emb = nn.Embedding(V, 6)
        self.pos = nn.Embedding(4, 6)  # fewer rows: a position table, not the vocabulary
        self.body = nn.Linear(6, 6)
        self.proj = nn.Linear(6, V)
        if tie:
            self.proj.weight = self.emb.weight

    def forward(self, ids):
        return self.proj(torch.tanh(self.body(self.emb(ids) + self.pos.weight[: ids.shape[-1]])))


def graft(model, **kw):
    torch.manual_seed(0)
    ps = list(model.parameters())
    return Graft(torch.optim.Adam(ps, lr=1e-2), torch.optim.SGD(ps, lr=0.1), granularity="vocab",
                 names=model, **kw)


def test_an_embedding_named_emb_is_split_into_rows_with_its_output_layer():
    opt = graft(Plain().double(), row_block=4)
    names = opt.group_names
    assert [n for n in names if n.startswith("emb.")] == ["emb.weight[rows 0-3]", "emb.weight[rows 4-7]",
                                                         "emb.weight[rows 8-10]"]
    assert "proj.weight[rows 4-7]" in names and "proj.bias[rows 8-10]" in names
    assert "pos.weight" in names and "body.weight" in names  # whole tensors


def test_rows_are_grafted_each_with_its_own_ratio():
    torch.manual_seed(1)
    model = Plain().double()
    opt = graft(model, row_block=4)
    before = model.emb.weight.detach().clone()
    ids = torch.tensor([[0, 1, 2], [8, 9, 10]])
    nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
    g = model.emb.weight.grad.clone()
    opt.step()
    # first Adam step on a row with gradient: -lr * sign(g); SGD's: -0.1 * g; the grafted step takes
    # Adam's norm and SGD's direction per row block
    for a, b in ((0, 4), (8, 11)):
        m = (1e-2 * g[a:b] / (g[a:b].abs() + 1e-8)).norm()
        d = 0.1 * g[a:b]
        want = before[a:b] - m / d.norm() * d
        torch.testing.assert_close(model.emb.weight[a:b].detach(), want)


def test_a_tied_output_is_the_embedding_tensor_named_once():
    names = graft(Plain(tie=True)).group_names
    assert "emb.weight[row 10]" in names and not any(n.startswith("proj.weight") for n in names)
    assert "proj.bias[row 10]" in names


def test_a_model_without_an_embedding_says_what_was_looked_for():
    model = nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 2))
    with pytest.raises(GraftlabError, match=r"nn\.Embedding.*'embed'.*granularity='head'") as err:
        graft(model)
    assert "\n" not in str(err.value)


def test_named_pairs_without_the_module_ask_for_it():
    model = Plain()
    pairs = list(model.named_parameters())
    ps = [p for _, p in pairs]
    with pytest.raises(GraftlabError, match=r"names=.*module"):
        Graft(torch.optim.Adam(ps), torch.optim.SGD(ps, lr=0.1), granularity="vocab", names=pairs)


@pytest.mark.parametrize("granularity", ["layer", "global", "coordinate", "head"])
def test_row_block_applies_to_vocab_only(granularity):
    model = Plain()
    with pytest.raises(GraftlabError, match=r"row_block applies only to granularity=vocab") as err:
        Graft(torch.optim.Adam(model.parameters()), torch.optim.SGD(model.parameters(), lr=0.1),
              granularity=granularity, names=model, row_block=4)
    assert set(err.value.params) == {"row_block", "granularity"}


@pytest.mark.parametrize("granularity", ["layer", "global", "coordinate"])
def test_heads_apply_to_head_and_vocab_only(granularity):
    model = Plain()
    with pytest.raises(GraftlabError, match=r"heads applies only to granularity=head or granularity=vocab"):
        Graft(torch.optim.Adam(model.parameters()), torch.optim.SGD(model.parameters(), lr=0.1),
              granularity=granularity, names=model, heads=2)
