"""The model's forward refuses keyword arguments it does not know (a misspelled one would otherwise be dropped
silently), accepts the ones transformers-style callers pass, and builds logits only for the positions asked for."""

from __future__ import annotations

import pytest
import torch

from model_fixtures import make_pair, media_inputs


@pytest.fixture(scope="module")
def model_and_batch():
    model, _ = make_pair()
    batch = media_inputs(model.config, [[3, ("image", (1, 8, 12)), 4]])
    batch.pop("mm_token_type_ids")
    return model, batch


def test_misspelled_argument_is_an_error_naming_it(model_and_batch):
    model, batch = model_and_batch
    with pytest.raises(TypeError, match="pixel_value_videos"):
        model(**batch, pixel_value_videos=batch["pixel_values"])


def test_transformers_style_arguments_are_accepted(model_and_batch):
    model, batch = model_and_batch
    ids = batch["input_ids"]
    mm = (ids == model.config.image_token_id).long()
    with torch.no_grad():
        plain = model(**batch).logits
        # what peft's causal-LM wrapper and a transformers processor add
        styled = model(**batch, mm_token_type_ids=mm, inputs_embeds=None, output_attentions=None,
                       output_hidden_states=False, return_dict=True).logits
    assert torch.equal(plain, styled)
    for flag in ("output_attentions", "output_hidden_states"):
        with pytest.raises(ValueError, match=flag):
            model(**batch, **{flag: True})


def test_logits_to_keep_builds_only_the_last_positions(model_and_batch):
    model, batch = model_and_batch
    with torch.no_grad():
        full = model(**batch).logits
        last = model(**batch, logits_to_keep=1).logits
        two = model(**batch, logits_to_keep=2).logits
    assert last.shape == (1, 1, full.shape[-1]) and two.shape[1] == 2
    assert torch.allclose(last, full[:, -1:], atol=1e-6) and torch.allclose(two, full[:, -2:], atol=1e-6)
