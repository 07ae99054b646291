"""`vlft chat`: an interactive conversation with images and videos given by path.

    vlft chat [--model DIR] [--adapter CKPT] [--image PATH ...] [--video PATH ...] [sampling options]

Type a message and press enter. Commands: `/image PATH` and `/video PATH` attach media to the next message,
`/reset` starts a new conversation, `/quit` (or end of input) leaves. Each turn re-renders the whole conversation
with the training template; media are processed once and kept.
"""

from __future__ import annotations

import argparse
import sys

from vlft.generate import (add_model_args, add_sampling_args, encode_prompt, generate, left_pad, load_for_inference,
                           sampling_kwargs, to_device)

HELP = "commands: /image PATH, /video PATH (attach to the next message), /reset, /quit"


def main(argv: list[str] | None = None) -> int:
    from vlft.data import Media, Message
    from vlft.data.errors import BadInput

    ap = argparse.ArgumentParser(prog="vlft chat", description="interactive chat with images and videos by path")
    add_model_args(ap)
    ap.add_argument("--image", action="append", default=[], help="image for the first message (repeatable)")
    ap.add_argument("--video", action="append", default=[], help="video for the first message (repeatable)")
    add_sampling_args(ap)
    args = ap.parse_args(argv)
    # a missing model or adapter is reported by the vlft CLI's one error policy (vlft/cli.py)
    model, tokenizer, limits, _ = load_for_inference(args.model, args.adapter, args.dtype, args.device, args.attn,
                                                     load_4bit=args.load_4bit)
    kw = sampling_kwargs(args, tokenizer, model)
    device, tps = model.lm_head.weight.device, model.config.vision.tokens_per_second
    history: list = []
    pending = [Media("image", p) for p in args.image] + [Media("video", p) for p in args.video]
    cache: dict = {}
    print(HELP, file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            history, pending = [], []
            print("(new conversation)")
            continue
        if line.startswith(("/image ", "/video ")):
            kind, path = line[1:].split(" ", 1)
            pending.append(Media(kind, path.strip()))
            print(f"({kind} attached: {path.strip()})")
            continue
        if line.startswith("/"):
            print(HELP)
            continue
        turn = Message("user", pending + [line])
        try:
            sample = encode_prompt(history + [turn], tokenizer, limits, tps, args.system, cache)
        except BadInput as e:  # a media file that cannot be read: say so and keep the conversation
            print(f"error: {e} (message not sent; attach again)")
            pending = []
            continue
        new = generate(model, **to_device(left_pad([sample], kw["pad_token_id"]), device), **kw)[0].tolist()
        stops = set(kw["eos_token_id"]) | {kw["pad_token_id"]}
        reply = tokenizer.decode([t for t in new if t not in stops], skip_special_tokens=True)
        print(reply)
        history += [turn, Message("assistant", [reply])]
        pending = []
    return 0


if __name__ == "__main__":
    sys.exit(main())
