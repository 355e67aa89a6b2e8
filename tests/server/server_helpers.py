"""Shared by the tests of the session-wide `tiny_server` (conftest): its model, its generation defaults, and
the offline reference a served completion must equal (module names must be unique across tests/)."""
from dlc.runtime.generate import GenerationConfig, generate
from dlc.runtime.session import encode_prompt

MODEL = "tiny-llada"
GEN = dict(gen_length=16, block_length=8, steps=8, kv_cache="dual")    # tiny_server's defaults (conftest)


def reference(session, prompt, chat=False, **params):
    """generate()'s tokens for ``prompt`` with the server's defaults overridden by ``params``."""
    ids = encode_prompt(session, prompt, chat)
    return generate(session.runner, [ids],
                    GenerationConfig(**{**GEN, **params}, stop_at_eos=True)).token_ids[0]
