"""LoRA against LoRA + PACE on a small Llama-style language model, on text that ships with Python.

The text is the docstrings of the Python standard library (read from its source files with ``ast``,
nothing imported or downloaded), as bytes: a byte-level model needs no tokenizer. A small
``LlamaForCausalLM`` built from a config is pre-trained on the docstrings of the modules whose
names start with a-m, then adapted from a few docstrings of the modules n-z, with LoRA alone and
with LoRA + PACE, over several seeds; the held-out loss is measured on other docstrings of n-z.

    python examples/lm_docstrings.py             # full size: a few minutes on CPU
    python examples/lm_docstrings.py --size tiny # seconds (what the test suite runs)

Needs transformers (``pip install pace[hf]``).
"""

from __future__ import annotations

import argparse
import ast
import copy
import math
import os
import statistics
import sysconfig
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

import pace

PAD, EOS = 256, 257  # byte values are 0..255
VOCAB = 258
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Size:
    seq_len: int
    hidden: int
    layers: int
    heads: int
    pretrain_steps: int
    pretrain_batch: int
    adapt_examples: int
    adapt_steps: int
    adapt_batch: int
    heldout_examples: int
    seeds: int
    max_modules: Optional[int]  # per side (a-m, n-z); None: all


SIZES = {
    "tiny": Size(48, 32, 1, 2, 4, 8, 8, 3, 4, 8, 1, 6),
    "full": Size(64, 64, 2, 4, 200, 16, 32, 40, 8, 128, 3, None),
}


def stdlib_docstrings(max_modules: Optional[int] = None) -> Tuple[List[str], List[str]]:
    """Docstrings (module, class, function) of the top-level standard-library modules, split by
    module name: those starting with a-m, and those starting with n-z (and ``_``)."""
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(f for f in os.listdir(root) if f.endswith(".py"))
    first = [f for f in files if f[0].lower() <= "m" and f[0] != "_"]
    second = [f for f in files if f not in first]
    if max_modules is not None:
        first, second = first[:max_modules], second[:max_modules]
    return _docstrings(root, first), _docstrings(root, second)


def _docstrings(root: str, files: Sequence[str]) -> List[str]:
    docs = []
    for name in files:
        try:
            with open(os.path.join(root, name), encoding="utf-8") as fh:
                tree = ast.parse(fh.read())
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 40:
                    docs.append(doc)
    return docs


def encode(texts: Sequence[str], seq_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Bytes of each text (cut to ``seq_len - 1``) and an end token, right-padded: token ids and
    attention mask ``[n, seq_len]``."""
    ids = torch.full((len(texts), seq_len), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, text in enumerate(texts):
        row = list(text.encode("utf-8")[: seq_len - 1]) + [EOS]
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


def lm_labels(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token labels: the ids themselves (the criterion shifts them), padding ignored."""
    return ids.masked_fill(mask == 0, -100)


def build_model(size: Size):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=size.hidden,
        intermediate_size=size.hidden * 3,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.heads,
        max_position_embeddings=size.seq_len,
        pad_token_id=PAD,
        eos_token_id=EOS,
        bos_token_id=EOS,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def _batches(n: int, batch: int, steps: int, gen: torch.Generator):
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if len(order) < batch:
            order = torch.cat([order, torch.randperm(n, generator=gen)])
        idx, order = order[:batch], order[batch:]
        yield idx


def train(model, crit, ids, mask, params, *, steps: int, batch: int, lr: float, seed: int) -> None:
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for step, idx in enumerate(_batches(len(ids), batch, steps, gen)):
        inputs = {"input_ids": ids[idx], "attention_mask": mask[idx]}
        out = crit(model, inputs, lm_labels(ids[idx], mask[idx]), step=step)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        sched.step()


@torch.no_grad()
def heldout_loss(model, ids, mask, batch: int = 64) -> float:
    """Mean next-token cross-entropy (nats per byte) over the held-out texts, noise-free."""
    model.eval()
    crit = pace.PaceCriterion("none", shift_labels=True)
    total, count = 0.0, 0
    for s in range(0, len(ids), batch):
        x, m = ids[s : s + batch], mask[s : s + batch]
        labels = lm_labels(x, m)
        n = int((labels[:, 1:] != -100).sum())
        total += float(crit.task_loss(model(input_ids=x, attention_mask=m).logits, labels)) * n
        count += n
    return total / count


def run(
    size_name: str = "full", *, sigma: float = 0.5, lam: float = 0.1, seeds: Optional[int] = None, log=print
) -> Dict[str, List[float]]:
    size = SIZES[size_name]
    seeds = size.seeds if seeds is None else seeds
    t0 = time.time()
    pretrain_docs, adapt_docs = stdlib_docstrings(size.max_modules)
    log(
        f"docstrings: {len(pretrain_docs)} for pre-training (modules a-m), {len(adapt_docs)} (n-z) "
        "to adapt on and hold out"
    )
    ids, mask = encode(pretrain_docs, size.seq_len)
    torch.manual_seed(0)
    base = build_model(size)
    plain = pace.PaceCriterion("none", shift_labels=True)
    train(
        base,
        plain,
        ids,
        mask,
        list(base.parameters()),
        steps=size.pretrain_steps,
        batch=size.pretrain_batch,
        lr=3e-3,
        seed=0,
    )
    adapt_ids, adapt_mask = encode(adapt_docs, size.seq_len)
    log(
        f"pre-trained in {time.time() - t0:.0f}s: held-out loss on n-z before adapting "
        f"{heldout_loss(base, adapt_ids[: size.heldout_examples], adapt_mask[: size.heldout_examples]):.4f}"
    )

    results: Dict[str, List[float]] = {"lora": [], "lora+pace": []}
    for seed in range(seeds):
        # each seed: its own few adaptation examples, and held-out texts disjoint from them
        perm = torch.randperm(len(adapt_docs), generator=torch.Generator().manual_seed(1000 + seed))
        few = perm[: size.adapt_examples]
        held = perm[size.adapt_examples : size.adapt_examples + size.heldout_examples]
        for method in results:
            torch.manual_seed(seed)
            model = copy.deepcopy(base)
            pace.inject(
                model,
                adapter="lora_add",
                rank=4,
                sigma=sigma if method == "lora+pace" else 0.0,
                targets=LORA_TARGETS,
            )
            crit = (
                pace.PaceCriterion("pace", lam=lam, shift_labels=True)
                if method == "lora+pace"
                else pace.PaceCriterion("none", shift_labels=True)
            )
            train(
                model,
                crit,
                adapt_ids[few],
                adapt_mask[few],
                pace.trainable_parameters(model),
                steps=size.adapt_steps,
                batch=size.adapt_batch,
                lr=3e-3,
                seed=seed,
            )
            results[method].append(heldout_loss(model, adapt_ids[held], adapt_mask[held]))
        log(
            f"seed {seed}: held-out loss  LoRA {results['lora'][-1]:.4f}  "
            f"LoRA+PACE {results['lora+pace'][-1]:.4f}"
        )
    for method, losses in results.items():
        spread = statistics.stdev(losses) if len(losses) > 1 else 0.0
        log(
            f"{method:>10}: held-out loss {statistics.mean(losses):.4f} +- {spread:.4f} "
            f"(nats/byte, {len(losses)} seeds)"
        )
    log(f"total {time.time() - t0:.0f}s")
    return results


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, List[float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--sigma", type=float, default=0.5, help="PACE noise std (default 0.5)")
    parser.add_argument("--lam", type=float, default=0.1, help="PACE consistency weight (default 0.1)")
    parser.add_argument("--seeds", type=int, default=None, help="adaptation seeds (default: by size)")
    args = parser.parse_args(argv)
    return run(args.size, sigma=args.sigma, lam=args.lam, seeds=args.seeds)


if __name__ == "__main__":
    main()
