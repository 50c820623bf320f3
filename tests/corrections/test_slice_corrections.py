"""Corrections per attention head and per vocabulary row block: static factors and schedules become
per-slice ``lr_scale`` on the tensor's update, checked step by step in float64."""
import pytest
import torch
from torch import nn

from graftlab.corrections import Corrections, apply
from graftlab.corrections.slices import head_counts, slice_of
from graftlab.tasks.gpt import GPT, GPTConfig

V, D, H = 23, 8, 4


def gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=V, hidden=D, layers=1, heads=H, intermediate=16, seq_len=6)).double()


def groups_of(model, granularity, row_block=10):
    from graftlab import Graft

    return Graft(torch.optim.Adam(model.parameters()), torch.optim.SGD(model.parameters(), lr=0.1),
                 granularity=granularity, row_block=row_block if granularity == "vocab" else 1, names=model).group_names


def backward(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (3, 7), generator=g)
    nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).backward()


def test_every_slice_group_maps_to_its_slice():
    model = gpt()
    names, params = zip(*model.named_parameters())
    groups = groups_of(model, "vocab")
    heads = head_counts(groups)
    assert heads[("blocks.0.attn.query.weight", None)] == H
    assert slice_of("blocks.0.attn.query.weight[head 2]", list(names), list(params), heads)[1:] == (0, 4, 6)
    assert slice_of("blocks.0.attn.out.weight[head 3]", list(names), list(params), heads)[1:] == (1, 6, 8)
    assert slice_of("head.decoder.weight[rows 20-22]", list(names), list(params), heads)[1:] == (0, 20, 23)
    assert slice_of("head.decoder.weight[rows 20-29]", list(names), list(params), heads) is None  # past the end
    assert slice_of("nothing.weight[head 0]", list(names), list(params), heads) is None


@pytest.mark.parametrize("granularity", ["head", "vocab"])
def test_static_factors_scale_each_slice(granularity):
    model = gpt()
    groups = groups_of(model, granularity)
    factors = {g: 1.0 + 0.5 * i for i, g in enumerate(groups)}
    applied = apply(Corrections(multipliers=factors), model, 0.1)
    assert not applied.missing and not applied.unknown
    sgd = torch.optim.SGD(applied.param_groups, lr=0.1)
    hooks = applied.register(sgd)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    backward(model)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    sgd.step()
    hooks.remove()
    names, params = zip(*model.named_parameters())
    heads = head_counts(groups)
    for g, f in factors.items():
        sl = slice_of(g, list(names), list(params), heads)
        if sl is None:  # a whole tensor: its own lr
            n, idx = g, (slice(None),)
        else:
            n = names[sl[0]]
            idx = (slice(None),) * sl[1] + (slice(sl[2], sl[3]),)
        got = dict(model.named_parameters())[n].detach()[idx]
        want = before[n][idx] - 0.1 * f * grads[n][idx]
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14, msg=g)


def test_per_slice_schedules_follow_the_step():
    model = gpt()
    groups = groups_of(model, "vocab")
    rows = "head.decoder.weight[rows 10-19]"
    head = "blocks.0.attn.key.weight[head 1]"
    corr = Corrections(multipliers={g: 1.0 for g in groups},
                       schedule={rows: [[0, 2.0], [2, 0.5]], head: [[0, 3.0], [1, 1.0]],
                                 "blocks.0.ffn.fc1.weight": [[0, 1.0], [1, 4.0]]})
    applied = apply(corr, model, 0.1)
    sgd = torch.optim.SGD(applied.param_groups, lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(sgd, applied.lr_lambda())
    applied.register(sgd)
    p = dict(model.named_parameters())
    for step, (f_rows, f_head, f_fc1) in enumerate([(2.0, 3.0, 1.0), (2.0, 1.0, 4.0), (0.5, 1.0, 4.0)]):
        before = {n: t.detach().clone() for n, t in p.items()}
        sgd.zero_grad()
        backward(model, step)
        sgd.step()
        sched.step()
        dec = p["head.decoder.weight"]
        torch.testing.assert_close(dec.detach()[10:20], before["head.decoder.weight"][10:20] - 0.1 * f_rows * dec.grad[10:20])
        torch.testing.assert_close(dec.detach()[:10], before["head.decoder.weight"][:10] - 0.1 * dec.grad[:10])
        k = p["blocks.0.attn.key.weight"]
        torch.testing.assert_close(k.detach()[2:4], before["blocks.0.attn.key.weight"][2:4] - 0.1 * f_head * k.grad[2:4])
        fc1 = p["blocks.0.ffn.fc1.weight"]
        torch.testing.assert_close(fc1.detach(), before["blocks.0.ffn.fc1.weight"] - 0.1 * f_fc1 * fc1.grad)


def test_resumed_run_starts_the_slice_schedule_at_its_step():
    model = gpt()
    rows = "head.decoder.weight[rows 0-9]"
    corr = Corrections(multipliers={g: 1.0 for g in groups_of(model, "vocab")}, schedule={rows: [[0, 2.0], [5, 0.25]]})
    applied = apply(corr, model, 0.1)
    sgd = torch.optim.SGD(applied.param_groups, lr=0.1)
    applied.register(sgd, start_step=7)
    dec = dict(model.named_parameters())["head.decoder.weight"]
    before = dec.detach().clone()
    backward(model)
    sgd.step()
    torch.testing.assert_close(dec.detach()[:10], before[:10] - 0.1 * 0.25 * dec.grad[:10])


def _row_file(model, rows):
    whole = {n: 2.0 for n, _ in model.named_parameters() if n != "embeddings.word.weight"}
    return Corrections(multipliers={**whole, **{f"embeddings.word.weight[{r}]": f for r, f in rows.items()}})


def test_overlapping_slices_are_refused_naming_both():
    from graftlab.errors import GraftlabError

    model = gpt()
    with pytest.raises(GraftlabError, match=r"embeddings.word.weight two factors where the slices "
                                            r"'embeddings.word.weight\[rows 0-9\]' and 'embeddings.word.weight\[row 5\]' overlap"):
        apply(_row_file(model, {"rows 0-9": 3.0, "row 5": 2.0}), model.named_parameters(), 0.1)


def test_rows_no_slice_covers_are_missing_unless_allowed():
    from graftlab.errors import GraftlabError

    model = gpt()
    vocab = model.embeddings.word.weight.shape[0]
    corr = _row_file(model, {"rows 0-4": 3.0, "rows 10-14": 4.0})
    with pytest.raises(GraftlabError, match=rf"embeddings.word.weight rows 5-9, 15-{vocab - 1} have no factor"):
        apply(corr, model.named_parameters(), 0.1)
    with pytest.warns(UserWarning, match=rf"parts of 1 sliced parameter\(s\) have no factor.*rows 5-9, 15-{vocab - 1}"):
        applied = apply(corr, model.named_parameters(), 0.1, allow_missing=True)
    scale = next(g["lr_scale"] for g in applied.param_groups if g["name"] == "embeddings.word.weight").flatten()
    assert scale[:5].tolist() == [3.0] * 5 and scale[5:10].tolist() == [1.0] * 5 and scale[12].item() == 4.0
    whole = _row_file(model, {f"rows 0-{vocab - 1}": 3.0})  # one slice over every row: nothing missing
    apply(whole, model.named_parameters(), 0.1)


def test_rows_no_slice_covers_keep_a_whole_tensor_factor_the_file_gives():
    import warnings

    model = gpt()
    corr = _row_file(model, {"rows 0-4": 3.0})
    corr.multipliers["embeddings.word.weight"] = 5.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is missing: the tensor has its own factor
        applied = apply(corr, model.named_parameters(), 0.1)
    group = next(g for g in applied.param_groups if g["name"] == "embeddings.word.weight")
    lr = group["lr"] * group["lr_scale"].flatten()
    assert lr[:5].tolist() == pytest.approx([0.1 * 5 * 3] * 5) and lr[5:].tolist() == pytest.approx([0.5] * (V - 5))


@pytest.mark.parametrize("rows", ["rows 15-40", "rows 9-0"])
def test_a_slice_its_tensor_does_not_have_is_said_so(rows):
    from graftlab.errors import GraftlabError

    model = gpt()
    with pytest.raises(GraftlabError, match=rf"embeddings.word.weight\[{rows}\] name slices their tensors do not "
                                            r"have \(rows past the end, a reversed range"):
        apply(_row_file(model, {"rows 0-14": 2.0, rows: 3.0} if rows == "rows 15-40" else {rows: 3.0}),
              model.named_parameters(), 0.1)
