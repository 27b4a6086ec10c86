"""Model facts read from configs: context length, hidden size, family, causal LM, evaluation mode."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import DECODER_ONLY, ENCODER_DECODER, ENCODER_ONLY, tiny_config, tiny_model

from sparselm.errors import SparselmError
from sparselm.facts import context_length, evaluating, family, hidden_size, is_causal_lm
from sparselm.weights import find_block_lists


@pytest.mark.parametrize(
    ("name", "expected"),
    [("gpt2", 128), ("opt", 128), ("llama", 128), ("bert", 128), ("roberta", 130 - 1 - 1), ("bart", 128),
     ("pegasus", 128), ("t5", None)],
)
def test_context_length_is_the_usable_position_count(name, expected):
    assert context_length(tiny_config(name)) == expected
    assert context_length(tiny_model(name)) == expected


def test_roberta_base_context_is_512_not_514():
    config = transformers.RobertaConfig(max_position_embeddings=514, pad_token_id=1)  # as roberta-base ships
    assert context_length(config) == 512


def test_roberta_positions_past_the_context_do_not_exist():
    """The usable context is exactly what the embedding table accepts: one more token fails."""
    model = tiny_model("roberta")
    usable = context_length(model)
    with torch.no_grad():
        model(input_ids=torch.full((1, usable), 5))
        with pytest.raises((IndexError, RuntimeError)):  # the position table has no row for it
            model(input_ids=torch.full((1, usable + 1), 5))


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert", "t5", "bart"])
def test_hidden_size_is_the_width_of_the_first_block_input(name):
    model = tiny_model(name)
    widths = []
    first_block = find_block_lists(model)[0].blocks[0]
    first_block.register_forward_pre_hook(lambda _m, args, kwargs: widths.append(
        (args[0] if args else kwargs["hidden_states"]).shape[-1]), with_kwargs=True)
    ids = torch.full((1, 4), 5)
    with torch.no_grad():
        model(input_ids=ids, **({"decoder_input_ids": ids} if name in ENCODER_DECODER else {}))
    assert hidden_size(model) == widths[0] == 32


def test_hidden_size_unknown_is_a_clear_error():
    config = transformers.PretrainedConfig()
    with pytest.raises(SparselmError, match="cannot tell the hidden size"):
        hidden_size(config)


def test_family_of_every_tiny_model():
    for names, expected in [(DECODER_ONLY, "decoder-only"), (ENCODER_ONLY, "encoder-only"),
                            (ENCODER_DECODER, "encoder-decoder")]:
        for name in names:
            assert family(tiny_model(name)) == expected
            assert family(tiny_config(name)) == expected


def test_is_causal_lm_follows_the_class_not_the_family():
    assert is_causal_lm(tiny_model("gpt2"))
    assert not is_causal_lm(tiny_model("gpt2", head="base"))
    assert not is_causal_lm(tiny_model("bert"))  # masked LM
    assert is_causal_lm(transformers.RobertaForCausalLM(tiny_config("roberta")))
    assert not is_causal_lm(tiny_model("bart"))  # seq2seq
    config = tiny_config("llama")
    config.architectures = ["LlamaForCausalLM"]
    assert is_causal_lm(config)
    config.architectures = ["LlamaModel"]
    assert not is_causal_lm(config)


def test_evaluating_restores_the_training_flag_even_after_an_error():
    model = tiny_model("gpt2").train()
    with evaluating(model) as inside:
        assert inside is model and not model.training and torch.is_inference_mode_enabled()
    assert model.training and not torch.is_inference_mode_enabled()
    with pytest.raises(RuntimeError), evaluating(model):
        raise RuntimeError("boom")
    assert model.training
    model.eval()
    with evaluating(model):
        pass
    assert not model.training
