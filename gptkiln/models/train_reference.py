"""Train the bundled reference model: a small GPT-2 with its own byte-level BPE tokenizer.

The corpus is the Python standard library's own source (found through the running
interpreter, so every machine has it), tests and site-packages excluded. Files are split
by a hash of their relative path: about 5% are held out for evaluation and never trained
on; the first 256 KB of that split are saved as ``heldout.txt`` beside the weights so that
perplexity is measured on the same text on every machine.

Reproduce with:  python -m gptkiln.models.train_reference [--steps N] [--out DIR]
(--width / --heads train the same recipe at another size, for side studies.)
Fixed seed, fixed step count. On a 2-core CPU (torch 2.13, Python 3.11.7 stdlib) the
default run takes ~0.75 s a step, about 20 minutes (the committed run took 34 minutes on a
shared machine, see training.json); the corpus differs slightly between Python versions,
so weights trained elsewhere differ slightly too.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sysconfig
import time
from pathlib import Path

import torch

REFERENCE_DIR = Path(__file__).parent / "reference"
EOS = "<|endoftext|>"
VOCAB_SIZE = 4096
HELDOUT_BYTES = 256 * 1024
SEED = 1234


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(("site-packages/", "test/", "idlelib/idle_test/")) or "/tests/" in rel:
            continue
        files.append(path)
    return files


def is_heldout(path: Path) -> bool:
    root = Path(sysconfig.get_paths()["stdlib"])
    digest = hashlib.sha256(path.relative_to(root).as_posix().encode()).digest()
    return digest[0] < 13  # ~5% of files


def read_texts(paths: list[Path]) -> list[str]:
    return [p.read_text(encoding="utf-8", errors="replace") for p in paths]


def train_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS, unk_token=EOS,
        model_max_length=512,
    )


def encode_corpus(tokenizer, texts: list[str]) -> torch.Tensor:
    eos = tokenizer.convert_tokens_to_ids(EOS)
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text)["input_ids"])
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def model_config(tokenizer, width: int = 192, heads: int = 6):
    from transformers import GPT2Config

    eos = tokenizer.convert_tokens_to_ids(EOS)
    return GPT2Config(
        vocab_size=VOCAB_SIZE, n_positions=512, n_embd=width, n_layer=4, n_head=heads,
        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, tie_word_embeddings=True,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )


def evaluate(model, tokens: torch.Tensor, seq: int, batches: int = 8) -> float:
    model.eval()
    n = (len(tokens) - 1) // seq
    losses = []
    with torch.no_grad():
        for b in range(min(batches, max(1, n // 16))):
            rows = tokens[b * 16 * seq : (b + 1) * 16 * seq].view(16, seq)
            losses.append(model(input_ids=rows, labels=rows).loss.item())
    model.train()
    return math.exp(sum(losses) / len(losses))


def train(out: Path, steps: int, batch: int = 32, seq: int = 128, lr: float = 3e-3, width: int = 192,
          heads: int = 6) -> dict:
    from transformers import GPT2LMHeadModel

    torch.manual_seed(SEED)
    files = stdlib_files()
    train_files = [f for f in files if not is_heldout(f)]
    held_files = [f for f in files if is_heldout(f)]
    train_texts, held_texts = read_texts(train_files), read_texts(held_files)

    started = time.time()
    tokenizer = train_tokenizer(train_texts)
    train_ids = encode_corpus(tokenizer, train_texts)
    held_text = "\n".join(held_texts).encode("utf-8")[:HELDOUT_BYTES].decode("utf-8", "ignore")
    held_ids = encode_corpus(tokenizer, [held_text])
    print(f"tokenizer + encode: {time.time() - started:.0f}s; train tokens {len(train_ids):,}, "
          f"held-out tokens {len(held_ids):,}", flush=True)

    config = model_config(tokenizer, width, heads)
    model = GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)),
    )
    generator = torch.Generator().manual_seed(SEED)
    model.train()
    for step in range(steps):
        starts = torch.randint(0, len(train_ids) - seq - 1, (batch,), generator=generator)
        rows = torch.stack([train_ids[s : s + seq] for s in starts.tolist()])
        loss = model(input_ids=rows, labels=rows).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step:5d}/{steps}  loss {loss.item():.3f}  {time.time() - started:.0f}s", flush=True)

    heldout_ppl = evaluate(model, held_ids, seq)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "heldout.txt").write_text(held_text, encoding="utf-8")
    record = {
        "steps": steps, "batch": batch, "seq": seq, "lr": lr, "seed": SEED, "width": width, "heads": heads,
        "train_tokens": len(train_ids), "heldout_tokens": len(held_ids),
        "train_files": len(train_files), "heldout_files": len(held_files),
        "heldout_perplexity": round(heldout_ppl, 3), "seconds": round(time.time() - started),
        "python": sysconfig.get_python_version(), "torch": torch.__version__,
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1600)
    parser.add_argument("--out", type=Path, default=REFERENCE_DIR)
    parser.add_argument("--width", type=int, default=192, help="hidden size (default %(default)s)")
    parser.add_argument("--heads", type=int, default=6, help="attention heads (default %(default)s)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    train(args.out, args.steps, width=args.width, heads=args.heads)


if __name__ == "__main__":
    main()
