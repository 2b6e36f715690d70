"""XLA's own temp-buffer figure for one refinement step on SmolLM2-135M, by block start and batch shape.

    .venv/bin/python bench/refine_step_memory.py [--cases 12:8x512,22:8x512,25:8x512,12:8x256,12:8x128]

Compiles (does not run) `refine.kl_loss_and_grad` (the loss and its gradient in T) for block
``(start, start + 4)`` of the real model on abstract inputs of batch ``B x S`` and prints
``compiled.memory_analysis().temp_size_in_bytes``, plus the loss alone (forward) for the first case.
Where the step's memory goes, without timing noise.
"""

from __future__ import annotations

import argparse
import functools
import json

import jax
import jax.numpy as jnp


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="12:8x512,22:8x512,25:8x512,12:8x256,12:8x128")
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--tokens-at-once", type=int, default=None,
                        help="rows' tokens per backward group (default: the library's; 1000000: the whole batch)")
    args = parser.parse_args()

    from replaceme_jax.conversion import load_model
    from replaceme_jax.replaceme import refine
    from replaceme_jax.replaceme.merge import replace_block

    model = load_model("smollm2-135m")
    dim, k = model.config.hidden_size, args.top_k
    rows = []
    for number, case in enumerate(args.cases.split(",")):
        start, shape = case.split(":")
        start, (batch, length) = int(start), (int(x) for x in shape.split("x"))
        params, config = replace_block(model.params, model.config, start, start + 4, None)

        def spec(shape, dtype=jnp.float32):
            return jax.ShapeDtypeStruct(shape, dtype)

        inputs = (params, spec((dim, dim)), spec((batch, length, dim)), spec((batch, length, dim)),
                  spec((batch, length), jnp.int32), spec((batch, length, k)), spec((batch, length, k), jnp.int32),
                  spec((batch, length), jnp.bool_))
        loss = functools.partial(refine.kl_loss, config=config, start=start)
        step = functools.partial(refine.kl_loss_and_grad, config=config, start=start,
                                 tokens_at_once=args.tokens_at_once)
        grad_temp = jax.jit(step).lower(*inputs).compile().memory_analysis().temp_size_in_bytes
        row = {"start": start, "layers_after_block": config.num_hidden_layers - start, "batch": [batch, length],
               "token_chunk": refine.TOKEN_CHUNK,
               "tokens_at_once": args.tokens_at_once or refine.TOKENS_AT_ONCE, "grad_temp_mb": round(grad_temp / 2**20)}
        if number == 0:
            forward = jax.jit(loss).lower(*inputs).compile().memory_analysis().temp_size_in_bytes
            row["forward_temp_mb"] = round(forward / 2**20)
        rows.append(row)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
