"""`vlft chat`: media by path, history across turns, bad files reported without ending the session, /reset."""

import io

import numpy as np
import torch
from PIL import Image

import vlft.chat as chat
from export_fixtures import make_checkpoint
from vlft.data import Media, Message
from vlft.generate import encode_prompt, generate, left_pad, load_for_inference, stop_ids


def test_chat_session(tmp_path, monkeypatch, capsys):
    base, ckpt, _, _ = make_checkpoint(tmp_path / "run", steps=0)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (56, 84, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    calls = []

    def recording_generate(model, **kw):
        calls.append(kw["input_ids"].clone())
        return generate(model, **kw)

    monkeypatch.setattr(chat, "generate", recording_generate)
    script = "\n".join([f"/image {tmp_path / 'a.png'}", "what is this?", f"/image {tmp_path / 'nope.png'}",
                        "and this?", "tell me more", "/reset", "hi", "/quit", "never read"]) + "\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    assert chat.main(["--adapter", str(ckpt), "--max-new-tokens", "5", "--attn", "eager"]) == 0
    out = capsys.readouterr().out
    assert "image attached" in out and "nope.png" in out and "(new conversation)" in out
    assert len(calls) == 3  # the message with the unreadable image was not sent
    # turn 1 equals a direct generate on the same conversation
    model, tokenizer, limits, _ = load_for_inference(None, str(ckpt), attn="eager")
    first = encode_prompt([Message("user", [Media("image", str(tmp_path / "a.png")), "what is this?"])],
                          tokenizer, limits)
    assert torch.equal(calls[0][0], first["input_ids"])
    pad = tokenizer.pad_token_id
    reply = generate(model, **left_pad([first], pad), max_new_tokens=5, eos_token_id=stop_ids(tokenizer, model),
                     pad_token_id=pad)
    # turn 2 carries turn 1 (with its image) and the reply; after /reset the history is gone
    assert calls[1].shape[1] > calls[0].shape[1] and torch.equal(calls[1][0, :calls[0].shape[1]], calls[0][0])
    assert int((calls[1] == 268).sum()) == int((calls[0] == 268).sum()) > 0
    assert calls[2].shape[1] < calls[0].shape[1] and int((calls[2] == 268).sum()) == 0
    text = tokenizer.decode([t for t in reply[0].tolist() if t not in stop_ids(tokenizer, model) + [pad]],
                            skip_special_tokens=True)
    assert text in out
