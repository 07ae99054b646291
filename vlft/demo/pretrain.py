"""Stage 1 of the demo: make a base model that already sees, as a user's Qwen2.5-VL does.

A user fine-tunes a model that already sees. The demo cannot download one, so it makes one: a random tiny Qwen2.5-VL
trained in full (every weight, no LoRA) to describe the task's pictures and clips in a few words ("a red square",
"a square moving left", "a red shape then a green shape"; see task.Sample.caption), then saved as a normal HF folder
with its tokenizer and processor files. Stage 2 (`vlft train`, LoRA) adapts that base to the question task.

This is the demo's own pretraining, not a user's fine-tune, so it is a plain PyTorch loop rather than recipes/sft.py;
it uses vlft's model, data pipeline (the same media processing, chat template and collator as `vlft train`) and
optimizer helpers.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from tqdm.auto import tqdm

from vlft.config import OptimSection
from vlft.data import Collator, DataConfig, DatasetConfig, build_datasets
from vlft.data.collator import model_inputs


@dataclasses.dataclass
class BaseTraining:
    """Settings of stage 1 (the YAML of `vlft train` has no place for them: they are not a fine-tune's)."""

    steps: int = 800
    batch_size: int = 16
    lr: float = 2e-3
    warmup_steps: int = 30
    min_lr_ratio: float = 0.05  # cosine decay towards lr * this
    log_every: int = 10


# Decoder layers of the base (the tiny preset has 2). A caption word after "a " needs two steps, one to see where in
# the caption it stands and one to look up the picture; with 2 layers one seed of ten had not learned shapes after
# 1200 steps, with 4 it knew every caption after 500 (measured; 4 layers cost about 15% more time per step).
TEXT_LAYERS = 4


def init_for_width(model: torch.nn.Module) -> None:
    """Re-draw the weights at a scale for the tiny preset's widths: normal(0, 1/sqrt(fan_in)) for linear and patch
    weights (unit-variance outputs), normal(0, 1) embeddings. The released models' 0.02 (vlft.model's init) suits
    widths of 1280-8192; at 64-128 it gives near-zero attention logits, whose learning plateaus for hundreds of steps
    at a length that depends on the seed (measured: colour learned after 100 steps instead of 500 on one seed)."""
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv3d)):
            torch.nn.init.normal_(module.weight, std=module.weight[0].numel() ** -0.5)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, torch.nn.Embedding):
            torch.nn.init.normal_(module.weight, std=1.0)


def train_base(model, tokenizer, data_cfg: DataConfig, records: Path, settings: BaseTraining, seed: int,
               progress: bool = True) -> list[tuple[int, float]]:
    """Train every weight of `model` on the caption records in `records`: one pass over `steps x batch_size` of
    them, in the dataset's seeded order. Returns (step, loss) every `settings.log_every` steps and at the first.

    `data_cfg` gives the pixel and frame limits (configs/demo.yaml's, so that both stages see the same sizes).
    """
    from vlft.optim import build_optimizer, build_scheduler

    cfg = dataclasses.replace(data_cfg, datasets=[DatasetConfig(path=str(records))], eval_datasets=[],
                              eval_split=0.0, seed=seed)
    dataset, _ = build_datasets(cfg, tokenizer, model.config.vision.tokens_per_second)
    needed = settings.steps * settings.batch_size
    if len(dataset) < needed:
        raise ValueError(f"{records} holds {len(dataset)} samples; {settings.steps} steps of "
                         f"{settings.batch_size} need {needed}")
    loader = torch.utils.data.DataLoader(dataset, batch_size=settings.batch_size, drop_last=True,
                                         num_workers=cfg.num_workers, collate_fn=Collator(model.config,
                                                                                          tokenizer.pad_token_id))
    optim = OptimSection(lr=settings.lr, warmup_steps=settings.warmup_steps, schedule="cosine",
                         min_lr_ratio=settings.min_lr_ratio, max_grad_norm=1.0)
    optimizer = build_optimizer(model, optim)
    scheduler = build_scheduler(optimizer, optim, settings.steps)
    torch.manual_seed(seed)
    model.train()
    losses: list[tuple[int, float]] = []
    bar = tqdm(total=settings.steps, desc="stage 1, base (full training)", disable=not progress, dynamic_ncols=True)
    for step, batch in zip(range(1, settings.steps + 1), loader):
        if batch["skipped"]:
            raise RuntimeError(f"a sample of {records} could not be read (see the warning above)")
        out = model(**model_inputs(batch), return_logits=False, run_vision_always=True)
        out.loss.backward()  # mean over the batch's caption tokens
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss = float(out.loss.detach())
        if step == 1 or step % settings.log_every == 0 or step == settings.steps:
            losses.append((step, loss))
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
    bar.close()
    model.eval()
    return losses


def make_base(folder: Path, seed: int, data_cfg: DataConfig, records: Path, settings: BaseTraining,
              words: list[str], progress: bool = True) -> list[tuple[int, float]]:
    """The base model: a tiny Qwen2.5-VL (preset "tiny": text 128 wide, vision 64 wide, 320-token vocabulary; with
    TEXT_LAYERS decoder layers) and the tiny tokenizer whose task words are single tokens, trained on `records` (train_base) and saved in `folder` as an
    HF folder with the processor files of the demo's pixel limits. Returns the logged (step, loss) pairs."""
    from vlft.checkpoint import write_inference_files
    from vlft.data.tiny_tokenizer import build_tiny_tokenizer
    from vlft.model import build_model, preset, save_pretrained

    tokenizer = build_tiny_tokenizer(folder, words)
    config = preset("tiny")
    config.text.num_hidden_layers = TEXT_LAYERS
    if len(tokenizer) > config.text.vocab_size:
        raise ValueError(f"the tiny tokenizer has {len(tokenizer)} tokens, more than the model's vocabulary "
                         f"{config.text.vocab_size}")
    torch.manual_seed(seed)
    model = build_model(config)
    init_for_width(model)
    losses = train_base(model, tokenizer, data_cfg, records, settings, seed, progress)
    save_pretrained(model, folder)
    write_inference_files(folder, tokenizer, data_cfg, config, str(folder))
    return losses
