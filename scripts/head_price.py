"""The head option's price: predicted against measured extra step time.

Predicted: the roofline chain (``memprop.plan.api.chain_of``) of the model's own step and of the
step with the head and the loss in K chunks; the extra is the difference of their unplanned
compute (every stage's forward and backward once). Measured: the same two steps (forward,
backward, AdamW's step) timed in one process, interleaved round after round, medians. Run with
one thread: ``OMP_NUM_THREADS=1 python scripts/head_price.py --model gpt2``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from memprop.plan.api import chain_of
from memprop.plan.schedule import flat, simulate
from memprop.trace.head import chunked_head
from memprop.workload import Workload


def build(name: str, layers: int, width: int, vocabulary: int, tokens: int) -> torch.nn.Module:
    import transformers

    transformers.logging.set_verbosity_error()
    if name == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_layer=layers, n_embd=width, n_head=4, vocab_size=vocabulary, n_positions=tokens,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_hidden_layers=layers, hidden_size=width, intermediate_size=2 * width,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=vocabulary,
        max_position_embeddings=tokens))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="gpt2", choices=("gpt2", "llama"))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--vocabulary", type=int, default=50257)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--chunks", default="")
    parser.add_argument("--stages", action="store_true", help="print the suffix's prices")
    parser.add_argument("--wall", action="store_true",
                        help="wall-clock time (default: the process's CPU time, which a shared "
                        "machine's other processes do not inflate)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build(args.model, args.layers, args.width, args.vocabulary, args.tokens)
    model.config.use_cache = False
    ids = torch.randint(0, args.vocabulary, (args.batch, args.tokens))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    workload = Workload(model=model, inputs=(), keywords={"input_ids": ids, "labels": ids},
                        optimizer=optimizer, name=args.model, batch_size=args.batch,
                        chunk_head=True)
    chain = chain_of(workload, cost_model="roofline")
    own_s = simulate(chain, flat(len(chain))).compute
    heads = {h.head_chunks: h for h in getattr(chain, "heads", ()) or
             ([chain.head] if getattr(chain, "head", None) else [])}
    wanted = [int(k) for k in args.chunks.split(",") if k] or sorted(heads)
    predicted = {k: simulate(heads[k], flat(len(chain))).compute - own_s
                 for k in wanted if k in heads}
    if args.stages:
        for label, c in (("own", chain), *((f"K={k}", heads[k]) for k in predicted)):
            s = c.stages[-1]
            print(f"{label}: suffix forward {s.forward_cost * 1e3:.1f} ms, backward "
                  f"{s.backward_cost * 1e3:.1f} ms")
    chunk_counts = [0, *predicted]
    clock = time.perf_counter if args.wall else time.process_time

    def step(chunks: int) -> float:
        optimizer.zero_grad(set_to_none=True)
        started = clock()
        with chunked_head(model, chunks):
            loss = model(**workload.keywords).loss
        loss.backward()
        optimizer.step()
        return clock() - started

    for k in chunk_counts:  # warm up
        step(k)
    times: dict[int, list[float]] = {k: [] for k in chunk_counts}
    for r in range(args.rounds):
        for k in (chunk_counts if r % 2 == 0 else chunk_counts[::-1]):
            times[k].append(step(k))
    base = statistics.median(times[0])
    print(f"{args.model} L{args.layers} w{args.width} V{args.vocabulary} "
          f"tokens {args.batch}x{args.tokens}, {torch.get_num_threads()} thread(s), "
          f"{args.rounds} rounds, {'wall' if args.wall else 'CPU'} time: own step "
          f"{base * 1e3:.0f} ms (predicted compute {own_s * 1e3:.0f} ms without the optimizer)")
    for k, extra in predicted.items():
        measured = statistics.median(times[k]) - base
        paired = statistics.median(a - b for a, b in zip(times[k], times[0], strict=True))
        print(f"  K={k:2d}: step {statistics.median(times[k]) / base:.3f}x; extra measured "
              f"{measured * 1e3:.0f} ms (paired {paired * 1e3:.0f}), predicted "
              f"{extra * 1e3:.0f} ms: predicted/measured {extra / measured:.2f}")


if __name__ == "__main__":
    main()
