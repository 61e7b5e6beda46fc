"""The one table of SamplingParams on the worker wire (backends/serving/sampling_wire.py):
every field crosses, round trips exactly, and the worker models declare exactly its tensors."""

from __future__ import annotations

from dataclasses import fields

import numpy as np
import pytest

from backends.engine.sampling_params import SamplingParams
from backends.serving import specs
from backends.serving.sampling_wire import SAMPLING_FIELDS, decode, encode

FULL = SamplingParams(max_tokens=7, temperature=0.5, top_k=3, top_p=0.25, min_tokens=2, seed=2**63 + 5,
                      stop_token_ids=(4, 9), stop=("ab", "c d"), ignore_eos=True, logprobs=True,
                      repetition_penalty=1.5, presence_penalty=-0.5, frequency_penalty=0.75, min_p=0.125,
                      bad_words_ids=((7, 8, 9), (1,), (2, 3)))


def test_every_sampling_field_has_one_row() -> None:
    params = [f.param for f in SAMPLING_FIELDS]
    assert sorted(params) == sorted(f.name for f in fields(SamplingParams))
    assert len({f.tensor for f in SAMPLING_FIELDS}) == len(SAMPLING_FIELDS)


@pytest.mark.parametrize("params", [FULL, SamplingParams()], ids=["every field set", "defaults"])
def test_round_trip(params: SamplingParams) -> None:
    assert decode(encode(params)) == params


def test_missing_tensors_read_as_defaults_and_none_is_not_sent() -> None:
    assert decode({}) == SamplingParams()
    assert "random_seed" not in encode(SamplingParams(seed=None))
    tensors = encode(FULL)
    assert tensors["random_seed"].dtype == np.uint64 and tensors["random_seed"].tolist() == [2**63 + 5]
    assert tensors["bad_words_list"].tolist() == [[7, 8, 9, 1, 2, 3], [3, 4, 6, -1, -1, -1]]


def test_worker_models_declare_the_table() -> None:
    declared = {t.name: (t.data_type, t.dims) for t in specs.WORKER_INPUTS}
    assert {f.tensor: (f.data_type, f.dims) for f in SAMPLING_FIELDS}.items() <= declared.items()
    assert set(declared) - {f.tensor for f in SAMPLING_FIELDS} == {"input_ids", "prior_output_ids",
                                                                   "context_phase_params"}
