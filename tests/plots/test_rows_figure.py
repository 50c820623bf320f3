"""The per-row figure of a vocabulary trace: row blocks read from the group names, frequencies averaged per block."""
import matplotlib
import numpy as np
import pytest
import torch
from torch import nn

from graftlab import Graft, Recorder
from graftlab.errors import GraftlabError
from graftlab.plots import row_ratios, rows_figure
from graftlab.tasks.gpt import GPT, GPTConfig

matplotlib.use("Agg")
V = 23


def test_rows_figure_from_a_vocab_trace(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=V, hidden=8, layers=1, heads=2, intermediate=16, seq_len=6))
    opt = Graft(torch.optim.Adam(model.parameters(), lr=1e-3), torch.optim.SGD(model.parameters(), lr=0.1),
                granularity="vocab", row_block=5, names=model)
    with Recorder(opt, tmp_path / "t", model=model):
        for s in range(4):
            ids = torch.randint(0, V, (4, 7), generator=torch.Generator().manual_seed(s))
            nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).backward()
            opt.step()
            opt.zero_grad()
    table = row_ratios(tmp_path / "t")
    assert len(table) == 2 * 5  # 5 blocks of the output layer, 5 of the word embedding
    last = table[table["group"] == "head.decoder.weight[rows 20-22]"].iloc[0]
    assert (last["first"], last["stop"], last["kind"]) == (20, 23, "output")
    fig = rows_figure(tmp_path / "t", frequency=np.arange(V))
    points = np.concatenate([c.get_offsets() for c in fig.axes[0].collections])
    assert len(points) == 10
    assert sorted(set(points[:, 0] - 1.0)) == pytest.approx([2.0, 7.0, 12.0, 17.0, 21.0])  # mean counts per block
    with pytest.raises(GraftlabError, match="frequency holds"):
        rows_figure(tmp_path / "t", frequency=np.ones(10))


def test_token_counts_of_another_task_are_asked_for_by_the_call_that_takes_them():
    from graftlab.plots.rows import token_frequency

    with pytest.raises(GraftlabError, match=r"known for the gpt and bert tasks only \(this trace: None\).*"
                                            r"graftlab.plots.rows_figure\(trace, frequency=counts\)"):
        token_frequency({"task": None})
