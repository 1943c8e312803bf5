"""The head option (``memprop.trace.head``): the head and the loss of a causal LM in chunks of
tokens, priced and chosen by the planner (NOTE [ The head option ] in ``memprop.plan.chain``).

Oracles: the unchunked step of the same model from the same parameters (loss and gradients);
the storage ledger and the allocator's own count of the planned steps (peaks); each chain solved
alone (the choice). The models: Hugging Face GPT-2 and Llama from small configurations, random
init, a vocabulary of 8,192 at width 64, so that the logits dominate the step (and 4,096 at
width 16 over 1,024 tokens, where one chunk's logits hold the peak, for the chunk counts).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch

from memprop.errors import BudgetInfeasibleError
from memprop.plan.api import CACHE_OFF_NOTE, chain_of, head_chunk_counts_of, head_chunks_of
from memprop.plan.solvers import solve
from memprop.run.measure import run_plan
from memprop.trace.head import STEP_GRADIENT_RTOL, chunk_counts, chunked_head
from memprop.workload import Workload

transformers = pytest.importorskip("transformers")

VOCABULARY = 8192
WIDTH = 64
TOKENS = 32
BATCH = 4


def _gpt2() -> torch.nn.Module:
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=WIDTH, n_head=4, vocab_size=VOCABULARY, n_positions=TOKENS,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def _llama() -> torch.nn.Module:
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=WIDTH, intermediate_size=2 * WIDTH,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCABULARY,
        max_position_embeddings=TOKENS))


MODELS: dict[str, Callable[[], torch.nn.Module]] = {"gpt2": _gpt2, "llama": _llama}


def _workload(name: str, *, loss_fn: object = None) -> Workload:
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = MODELS[name]()
    ids = torch.randint(0, VOCABULARY, (BATCH, TOKENS),
                        generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, : TOKENS // 4] = -100  # some tokens ignored: the mean is over the others
    return Workload(model=model, inputs=(), keywords={"input_ids": ids, "labels": labels},
                    loss_fn=loss_fn, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
                    name=name, batch_size=BATCH, chunk_head=True)


def _step(workload: Workload, chunks: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model = workload.model
    model.zero_grad(set_to_none=True)
    with chunked_head(model, chunks):
        loss = model(**workload.keywords).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_chunked_loss_and_gradients_equal_the_unchunked_steps(name: str) -> None:
    """Oracle: the model's own step (HF's loss over the whole logits) from the same parameters:
    the loss within 1e-6 relative, every gradient within STEP_GRADIENT_RTOL of its largest
    magnitude (NOTE [ How close the chunked gradients are ]); the logits were not made."""
    workload = _workload(name)
    own_loss, own = _step(workload, 0)
    for chunks in (1, 5, 16):
        loss, grads = _step(workload, chunks)
        assert abs(loss - own_loss) <= 1e-6 * abs(own_loss)
        for parameter, grad in grads.items():
            scale = own[parameter].abs().max()
            assert (grad - own[parameter]).abs().max() <= STEP_GRADIENT_RTOL * scale, parameter
    with chunked_head(workload.model, 16):
        logits = workload.model(**workload.keywords).logits
    assert logits.untyped_storage().nbytes() <= logits.element_size()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_budget_only_the_head_option_meets_is_met_as_predicted(name: str) -> None:
    """A budget one byte under the least peak any plan of the model's own head reaches
    (solved on that chain alone): the planner takes the head option; the planned steps' peak at
    step 3 is within the budget by the storage ledger and by the allocator's own count, and
    within 1% of the prediction; the gradients match the unplanned steps'; the plan's note
    says how the step was traced (the key/value cache off), as the model's own plans do."""
    workload = _workload(name)
    chain = chain_of(workload, cost_model="flops")
    assert [head.head_chunks for head in chain.heads] == list(chunk_counts(BATCH * TOKENS))
    own_floor = solve(dataclasses.replace(chain, heads=()), 1,
                      strict=False).min_feasible_bytes
    budget = own_floor - 1
    plan = solve(chain, budget)
    assert plan.head_chunks in chunk_counts(BATCH * TOKENS)
    assert CACHE_OFF_NOTE in plan.cost_note  # traced as the model's own step was, and said
    assert [row.get("head_chunks") for row in plan.stages()][-1] == plan.head_chunks
    result = run_plan(workload, plan, steps=3)
    ledger, allocator = result.step_peaks_bytes[-1], result.allocator_step_peaks_bytes[-1]
    assert ledger <= budget and allocator <= budget
    assert abs(ledger - plan.peak_bytes) <= 0.01 * plan.peak_bytes
    assert result.baseline_step_peaks_bytes is not None
    assert result.baseline_step_peaks_bytes[-1] > budget  # the model's own step does not fit
    assert result.gradients_match


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_head_option_is_taken_only_where_it_pays(name: str) -> None:
    """Oracle: the chains solved alone (the model's own head, each chunk count's). At every
    budget from the least feasible to the unplanned peak, the plan is the cheapest feasible one,
    the model's own head on a tie, then the fewest chunks; at the unplanned peak (nothing to
    recompute) it is the model's own head."""
    chain = chain_of(_workload(name), cost_model="flops")
    assert len(chain.heads) > 1
    own_chain = dataclasses.replace(chain, heads=())
    unplanned = solve(own_chain, 1, "none", strict=False).peak_bytes
    floor = solve(chain, 1, strict=False).min_feasible_bytes
    taken = 0
    for step in range(9):
        budget = floor + (unplanned - floor) * step // 8
        alone = [(0, solve(own_chain, budget, strict=False))] + [
            (head.head_chunks, solve(head, budget, strict=False)) for head in chain.heads]
        chunks, best = min(((k, p) for k, p in alone if p.feasible),
                           key=lambda found: found[1].compute)
        plan = solve(chain, budget)
        assert plan.head_chunks == chunks, budget
        assert plan.compute == best.compute
        taken += chunks > 0
    assert 0 < taken < 9
    assert solve(chain, unplanned).head_chunks == 0
    with pytest.raises(BudgetInfeasibleError):
        solve(chain, floor - 1)


def test_no_head_option_where_the_loss_is_the_users() -> None:
    """A user's loss function over the logits is not HF's loss: the option does not apply
    (the chain has none), whatever the model."""
    workload = _workload("gpt2", loss_fn=lambda output: output.logits.float().mean())
    assert head_chunk_counts_of(workload) == () and head_chunks_of(workload) == 0
    assert head_chunks_of(_workload("gpt2")) > 0


def test_a_forward_that_changes_the_logits_before_its_loss_gets_no_head_option() -> None:
    """A model that scales its logits before HF's loss: the chunked loss would drop the scale,
    so the option refuses to run (HeadRefusedError when the forward returns) and the planner
    is not offered it (the chain has no head)."""
    from transformers.modeling_outputs import CausalLMOutput

    from memprop.trace.head import HeadRefusedError

    class Scaled(transformers.GPT2LMHeadModel):  # type: ignore[misc,name-defined]
        def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                    **kwargs: object) -> CausalLMOutput:
            logits = 2.0 * self.lm_head(self.transformer(input_ids).last_hidden_state)
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size)
            return CausalLMOutput(loss=loss, logits=logits)

    workload = _workload("gpt2")
    scaled = Scaled(workload.model.config)
    scaled.load_state_dict(workload.model.state_dict())
    workload = Workload(model=scaled, inputs=(), keywords=workload.keywords,
                        optimizer=torch.optim.AdamW(scaled.parameters()), chunk_head=True)
    assert head_chunks_of(workload) > 0  # it looks like a causal LM
    with pytest.raises(HeadRefusedError), chunked_head(scaled, 4):
        scaled(**workload.keywords)
    assert chain_of(workload, cost_model="flops").heads == ()


def test_under_autocast_the_head_runs_as_it_is() -> None:
    """Under autocast (bfloat16 on the CPU) the option stands aside: the loss and gradients are
    the model's own step's, bit for bit, and the logits are made (NOTE [ How the chunked head
    is installed ])."""
    workload = _workload("llama")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        own_loss, own = _step(workload, 0)
        loss, grads = _step(workload, 16)
        with chunked_head(workload.model, 16):
            logits = workload.model(**workload.keywords).logits
    assert torch.equal(loss, own_loss)
    assert all(torch.equal(grads[name], own[name]) for name in own)
    assert logits.untyped_storage().nbytes() == logits.numel() * logits.element_size()


def test_checkpoint_runs_the_head_option_the_planner_took() -> None:
    """memprop.checkpoint at a budget only the head option meets: its plan (made on fake
    tensors) takes the option, and the wrapped model's loss is the bare model's (1e-6)."""
    import memprop

    workload = _workload("llama")
    chain = chain_of(workload, cost_model="flops")
    own_floor = solve(dataclasses.replace(chain, heads=()), 1,
                      strict=False).min_feasible_bytes
    bare = workload.model(**workload.keywords).loss
    wrapped = memprop.checkpoint(workload.model, workload.keywords, budget=own_floor - 1,
                                 optimizer=workload.optimizer, cost_model="flops",
                                 chunk_head=True)
    loss = wrapped(**workload.keywords).loss
    loss.backward()
    assert [plan.head_chunks > 0 for plan in wrapped.plans.values()] == [True]
    assert abs(loss - bare) <= 1e-6 * abs(bare)



def test_the_head_option_is_taken_only_when_asked() -> None:
    """Under the option the model's output logits are zeros, which a loop reading them would not
    expect: without ``chunk_head`` the chain has no head option, and a budget that only the
    option meets is refused (as it was before the option existed), by ``memprop.plan`` and by
    ``memprop.checkpoint`` alike; the same budget with ``chunk_head=True`` is met."""
    import memprop

    workload = _workload("gpt2")
    asked = chain_of(workload, cost_model="flops")
    own_floor = solve(dataclasses.replace(asked, heads=()), 1, strict=False).min_feasible_bytes
    workload.chunk_head = False
    assert head_chunks_of(workload) == 0
    assert chain_of(workload, cost_model="flops").heads == ()
    with pytest.raises(BudgetInfeasibleError):
        memprop.plan(workload, budget=own_floor - 1, cost_model="flops")
    with pytest.raises(BudgetInfeasibleError):
        memprop.checkpoint(workload.model, workload.keywords, budget=own_floor - 1,
                           optimizer=workload.optimizer, cost_model="flops")
    assert memprop.plan(workload, budget=own_floor - 1, cost_model="flops",
                        chunk_head=True).head_chunks > 0


def test_a_budget_only_more_chunks_meet_gets_more_chunks() -> None:
    """GPT-2 at a vocabulary of 4,096 and width 16 over 1,024 tokens, where one chunk's logits
    hold the peak at every count: a budget one byte under the least peak of the model's own
    head and of every chunk count but the largest (each chain solved alone) is met by the
    largest count alone, and the planner takes it; the planned steps' peak at step 3 by the
    storage ledger and by the allocator is within the budget and within 1% of the prediction;
    the gradients match the unplanned steps'."""
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    vocabulary, tokens, batch = 4096, 128, 8
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=16, n_head=4, vocab_size=vocabulary, n_positions=tokens,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    ids = torch.randint(0, vocabulary, (batch, tokens),
                        generator=torch.Generator().manual_seed(1))
    workload = Workload(model=model, inputs=(), keywords={"input_ids": ids, "labels": ids},
                        optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
                        name="gpt2", batch_size=batch, chunk_head=True)
    chain = chain_of(workload, cost_model="flops")
    *fewer, most = chain.heads
    floors = [solve(c, 1, strict=False).min_feasible_bytes
              for c in (dataclasses.replace(chain, heads=()), *fewer)]
    budget = min(floors) - 1
    assert solve(most, budget, strict=False).feasible  # the largest count alone meets it
    plan = solve(chain, budget)
    assert plan.head_chunks == most.head_chunks == max(chunk_counts(batch * tokens))
    result = run_plan(workload, plan, steps=3)
    ledger, allocator = result.step_peaks_bytes[-1], result.allocator_step_peaks_bytes[-1]
    assert ledger <= budget and allocator <= budget
    assert abs(ledger - plan.peak_bytes) <= 0.01 * plan.peak_bytes
    assert result.gradients_match
