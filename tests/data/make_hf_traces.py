"""Record the small real traces under tests/data with Hugging Face models built from configs (no download).

    OMP_NUM_THREADS=1 python tests/data/make_hf_traces.py            # all of them, into tests/data
    python tests/data/make_hf_traces.py --model gpt2 --steps 30 --out /tmp/t   # one, elsewhere

Each is a plain user's run: the model, Adam 1e-3 # SGD 0.1 momentum 0.9, layer-wise, batches of
King James text (graftlab's bundled corpus and tokenizer), recorded with graftlab.Recorder.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

import graftlab
from graftlab.tasks.bert import mask_tokens
from graftlab.tasks.text import text_data

HERE = Path(__file__).resolve().parent
TRACES = {"bert": "hf-bert-2x64", "gpt2": "hf-gpt2-2x64"}


def build(model: str, vocab: int, seq: int, hidden: int = 64, layers: int = 2):
    import transformers

    if model == "bert":
        cfg = transformers.BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                      num_attention_heads=2, intermediate_size=4 * hidden,
                                      max_position_embeddings=seq)
        return transformers.BertForMaskedLM(cfg)
    cfg = transformers.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=2, n_positions=seq,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def record(model_name: str, out: Path, *, steps: int = 120, batch: int = 16, seq: int = 64, seed: int = 0,
           grad_every: int = 10, **model_kw) -> Path:
    """Train ``model_name`` (bert: masked LM; gpt2: causal LM) for ``steps`` and record the trace."""
    data = text_data(None, 2000, seq)
    torch.manual_seed(seed)
    model = build(model_name, data.vocab_size, seq, **model_kw)
    adam = torch.optim.Adam(model.parameters(), lr=1e-3)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = graftlab.Graft(adam, sgd, granularity="layer", names=model)
    gen = torch.Generator().manual_seed(seed + 1)
    meta = {"task": f"hf-{model_name}", "batch_size": batch, "seed": seed}
    with graftlab.Recorder(opt, out, model=model, metadata=meta, grad_every=grad_every) as rec:
        for _ in range(steps):
            ids = data.train[torch.randint(0, len(data.train), (batch,), generator=gen)]
            if model_name == "bert":
                b = mask_tokens(ids, data.vocab_size, gen)
                labels = torch.full_like(ids, -100).scatter_(1, b["positions"], b["labels"])
                loss = model(input_ids=b["input_ids"], labels=labels).loss
            else:
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            rec.log(loss=loss.detach())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(TRACES), action="append")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--out", type=Path, default=None, help="trace directory (one model) [tests/data/<name>]")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for m in args.model or sorted(TRACES):
        out = args.out if args.out is not None else HERE / TRACES[m]
        print(record(m, out, steps=args.steps))


if __name__ == "__main__":
    main()
