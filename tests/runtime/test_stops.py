"""Stop strings on detokenized text (runtime/stops.py) and stop token ids in the decoding core."""
import pytest

from dlc.runtime.decoding import FieldError, GenerationConfig
from dlc.runtime.generate import generate
from dlc.runtime.session import open_model
from dlc.runtime.stops import StopStrings, check_stops


class CharTok:
    """Token id i is chr(i)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def ids(text):
    return [ord(c) for c in text]


def test_find_cuts_before_the_first_stop_and_keeps_the_tokens_through_it():
    s = StopStrings(CharTok(), ("cd", "zz"))
    cut = s.find(ids("abcdefcd"))
    assert cut.text == "ab" and cut.n_tokens == 4                      # through the 'd' that completes "cd"
    assert s.find(ids("abc")) is None


def test_holdback_is_the_longest_tail_that_could_start_a_stop():
    s = StopStrings(CharTok(), ("xyz", "ab"))
    assert s.holdback("hello") == 0
    assert s.holdback("hellox") == 1 and s.holdback("helloxy") == 2 and s.holdback("hella") == 1
    assert s.holdback("xyzq") == 0


@pytest.mark.parametrize("stop,needle",
                         [([""], "1 to 256"), (["a"] * 17, "at most 16"), (["x" * 257], "1 to 256")])
def test_check_stops(stop, needle):
    with pytest.raises(ValueError, match=needle):
        check_stops(stop)
    assert check_stops("a") == ("a",) and check_stops(None) == ()


def test_stop_token_ids_end_generation_at_the_block():
    s = open_model("tiny-llada", progress=False)
    cfg = dict(gen_length=24, block_length=8, steps=12, stop_at_eos=True)
    full = generate(s.runner, [[5, 6, 7]], GenerationConfig(**cfg)).token_ids[0]
    j = next(j for j in range(9, len(full)) if full[j] not in full[:j])
    cut = generate(s.runner, [[5, 6, 7]], GenerationConfig(**cfg, stop_token_ids=[full[j]])).token_ids[0]
    assert cut == full[:j]
    with pytest.raises(FieldError, match="stop_token_ids"):
        GenerationConfig(**cfg, stop_token_ids=[-1])
