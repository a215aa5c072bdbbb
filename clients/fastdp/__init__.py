"""Fast DP-SGD clipping: the same clipped sum as Opacus, without per-example autograd.

Opacus's hooks build every per-example gradient inside the backward pass, and its
``DPLSTM`` runs one Python step (two small linear layers) per token. Here one forward
and one backward that stops at the trainable layers' outputs (no weight gradients are
formed) give, per layer, its input ``a`` and the gradient ``g`` of its output. A weight's
per-example gradient is ``sum_t g_t a_t^T``; from these pairs we form either the
per-example gradients with one batched matrix product (when they fit in memory), or
only their norms, ``sum_{t,s} (g_t . g_s)(a_t . a_s)`` ("ghost" norms, Li et al. 2021),
and then the clipped sum ``sum_i c_i G_i`` directly (book-keeping, Bu et al. 2023), so no
second backward pass is needed.

The privacy mechanism is Opacus's: its Poisson data loader, its noise
(``DPOptimizerFastGradientClipping`` adds N(0, sigma^2 C^2) to the clipped sum and divides
by the expected batch size) and its accountant hook. Only the clipped sum is computed here,
with Opacus's clip factor ``min(1, C / (||g_i|| + 1e-6))`` over all trainable parameters
(flat clipping).

Layout (one rule per layer type, as Opacus's grad samplers): ``per_example`` (a parameter's
per-example gradients, materialized or as ghost norms), ``rules/`` (what one module type
records in the forward and turns into per-example terms), ``layers`` (which rule handles
which module), ``lstm`` (the fused LSTM forward the LSTM rule swaps in), ``clipper`` (the
clipped sum), ``poisson`` (the Poisson loader) and ``engine`` (Opacus's engine and
``make_private`` around the clipper).
"""
