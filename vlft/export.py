"""`vlft export merged|adapter`: merged HF folders and PEFT adapters that transformers, peft and serving engines load.

    vlft export merged  --adapter CKPT [--base BASE] --out DIR [--dtype bf16|fp16|fp32] [--overwrite]
    vlft export adapter --adapter CKPT [--base BASE] --out DIR [--for-vllm] [--overwrite]

CKPT is a training checkpoint (`checkpoint-N/`, see vlft/checkpoint.py), a run folder (its newest complete checkpoint
is used) or any PEFT LoRA/DoRA folder saved from vlft or from transformers. BASE defaults to the path the checkpoint
records in base_model.json.

The merge streams tensor by tensor: each base shard is read one tensor at a time, merged in float32 and written to
the output shard at once, so host memory holds one tensor (plus its float32 copy) and the adapter, never a shard or
the model. Output keys are in the Hub layout (docs/checkpoints.md#key-layouts) and keep the base's sharding.
Everything is written to a temporary folder next to DIR and renamed at the end, so a failure leaves nothing
half-written; the working folders of an export that was killed (`.DIR.tmp-HOST-PID`, ...) are removed by the next
export to DIR once that process is gone. The merge arithmetic itself is in vlft/lora_merge.py; this module imports no
training code (no accelerate, DeepSpeed or peft).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import socket
import sys
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open

from vlft.errors import UserError
from vlft.lora_merge import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, PARTS, PEFT_PREFIX, Adapter, check_fits, load_adapter,
                             merge_weight, part_of)
from vlft.model.weights import DTYPES, ST_DTYPES, to_hub_key, weight_files
from vlft.run_folder import rebuild_preset

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json")
PROCESSOR_FILES = ("preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json")


class ExportError(UserError, ValueError):
    """Bad input for an export: the message names the file, key or option."""


# ============================================================================= safetensors, one tensor at a time
# Reading uses safetensors' safe_open, reopened for every tensor: safe_open maps the whole file, and the pages a read
# touched stay resident until the mapping closes, so one open handle per shard would let a whole shard build up.
# Writing: safetensors only writes a complete dict of tensors (the header, which comes first, needs every tensor's
# size; its maintainers keep it that way), so ShardWriter writes the header from the known names, dtypes and shapes,
# then the tensors one by one.
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except SafetensorError as e:
        raise ExportError(f"{path} is not a readable safetensors file ({e})") from None


def read_entries(path: Path) -> tuple[dict[str, tuple[torch.dtype, list[int]]], dict[str, str]]:
    """({name: (dtype, shape)}, __metadata__) of a safetensors file, without reading its tensors."""
    with _open(path) as f:
        entries = {}
        for k in f.keys():
            part = f.get_slice(k)
            if part.get_dtype() not in ST_DTYPES:
                raise ExportError(f"{path}: tensor {k} has dtype {part.get_dtype()}, which vlft export does not handle")
            entries[k] = (ST_DTYPES[part.get_dtype()], list(part.get_shape()))
        return entries, f.metadata() or {}


def read_tensor(path: Path, key: str) -> torch.Tensor:
    """One tensor of a safetensors file (the file is opened for this tensor alone, see above)."""
    with _open(path) as f:
        return f.get_tensor(key)


class ShardWriter:
    """Writes a safetensors file whose tensor names, dtypes and shapes are known up front, tensor by tensor."""

    def __init__(self, path: Path, entries: list[tuple[str, torch.dtype, list[int]]], metadata: dict | None = None):
        header, offset = {}, 0
        self.expected = []
        for name, dtype, shape in entries:
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self.expected.append((name, dtype, list(shape)))
            offset += nbytes
        header["__metadata__"] = metadata or {"format": "pt"}
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data area starts 8-byte aligned, as the safetensors library writes it
        self.f = open(path, "wb")
        self.f.write(len(text).to_bytes(8, "little") + text)
        self.i = 0

    def write(self, name: str, t: torch.Tensor) -> None:
        want = self.expected[self.i]
        if (name, t.dtype, list(t.shape)) != want:
            raise RuntimeError(f"shard writer: got {name} {t.dtype} {list(t.shape)}, expected {want}")
        if t.numel():
            self.f.write(memoryview(t.detach().contiguous().view(-1).view(torch.uint8).numpy()))
        self.i += 1

    def finish(self) -> None:
        self.f.close()
        if self.i != len(self.expected):
            raise RuntimeError(f"shard writer: {self.i} of {len(self.expected)} tensors written")


# ============================================================================= the streaming merge
def base_shapes(base: Path) -> tuple[list[Path], dict[str, list[int]]]:
    files = weight_files(base)
    shapes = {}
    for f in files:
        shapes.update({to_hub_key(k): shape for k, (_, shape) in read_entries(f)[0].items()})
    return files, shapes


def merge_into(base: Path, adapter: Adapter, out: Path, dtype: torch.dtype | None,
               parts: tuple[str, ...] = PARTS) -> dict[str, int]:
    """Write the base's weights with the adapter's `parts` merged into `out` (Hub keys, the base's shards).
    Returns counts of what was merged."""
    files, shapes = base_shapes(base)
    check_fits(adapter, shapes, base)
    lora = {m + ".weight": w for m, w in adapter.lora.items() if part_of(m) in parts}
    full = {k: t for k, t in adapter.full.items() if part_of(k) in parts}
    counts = {"lora": 0, "dora": 0, "full": 0}
    weight_map, total = {}, 0
    for path in files:
        stored, meta = read_entries(path)
        names = list(stored)
        entries = [(to_hub_key(k), dtype or stored[k][0], stored[k][1]) for k in names]
        writer = ShardWriter(out / path.name, entries, {**meta, "format": "pt"})
        try:
            for k, (name, out_dtype, _) in zip(names, entries):
                t = read_tensor(path, k)
                if name in lora:
                    t = merge_weight(t, lora[name], out_dtype)
                    counts["dora" if lora[name].magnitude is not None else "lora"] += 1
                elif name in full:
                    t = full[name].to(out_dtype)
                    counts["full"] += 1
                else:
                    t = t.to(out_dtype)
                writer.write(name, t)
                weight_map[name] = path.name
                total += t.numel() * t.element_size()
                del t
            writer.finish()
        finally:
            writer.f.close()  # on an error: the caller removes the temporary folder
    if len(files) > 1 or (base / "model.safetensors.index.json").is_file():
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return counts


# ============================================================================= HF folder extras
def copy_extras(sources: list[Path], out: Path, names: tuple[str, ...]) -> dict[str, Path]:
    """Copy each named file from the first source folder that has it; returns {name: source folder}."""
    got = {}
    for name in names:
        for src in sources:
            if (src / name).is_file():
                shutil.copy2(src / name, out / name)
                got[name] = src
                break
    return got


def write_configs(base: Path, out: Path, dtype: torch.dtype | None) -> None:
    """config.json from the base (dtype updated when converted) and generation_config.json (the base's, or one
    made from the config's token ids like the Hub's)."""
    config = json.loads((base / "config.json").read_text())
    if dtype is not None:
        name = str(dtype).replace("torch.", "")
        config["torch_dtype"] = name
        for d in (config, config.get("text_config") or {}):
            if "dtype" in d:
                d["dtype"] = name
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if (base / "generation_config.json").is_file():
        shutil.copy2(base / "generation_config.json", out / "generation_config.json")
        return
    text = config.get("text_config") or config
    bos = config.get("bos_token_id", text.get("bos_token_id"))
    eos = config.get("eos_token_id", text.get("eos_token_id"))
    gen = {"bos_token_id": bos, "eos_token_id": [e for e in dict.fromkeys([eos, bos]) if e is not None],
           "pad_token_id": config.get("pad_token_id") or bos, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def report_extras(got: dict[str, Path], ckpt: Path) -> list[str]:
    lines = []
    for name in ("preprocessor_config.json", "video_preprocessor_config.json"):
        if name not in got:
            lines.append(f"warning: no {name} in the checkpoint or the base; inference will use default pixel/frame "
                         "limits, not those of training")
        elif got[name] != ckpt:
            lines.append(f"warning: {name} comes from the base, not the checkpoint: its limits may differ from training")
    if not any(n in got for n in ("tokenizer.json", "vocab.json")):
        lines.append("warning: no tokenizer files in the checkpoint or the base")
    return lines


# ============================================================================= output folders, atomically
# Working folders sit next to the output (same file system: the final rename is atomic, and no copy of a model lands
# in /tmp): .OUT.tmp-HOST-PID (the output being written), .OUT.old-HOST-PID (the previous output while it is being
# replaced), .OUT.base-HOST-PID (a rebuilt preset base). HOST and PID say whose they are, so a later export can prove
# that their process is gone (a folder of another machine sharing the disk is never touched).
WORK_FOLDER = r"\.{name}\.(tmp|old|base)-(?:(.+)-)?(\d+)"


def work_folder(out: Path, kind: str) -> Path:
    return out.parent / f".{out.name}.{kind}-{socket.gethostname()}-{os.getpid()}"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def clean_stale(out: Path) -> None:
    """Remove the working folders an interrupted export to `out` left behind, once their process is gone; a previous
    output that was moved aside and never replaced is put back."""
    out = out.absolute()
    if not out.parent.is_dir():
        return
    pattern = re.compile(WORK_FOLDER.format(name=re.escape(out.name)))
    for p in sorted(out.parent.iterdir()):
        hit = pattern.fullmatch(p.name)
        if not hit or not p.is_dir():
            continue
        kind, host, pid = hit.group(1), hit.group(2), int(hit.group(3))
        if (host is not None and host != socket.gethostname()) or pid == os.getpid() or _process_alive(pid):
            continue
        if kind == "old" and not out.exists():
            os.replace(p, out)
            print(f"restored {out} from {p.name}, moved aside by an export that was interrupted", file=sys.stderr)
        else:
            shutil.rmtree(p, ignore_errors=True)
            print(f"removed {p}, left by an export that was interrupted (process {pid})", file=sys.stderr)


def prepare_out(out: Path, overwrite: bool, inputs: list[Path]) -> Path:
    """Refuse a non-empty output (unless overwrite) and an output inside an input; return the temporary folder."""
    out = out.absolute()
    for p in inputs:
        p = p.absolute()
        if out == p or p in out.parents or out in p.parents:
            raise ExportError(f"--out {out} overlaps the input folder {p}")
    if out.exists():
        if not out.is_dir():
            raise ExportError(f"--out {out} exists and is not a folder")
        if any(out.iterdir()) and not overwrite:
            raise ExportError(f"--out {out} exists and is not empty; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = work_folder(out, "tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def finish_out(tmp: Path, out: Path) -> None:
    """Put the finished temporary folder in place of `out` (an old `out` is removed only after the rename)."""
    out = out.absolute()
    old = None
    if out.exists():
        old = work_folder(out, "old")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def resolve_base(base: str | None, ckpt: Path, scratch: Path | None = None) -> Path:
    """The base HF folder: --base, else the path in the checkpoint's base_model.json. A `preset:tiny` base (random
    weights seeded by the run's train.seed, as the recipe builds it in float32) is rebuilt into `scratch`."""
    if base is None:
        info = ckpt / "base_model.json"
        if not info.is_file():
            raise ExportError(f"pass --base: {ckpt} has no base_model.json naming its base model")
        rec = json.loads(info.read_text())
        base = rec.get("path") or rec.get("model_path") or rec.get("base_model_name_or_path")
        if not base:
            raise ExportError(f"pass --base: {info} names no base model path")
        print(f"base model from {info}: {base}", file=sys.stderr)
        if rec.get("quantization"):  # QLoRA: the run saw a 4-bit copy; the merge uses the float weights on disk
            print(f"the adapter was trained on a 4-bit ({rec['quantization'].get('quant_type')}) copy of this base; "
                  "it is merged into the base's original float weights", file=sys.stderr)
    if str(base).startswith("preset:"):
        if base != "preset:tiny" or scratch is None:
            raise ExportError(f"pass --base: {base!r} is a random preset, not a folder of weights")
        from vlft.model import save_pretrained

        save_pretrained(rebuild_preset(base, ckpt), scratch)
        return scratch
    p = Path(base)
    if not (p / "config.json").is_file():
        raise ExportError(f"base model folder {p} has no config.json")
    quantized = json.loads((p / "config.json").read_text()).get("quantization_config")
    if quantized:  # merging there would dequantize, add the update and quantize again, losing the small updates
        raise ExportError(f"base model folder {p} holds quantized weights ({quantized.get('quant_method', 'unknown')}"
                          "); merge into the original float model instead (--base FOLDER of the float weights)")
    try:
        weight_files(p)  # fails naming the folder when weights are missing
    except ValueError as e:  # pickle-only weights
        raise ExportError(str(e)) from None
    return p


# ============================================================================= PEFT adapter for transformers / vLLM
def to_v5_key(name: str) -> str:
    """Hub name -> transformers v5 in-memory name (the inverse of to_hub_key)."""
    if name.startswith("visual."):
        return "model." + name
    if name.startswith("model.") and not name.startswith(("model.language_model.", "model.visual.")):
        return "model.language_model." + name[len("model."):]
    return name


def _layout_free(escaped_hub_prefix: str) -> str:
    # accept the Hub names (vlft, serving engines) and the transformers v5 names
    if escaped_hub_prefix.startswith(r"visual\."):
        return r"(?:model\.)?" + escaped_hub_prefix
    if escaped_hub_prefix.startswith(r"model\."):
        return r"model\.(?:language_model\.)?" + escaped_hub_prefix[len(r"model\."):]
    return escaped_hub_prefix


def target_regex(modules: list[str]) -> str:
    """A regex that full-matches exactly these modules (Hub or v5 names): one alternative per block kind, with the
    block indices listed, so `layers.1.mlp.gate_proj` never catches a vision `blocks.1.mlp.gate_proj`."""
    groups: dict[tuple[str, tuple[int, ...]], list[str]] = {}
    by_template: dict[tuple[str, str], set[int]] = {}
    singles = []
    for m in modules:
        hit = re.fullmatch(r"(.*?\.(?:layers|blocks)\.)(\d+)\.(.+)", m)
        if hit:
            by_template.setdefault((hit.group(1), hit.group(3)), set()).add(int(hit.group(2)))
        else:
            singles.append(m)
    for (prefix, suffix), idx in by_template.items():
        groups.setdefault((prefix, tuple(sorted(idx))), []).append(suffix)
    alts = []
    for (prefix, idx), suffixes in sorted(groups.items()):
        alts.append(_layout_free(re.escape(prefix)) + "(?:" + "|".join(map(str, idx)) + r")\."
                    + "(?:" + "|".join(re.escape(s) for s in sorted(suffixes)) + ")")
    alts += [_layout_free(re.escape(s)) for s in sorted(singles)]
    return "(?:" + "|".join(alts) + ")"


def adapter_files(adapter: Adapter, modules: list[str], full: bool, layout: str, base: Path | None
                  ) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config, tensors) for `modules` (+ the fully trained parameters when `full`), keys in `layout`
    ("v5": transformers 5 in-memory names; "hub": checkpoint names, which vLLM maps itself)."""
    rename = to_v5_key if layout == "v5" else (lambda k: k)
    tensors = {}
    for m in modules:
        w = adapter.lora[m]
        key = PEFT_PREFIX + rename(m)
        tensors[key + ".lora_A.weight"] = w.A
        tensors[key + ".lora_B.weight"] = w.B
        if w.magnitude is not None:
            tensors[key + ".lora_magnitude_vector"] = w.magnitude
    full_modules = []
    if full:
        for k, t in adapter.full.items():
            tensors[PEFT_PREFIX + rename(k)] = t
        full_modules = sorted({rename(m) for m in adapter.config.get("modules_to_save") or []})
    config = dict(adapter.config)
    config.update(target_modules=target_regex(modules), modules_to_save=full_modules or None,
                  layers_to_transform=None, layers_pattern=None, exclude_modules=None, inference_mode=True,
                  base_model_name_or_path=str(base) if base else config.get("base_model_name_or_path"),
                  use_dora=any(adapter.lora[m].magnitude is not None for m in modules))
    for key in ("rank_pattern", "alpha_pattern"):
        config[key] = {rename(k): v for k, v in (config.get(key) or {}).items()}
    config["auto_mapping"] = {"base_model_class": "Qwen2_5_VLForConditionalGeneration",
                              "parent_library": "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl"}
    return config, tensors


def write_adapter(folder: Path, config: dict, tensors: dict[str, torch.Tensor], extras_from: list[Path]) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    copy_extras(extras_from, folder, TOKENIZER_FILES + PROCESSOR_FILES)


# ============================================================================= commands
@contextlib.contextmanager
def working_folders(out: Path) -> Iterator[tuple[Path, list[Path]]]:
    """(the scratch folder of a rebuilt preset base, a list the caller adds its temporary output to): after stale
    folders of killed exports to `out` are cleaned, all of these are removed when the export ends, however it ends."""
    clean_stale(out)
    scratch = work_folder(out.absolute(), "base")  # created only for a preset base
    made = [scratch]
    try:
        yield scratch, made
    finally:
        for folder in made:
            shutil.rmtree(folder, ignore_errors=True)


def export_merged(adapter_path: str, out: str, base: str | None = None, dtype: str | None = None,
                  overwrite: bool = False) -> Path:
    adapter = load_adapter(adapter_path)
    with working_folders(Path(out)) as (scratch, made):
        base_dir = resolve_base(base, adapter.folder, scratch)
        out_dtype = DTYPES[dtype] if dtype else None
        tmp = prepare_out(Path(out), overwrite, [base_dir, adapter.folder])
        made.append(tmp)
        counts = merge_into(base_dir, adapter, tmp, out_dtype)
        write_configs(base_dir, tmp, out_dtype)
        got = copy_extras([adapter.folder, base_dir], tmp, TOKENIZER_FILES + PROCESSOR_FILES)
        finish_out(tmp, Path(out))
    shown_base = "the rebuilt preset base" if base_dir == scratch else base_dir  # the scratch copy is gone by now
    print(f"merged {counts['lora']} LoRA and {counts['dora']} DoRA modules and {counts['full']} fully trained "
          f"tensors of {adapter.folder} into {shown_base} -> {out}")
    for line in report_extras(got, adapter.folder):
        print(line, file=sys.stderr)
    return Path(out)


def export_adapter(adapter_path: str, out: str, base: str | None = None, for_vllm: bool = False,
                   overwrite: bool = False) -> Path:
    adapter = load_adapter(adapter_path)
    with working_folders(Path(out)) as (scratch, made):
        base_dir = resolve_base(base, adapter.folder, scratch) if (base or for_vllm) else None
        if base_dir is not None:
            check_fits(adapter, base_shapes(base_dir)[1], base_dir)
        inputs = [adapter.folder] + ([base_dir] if base_dir else [])
        tmp = prepare_out(Path(out), overwrite, inputs)
        made.append(tmp)
        if for_vllm:
            lines = _export_for_vllm(adapter, base_dir, tmp, Path(out))
        else:
            config, tensors = adapter_files(adapter, sorted(adapter.lora), True, "v5", base_dir)
            write_adapter(tmp, config, tensors, [adapter.folder] + ([base_dir] if base_dir else []))
            lines = [f"wrote a PEFT adapter for transformers ({len(adapter.lora)} LoRA modules, "
                     f"{len(adapter.full)} fully trained tensors) -> {out}"]
        finish_out(tmp, Path(out))
    print("\n".join(lines))
    return Path(out)


def _export_for_vllm(adapter: Adapter, base_dir: Path, tmp: Path, out: Path) -> list[str]:
    """Serving engines apply LoRA to the language model only: everything else goes into a merged base copy."""
    language = sorted(m for m in adapter.lora if part_of(m) == "language")
    if any(adapter.lora[m].magnitude is not None for m in language):
        raise ExportError("--for-vllm: the language-model adapter uses DoRA, which vLLM does not apply; use "
                          "`vlft export merged` instead")
    sub = tmp / "base"
    sub.mkdir()
    # the base copy gets vision + merger LoRA and every fully trained module (engines load no modules_to_save)
    moved = Adapter(adapter.folder, adapter.config, {m: w for m, w in adapter.lora.items() if m not in language},
                    adapter.full)
    counts = merge_into(base_dir, moved, sub, None)
    write_configs(base_dir, sub, None)
    got = copy_extras([adapter.folder, base_dir], sub, TOKENIZER_FILES + PROCESSOR_FILES)
    lines = [f"base copy {out / 'base'}: merged {counts['lora'] + counts['dora']} vision/merger LoRA modules and "
             f"{counts['full']} fully trained tensors ({', '.join(sorted({part_of(k) for k in adapter.full})) or 'none'})"]
    if language:
        config, tensors = adapter_files(adapter, language, False, "hub", out / "base")
        # leaf names + an exclusion of the vision tower: the list form serving engines read, still exact for peft
        config["target_modules"] = sorted({m.rsplit(".", 1)[-1] for m in language})
        config["exclude_modules"] = r"(?:model\.)?visual\..*"
        write_adapter(tmp / "adapter", config, tensors, [adapter.folder, base_dir])
        lines.append(f"adapter {out / 'adapter'}: {len(language)} language-model LoRA modules "
                     f"({', '.join(config['target_modules'])})")
        lines.append(f"serve with: vllm serve {out / 'base'} --enable-lora --max-lora-rank "
                     f"{max(adapter.lora[m].A.shape[0] for m in language)} --lora-modules vlft={out / 'adapter'}")
    else:
        lines.append("no language-model LoRA: the base copy holds the whole fine-tune (no adapter folder written)")
    lines += report_extras(got, adapter.folder)
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="vlft export", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    m = sub.add_parser("merged", help="merge the adapter into the base and write an HF folder")
    a = sub.add_parser("adapter", help="write a PEFT adapter folder (or, with --for-vllm, base copy + LM adapter)")
    for p in (m, a):
        p.add_argument("--adapter", required=True, help="training checkpoint, run folder or PEFT adapter folder")
        p.add_argument("--base", help="base HF folder (default: the one named in the checkpoint's base_model.json)")
        p.add_argument("--out", required=True, help="output folder (must be empty or absent unless --overwrite)")
        p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    m.add_argument("--dtype", choices=["bf16", "fp16", "fp32", "bfloat16", "float16", "float32"],
                   help="output dtype (default: the base's)")
    a.add_argument("--for-vllm", action="store_true",
                   help="merge vision/merger changes into OUT/base and keep only the language LoRA in OUT/adapter")
    args = ap.parse_args(argv)
    # errors are reported by the vlft CLI's one policy (vlft/cli.py): ExportError and missing files exit 2
    if args.what == "merged":
        export_merged(args.adapter, args.out, args.base, args.dtype, args.overwrite)
    else:
        export_adapter(args.adapter, args.out, args.base, args.for_vllm, args.overwrite)
    return 0


if __name__ == "__main__":
    from vlft.cli import run_command

    sys.exit(run_command("vlft export", main, sys.argv[1:]))
