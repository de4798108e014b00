"""Fixtures of the parity tests: tiny models of each family, as HF folders and as GGUF files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from family_cases import BAICHUAN_CASES, FAMILY_CASES


@pytest.fixture(scope="session")
def baichuan_factory(tmp_path_factory, tiny_tokenizer_writer):
    """factory(case) -> (BaichuanReference, HF folder), made once per case. Do not modify them."""
    from baichuan_reference import make_tiny_baichuan

    made = {}

    def factory(case: str):
        if case not in made:
            folder = tmp_path_factory.mktemp(case)
            made[case] = make_tiny_baichuan(folder, tiny_tokenizer_writer, **BAICHUAN_CASES[case]), str(folder)
        return made[case]

    return factory


@pytest.fixture(scope="session")
def family_factory(tiny_hf_factory, baichuan_factory):
    """factory(case) -> (reference model, HF folder) for any FAMILY_CASES / BAICHUAN_CASES case."""
    def factory(case: str):
        return baichuan_factory(case) if case in BAICHUAN_CASES else tiny_hf_factory(**FAMILY_CASES[case])

    return factory


@pytest.fixture(scope="session")
def family_gguf(family_factory, gguf_writer, tmp_path_factory):
    """factory(case, qtype=None) -> GGUF path of the case's model, written as llama.cpp's converter
    would (Baichuan 2's head normalised first, as its README prescribes for llama.cpp)."""
    import torch.nn.functional as F

    made = {}

    def factory(case: str, qtype: int | None = None) -> str:
        key = (case, qtype)
        if key not in made:
            reference, folder = family_factory(case)
            config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
            tensors = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
            if case in BAICHUAN_CASES:
                tensors["lm_head.weight"] = F.normalize(reference.lm_head.weight.detach()).numpy()
            path = tmp_path_factory.mktemp(f"{case}-gguf") / f"{case}.gguf"
            made[key] = gguf_writer(path, config, tensors, qtype=qtype)
        return made[key]

    return factory
