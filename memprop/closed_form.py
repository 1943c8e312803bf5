"""The seed's exercise 3 in closed form: training and prediction memory of the built-in MLP.

With ``s`` bytes per element, batch ``b``, widths ``d → h (× depth D) → q``:

- parameters ``P = s (d h + (D-1) h² + h q) + s (D h + q)`` with biases; gradients the same;
- inputs ``s b d`` plus ``8 b`` for the int64 labels (training only);
- saved activations ``s b h D`` when φ saves its output (relu, tanh, sigmoid: the next linear
  layer saves the same storage) and ``2 s b h D`` when φ saves its input (gelu saves z, the next
  layer saves h), plus ``s b q`` for log-softmax's output and one scalar for the loss's total
  weight. Biases and the regulariser add nothing: their backward needs no activation.

The peaks are not one sum but the largest of a handful of moments, each an explicit sum. The
functions below walk those moments in the order autograd runs them for this model (a
``Linear`` without bias computes its weight's gradient before its input's; ``addmm`` the other
way round; a storage dies when the last node that saved it has run) and return the largest live
total. The tests hold every figure here equal to the traced ledger, to the byte.

The training peak is the steady state's (the momentum buffers live from the start, updated in
place), the first step's beside it (each gradient cloned into a new buffer at the end), both for
a loop that sets gradients to None between steps.

Known limitations: the training peak covers plain SGD and SGD with momentum; with Adam and
AdamW the closed form gives the optimizer state (two moments per parameter and a float32 step
counter per tensor) but not the step's peak, which depends on the order of its per-parameter
temporaries. A loop that keeps its gradients (``set_to_none=False``) has no closed form here.
"""

from __future__ import annotations

import itertools
from typing import Any

__all__ = ["SeedShape", "closed_form", "closed_form_for"]

_ELEMENT_BYTES = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2}
_SAVES_INPUT = {"gelu"}  # the other activations' backward needs only their output


class SeedShape:
    """The sizes the formulas need."""

    def __init__(self, *, input_dim: int, hidden: int, classes: int, depth: int, batch: int,
                 activation: str = "relu", bias: bool = False, weight_decay: float = 0.0,
                 dtype: str = "float32", optimizer: str = "sgd") -> None:
        self.d, self.h, self.q, self.D, self.b = input_dim, hidden, classes, depth, batch
        self.activation, self.bias, self.wd = activation, bias, weight_decay
        self.s = _ELEMENT_BYTES[dtype]
        self.optimizer = optimizer

    def weight_bytes(self) -> list[int]:
        widths = [self.d] + [self.h] * self.D + [self.q]
        return [self.s * a * b for a, b in itertools.pairwise(widths)]

    def bias_bytes(self) -> list[int]:
        return [self.s * self.h] * self.D + [self.s * self.q] if self.bias else []


class _Moments:
    """Live bytes as storages come and go; remembers the largest total."""

    def __init__(self, start: int) -> None:
        self.live = start
        self.peak = start

    def alloc(self, nbytes: int) -> int:
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        return nbytes

    def free(self, *sizes: int) -> None:
        self.live -= sum(sizes)


def _inference_peak(m: SeedShape) -> int:
    a, o = m.s * m.b * m.h, m.s * m.b * m.q
    params = sum(m.weight_bytes()) + sum(m.bias_bytes())
    live = _Moments(params + m.s * m.b * m.d)
    previous = 0  # the layer's input; the first is the model input, counted above
    for _ in range(m.D):
        z = live.alloc(a)
        live.alloc(a)  # h = φ(z); z and the input die once the layer returns
        live.free(z, previous)
        previous = a
    live.alloc(o)
    return live.peak


def _training_peak(m: SeedShape, *, first_step: bool) -> int:
    """The loop's first step (``first_step``: the momentum buffers are made at its end) or its
    steady state (they are live from the start, and the step updates them in place)."""
    s, a, o = m.s, m.s * m.b * m.h, m.s * m.b * m.q
    weights, biases = m.weight_bytes(), m.bias_bytes()
    gelu = m.activation in _SAVES_INPUT
    state = 0 if first_step or m.optimizer != "momentum" else sum(weights) + sum(biases)
    live = _Moments(sum(weights) + sum(biases) + s * m.b * m.d + 8 * m.b + state)

    # Forward: z = x Wᵀ (+ b), h = φ(z); an output-saving φ lets z die at once.
    for _ in range(m.D):
        z = live.alloc(a)
        live.alloc(a)
        if not gelu:
            live.free(z)
    live.alloc(o)  # logits, alive until the step ends
    log_softmax = live.alloc(o)
    loss, total_weight = live.alloc(s), live.alloc(s)
    reg_grads: list[int] = []
    if m.wd:
        # s = λ/2 Σ ‖W‖²: pow, sum, and a running Python sum, one weight at a time.
        running = 0
        for w in weights:
            square = live.alloc(w)
            term = live.alloc(s)
            live.free(square)
            new_running = live.alloc(s)
            live.free(running, term)
            running = new_running
        scaled = live.alloc(s)
        live.alloc(s)  # J = L + s
        live.free(loss, running, scaled)

    # Backward.
    seed = live.alloc(s)
    if m.wd:
        penalty_grad = live.alloc(s)
        for position, w in enumerate(reversed(weights)):
            power, scaled_w = live.alloc(w), live.alloc(w)
            reg_grads.append(live.alloc(w))
            live.free(power, scaled_w)
            if position == len(weights) - 1:
                live.free(penalty_grad)
        reg_grads.reverse()
    g1 = live.alloc(o)
    live.free(total_weight)
    grad = live.alloc(o)
    live.free(log_softmax, g1)

    def linear_backward(layer: int, incoming: int, needs_input_grad: bool,
                        input_dies: int) -> int:
        """A linear layer's backward; returns the bytes of the input's gradient (0 if none)."""
        w = weights[layer]
        in_width = m.d if layer == 0 else m.h
        weight_grad = 0
        dx = 0
        if m.bias:
            if needs_input_grad:
                dx = live.alloc(s * m.b * in_width)
            weight_grad = live.alloc(w)
            live.alloc(biases[layer])
        else:
            weight_grad = live.alloc(w)
            if needs_input_grad:
                dx = live.alloc(s * m.b * in_width)
        live.free(incoming, input_dies)
        if m.wd:
            live.alloc(w)  # .grad = regulariser's gradient + this one, out of place
            live.free(reg_grads[layer], weight_grad)
        return dx

    # The output layer saved h_D; with gelu nothing else holds it, so it dies with this node.
    dh = linear_backward(m.D, grad, True, a if gelu else 0)
    for layer in range(m.D - 1, -1, -1):
        dz = live.alloc(a)
        live.free(dh, a)  # φ's saved tensor (z for gelu, h otherwise) dies with its node
        dh = linear_backward(layer, dz, layer > 0, a if gelu and layer > 0 else 0)
    live.free(seed)
    if m.optimizer == "momentum" and first_step:
        for w in [*weights, *biases]:
            live.alloc(w)  # the first step clones each gradient into its momentum buffer
    return live.peak


def closed_form(shape: SeedShape) -> dict[str, int]:
    """The profile's totals for the seed MLP, from the formulas alone."""
    s, b = shape.s, shape.b
    params = sum(shape.weight_bytes()) + sum(shape.bias_bytes())
    per_layer = 2 if shape.activation in _SAVES_INPUT else 1
    adam = 2 * params + 4 * (shape.D + 1) * (2 if shape.bias else 1)  # + a step per tensor
    optimizer_state = {"sgd": 0, "momentum": params, "adam": adam, "adamw": adam}
    result = {
        "parameters_bytes": params,
        "gradients_bytes": params,
        "optimizer_state_bytes": optimizer_state[shape.optimizer],
        "inputs_bytes": s * b * shape.d + 8 * b,
        "saved_activations_bytes": per_layer * s * b * shape.h * shape.D + s * b * shape.q + s,
        "inference_peak_bytes": _inference_peak(shape),
    }
    if shape.optimizer in ("sgd", "momentum"):
        result["training_peak_bytes"] = _training_peak(shape, first_step=False)
        result["first_step_peak_bytes"] = _training_peak(shape, first_step=True)
    return result


def closed_form_for(workload: Any) -> dict[str, int] | None:
    """The closed form when the workload is the built-in seed MLP, else None."""
    config = getattr(workload, "config", None) or {}
    if getattr(workload, "name", "") != "seed-mlp" or "hidden" not in config:
        return None
    if not getattr(workload, "set_to_none", True):
        return None
    dtype = next(iter(workload.model.parameters())).dtype
    return closed_form(SeedShape(
        input_dim=config["input_dim"], hidden=config["hidden"], classes=config["classes"],
        depth=workload.depth, batch=workload.batch_size, activation=config["activation"],
        bias=config["bias"], weight_decay=config["weight_decay"],
        dtype=str(dtype).removeprefix("torch."), optimizer=config["optimizer"],
    ))
